"""Property-based fuzzing of weights.read_safetensors and weights.read_gguf against the reference readers.

Each example starts from a small valid file, made with the reference writer (safetensors.torch.save) or by a
hand-written GGUF builder, and mutates it: byte flips, truncations, length and count fields set to edge values,
deep nesting, duplicates, overlapping or gapped offsets, odd JSON numbers and strings. For every input:

- our reader either returns exactly what the reference reader returns (same names, dtypes, shapes and bytes;
  dequantized values for GGUF, NaN where the reference has NaN) or raises WeightFileError;
- it never raises anything else;
- when the reference refuses the file, we refuse it too.

We may refuse files the reference accepts: dtypes and ggml types this project does not read, duplicate keys
(the safetensors library lets them pass), GGUF tensors not laid out as llama.cpp demands, arrays of unknown item
type when empty, and so on. The one principled exception to "the reference refuses, so do we" is documented in
`check_gguf`.

The default run takes a few seconds; W2S_FUZZ_LONG=1 runs W2S_FUZZ_EXAMPLES (default 12,000) examples per format.
The outcome counts per format are printed at the end of the module (run pytest with -s or -rA to see them).
"""

import collections
import copy
import json
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import weights
from weights import WeightFileError

gguf = pytest.importorskip("gguf", reason="the gguf library (requirements-dev.txt) is the reference for GGUF")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is the reference reader")
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis (requirements-dev.txt) drives the fuzzing")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import safe_open  # noqa: E402

# The gguf library warns of overflows and NaN while it reads mutated files; our reader's warnings still show.
pytestmark = pytest.mark.filterwarnings(r"ignore::RuntimeWarning:gguf\..*")

LONG = os.environ.get("W2S_FUZZ_LONG") == "1"
EXAMPLES = int(os.environ.get("W2S_FUZZ_EXAMPLES", "12000")) if LONG else 500
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
                suppress_health_check=list(HealthCheck))

# accepted-and-equal / refused by both / refused by us only / anything else, per format
OUTCOMES = {"safetensors": collections.Counter(), "gguf": collections.Counter()}
_WORKDIR = tempfile.TemporaryDirectory(prefix="w2s-fuzz-")  # removed when the test session ends
WORKDIR = Path(_WORKDIR.name)


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    for fmt, counts in OUTCOMES.items():
        print(f"fuzz {fmt}: {sum(counts.values())} files:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


EDGE_INTS = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1,
             2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -(2**63)]


def deep_brackets(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------------------------------- safetensors

def _st_seeds() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    many = {
        "w": torch.randn(2, 3, generator=g), "h": torch.randn(3, generator=g).half(),
        "b": torch.randn(2, generator=g).bfloat16(), "d": torch.randn(1, 2, generator=g).double(),
        "i": torch.tensor([1, -2], dtype=torch.int64), "j": torch.tensor([3, -4], dtype=torch.int32),
        "k": torch.tensor([5], dtype=torch.int16), "m": torch.tensor([-6, 7], dtype=torch.int8),
        "u": torch.arange(5, dtype=torch.uint8), "flag": torch.tensor([True, False, True]),
        "s": torch.tensor(2.5), "e": torch.zeros(0, 3),
    }
    return [safetensors_torch.save(many, metadata={"format": "pt", "note": "fuzz"}),
            safetensors_torch.save({"x": torch.tensor([1.0, 2.0])}),
            safetensors_torch.save({"a": torch.ones(2, 2), "z": torch.zeros(0)}),
            safetensors_torch.save({})]


ST_SEEDS = _st_seeds()
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
             "F8_E4M3", "F8_E5M2", "f32", "", "F32 ", "__metadata__"]
JSON_LEAF = (st.none() | st.booleans() | st.integers() | st.sampled_from(EDGE_INTS) | st.floats()
             | st.text(max_size=4))
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6)
JSON_NUMBERS = ["-0", "0", "1", "-1", "1.0", "1e2", "2.5e-400", "1e400", "-1e400", "NaN", "Infinity",
                "-Infinity", "18446744073709551615", "18446744073709551616", "9223372036854775808",
                "9" * 30, "9" * 400, "0x10", "00", "1_0"]
JSON_STRINGS = ['"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', '"\\u0000"', '""', '"__metadata__"', '"F32"',
                '"\\"[[[["', '"\\\\"', '"\t"', "'F32'"]


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def mutate_json(data, header: dict) -> tuple[dict, list]:
    """Edit the parsed header; returns it and the text-level edits to apply after dumping it."""
    later = []
    names = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3), label="n json edits")):
        op = data.draw(st.sampled_from(["dtype", "shape", "dim", "offsets", "shift", "copy_offsets", "swap",
                                        "drop_field", "extra_field", "entry", "metadata", "drop_tensor",
                                        "rename", "duplicate", "deep"]), label="json edit")
        name = data.draw(st.sampled_from(names), label="tensor") if names else None
        entry = header.get(name) if name is not None else None
        if op == "metadata":
            header["__metadata__"] = data.draw(
                JSON_ANY | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3), label="meta")
        elif op == "deep":
            depth = data.draw(st.sampled_from([1, 2, 10, 62, 63, 64, 65, 126, 127, 128, 1000, 100_000]))
            where = data.draw(st.sampled_from(["field", "entry", "metadata", "top"]))
            later.append(("deep", where, name, depth))
        elif op == "duplicate" and name is not None:
            later.append(("duplicate", name, data.draw(st.booleans(), label="same entry")))
        elif not isinstance(entry, dict):
            continue
        elif op == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(ST_DTYPES) | JSON_ANY, label="dtype")
        elif op == "shape":
            entry["shape"] = data.draw(st.lists(st.sampled_from(EDGE_INTS + [True, False, 1.0, "1", None]),
                                                max_size=4) | JSON_ANY, label="shape")
        elif op == "dim" and isinstance(entry.get("shape"), list) and entry["shape"]:
            i = data.draw(st.integers(0, len(entry["shape"]) - 1))
            entry["shape"][i] = data.draw(st.sampled_from(EDGE_INTS + [True, 1.0]), label="dim")
        elif op == "offsets":
            entry["data_offsets"] = data.draw(st.lists(st.sampled_from(EDGE_INTS), max_size=3) | JSON_ANY)
        elif op == "shift" and isinstance(entry.get("data_offsets"), list) and \
                all(type(o) is int for o in entry["data_offsets"]):
            delta = data.draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4, 8]), label="shift")
            which = data.draw(st.sampled_from([(0,), (1,), (0, 1)]), label="which offsets")
            entry["data_offsets"] = [o + delta if i in which else o for i, o in enumerate(entry["data_offsets"])]
        elif op in ("copy_offsets", "swap") and len(names) > 1:
            other = header[data.draw(st.sampled_from([n for n in names if n != name]), label="other")]
            if isinstance(other, dict) and "data_offsets" in other and "data_offsets" in entry:
                if op == "swap":
                    other["data_offsets"], entry["data_offsets"] = entry["data_offsets"], other["data_offsets"]
                else:
                    entry["data_offsets"] = copy.deepcopy(other["data_offsets"])
        elif op == "drop_field" and entry:
            del entry[data.draw(st.sampled_from(sorted(entry)), label="field")]
        elif op == "extra_field":
            entry[data.draw(st.text(max_size=3), label="key")] = data.draw(JSON_ANY, label="value")
        elif op == "entry":
            header[name] = data.draw(JSON_ANY, label="entry")
        elif op == "drop_tensor":
            del header[name]
            names.remove(name)
        elif op == "rename":
            new = data.draw(st.text(max_size=4) | st.just("__metadata__"), label="new name")
            header[new] = header.pop(name)
            names = [k for k in header if k != "__metadata__"]
    return header, later


def dump_json(header: dict, later: list) -> str:
    text = json.dumps(header)
    for edit in later:
        if edit[0] == "duplicate":
            _, name, same = edit
            value = header.get(name) if same else {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
            text = "{" + json.dumps(name) + ": " + json.dumps(value) + ", " + text[1:] if len(text) > 2 else text
        else:
            _, where, name, depth = edit
            deep = deep_brackets(depth)
            if where == "top":
                text = deep
            elif where == "metadata":
                text = '{"__metadata__": {"k": ' + deep + "}, " + text[1:] if len(text) > 2 else text
            elif where == "entry" and name is not None:
                text = "{" + json.dumps(name + "~") + ": " + deep + ", " + text[1:] if len(text) > 2 else text
            elif name is not None and isinstance(header.get(name), dict):
                needle = json.dumps(name) + ": {"
                text = text.replace(needle, needle + '"deep": ' + deep + ", ", 1)
    return text


def mutate_text(data, text: str) -> str:
    """Swap a number or a string of the JSON text for an edge case, or add bytes around it."""
    op = data.draw(st.sampled_from(["none", "number", "string", "around"]), label="text edit")
    if op in ("number", "string"):
        pattern = r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?" if op == "number" else r'"(?:[^"\\]|\\.)*"'
        spans = [m.span() for m in re.finditer(pattern, text)]
        if spans:
            begin, end = data.draw(st.sampled_from(spans), label="token")
            token = data.draw(st.sampled_from(JSON_NUMBERS if op == "number" else JSON_STRINGS), label="new token")
            text = text[:begin] + token + text[end:]
    elif op == "around":
        before = data.draw(st.sampled_from(["", " ", "\n", "\ufeff", "x"]), label="before")
        after = data.draw(st.sampled_from(["", " ", "\n", "\x00", "}", " x", "\t"]), label="after")
        text = before + text + after
    return text


def mutate_bytes(data, raw: bytes) -> bytes:
    """One to three raw edits: flip, set, truncate, insert, delete, append."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3), label="n byte edits")):
        op = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "append"]), label="byte edit")
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="pos")
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "set" and raw:
            raw[pos] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord("["), ord("{"), ord('"'), ord(",")]))
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8), label="inserted")
        elif op == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 8), label="deleted")]
        elif op == "append":
            raw += data.draw(st.binary(min_size=1, max_size=8), label="appended")
    return bytes(raw)


@st.composite
def safetensors_files(draw) -> bytes:
    data = draw(st.data())
    raw = data.draw(st.sampled_from(ST_SEEDS), label="seed")
    kind = data.draw(st.sampled_from(["json", "json", "bytes", "length"]), label="kind")
    if kind == "json":
        header, body = split_safetensors(raw)
        header, later = mutate_json(data, header)
        text = mutate_text(data, dump_json(header, later))
        head = text.encode("utf-8", "surrogatepass")
        if data.draw(st.booleans(), label="pad"):
            head += b" " * (-len(head) % 8)
        body = data.draw(st.sampled_from([body, body + b"\0", body[:-1], body + bytes(8), b""]), label="body")
        raw = struct.pack("<Q", len(head)) + head + body
    elif kind == "bytes":
        raw = mutate_bytes(data, raw)
    if kind == "length" or data.draw(st.integers(0, 9), label="also length") == 0:
        (n,) = struct.unpack_from("<Q", raw) if len(raw) >= 8 else (0,)
        value = data.draw(st.sampled_from([0, 1, 2, n - 8, n - 1, n + 1, n + 8, len(raw) - 8, len(raw) - 7,
                                           100_000_001, 2**32, 2**63, 2**64 - 1]), label="header length")
        raw = struct.pack("<Q", value % 2**64) + raw[8:]
    return raw


def reference_safetensors(path: Path):
    """(tensors, metadata) as the safetensors library reads them, or None if it refuses the file."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception:  # noqa: BLE001 - any refusal of the reference counts, whatever its type
        return None


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def check_safetensors(raw: bytes) -> str:
    """Read `raw` with both readers; return the outcome, or raise AssertionError on a wrong one."""
    path = WORKDIR / "fuzz.safetensors"
    path.write_bytes(raw)
    try:
        ours = weights.read_safetensors(path), weights.read_safetensors_metadata(path)
    except WeightFileError as e:
        assert len(str(e).splitlines()) == 1 and str(path) in str(e) and e.what, str(e)
        return "refused by both" if reference_safetensors(path) is None else "refused by us only"
    except BaseException:
        OUTCOMES["safetensors"]["anything else"] += 1
        raise
    ref = reference_safetensors(path)
    if ref is None:
        OUTCOMES["safetensors"]["anything else"] += 1
        raise AssertionError(f"the reference refuses this file, we read {sorted(ours[0])}: {raw!r:.300}")
    (tensors, metadata), (ref_tensors, ref_metadata) = ours, ref
    if not (tensors.keys() == ref_tensors.keys() and metadata == ref_metadata
            and all(same_tensor(tensors[k], ref_tensors[k]) for k in tensors)):
        OUTCOMES["safetensors"]["anything else"] += 1
        raise AssertionError(f"we read other tensors than the reference: {raw!r:.300}")
    return "accepted and equal"


def test_the_safetensors_seeds_are_read_exactly():
    for raw in ST_SEEDS:
        assert check_safetensors(raw) == "accepted and equal"


@FUZZ
@given(safetensors_files())
def test_safetensors_fuzz(raw):
    OUTCOMES["safetensors"][check_safetensors(raw)] += 1


# -------------------------------------------------------------------------------------------------- GGUF

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
              U64: "<Q", I64: "<q", F64: "<d"}


class Raw(bytes):
    """Bytes written as they are in place of a value (deep nesting, unknown types, bad UTF-8)."""


class GGUFBuilder:
    """Writes a GGUF file by hand and records where each integer field is, so a mutation can reach it."""

    def __init__(self):
        self.out, self.fields = bytearray(), []

    def num(self, fmt: str, value) -> None:
        if fmt[-1] in "BbHhIiQq":  # an integer: wrapped to its width, signed or not
            self.fields.append((len(self.out), fmt))
            fmt, value = fmt.upper(), value % 2**(8 * struct.calcsize(fmt))
        self.out += struct.pack(fmt, value)

    def string(self, s) -> None:
        raw = s if isinstance(s, bytes) else s.encode()
        self.num("<Q", len(raw))
        self.out += raw

    def value(self, vtype: int, value) -> None:
        if isinstance(value, Raw):
            self.out += value
        elif vtype in SCALAR_FMT:
            self.num(SCALAR_FMT[vtype], value)
        elif vtype == STRING:
            self.string(value)
        else:  # ARRAY: (item type, items)
            item_type, items = value
            self.num("<I", item_type)
            self.num("<Q", len(items))
            for item in items:
                self.value(item_type, item)


def build_gguf(spec: dict) -> tuple[bytes, list]:
    """spec: version, alignment (None: no key), kvs [(key, type, value)], tensors [(name, dims, type, data)],
    offsets {name: override}. Tensors are laid out as GGUFWriter does: in order, each padded to the alignment."""
    b = GGUFBuilder()
    b.out += b"GGUF"
    b.num("<I", spec["version"])
    kvs = list(spec["kvs"])
    align = spec["alignment"]
    if align is not None:
        kvs.append(("general.alignment", align[0], align[1]))
    b.num("<Q", len(spec["tensors"]))
    b.num("<Q", len(kvs))
    for key, vtype, value in kvs:
        b.string(key)
        b.num("<I", vtype)
        b.value(vtype, value)
    # A huge alignment is written, but the layout keeps to 32 bytes: padding to 2**31 would need 2 GiB
    alignment = align[1] if align is not None and align[0] == U32 and 0 < align[1] <= 4096 else 32
    offset = 0
    for name, dims, gtype, data in spec["tensors"]:
        b.string(name)
        b.num("<I", len(dims))
        for d in dims:
            b.num("<Q", d)
        b.num("<I", gtype)
        b.num("<Q", spec["offsets"].get(name, offset))
        offset += len(data) + (-len(data) % alignment)
    b.out += bytes(-len(b.out) % alignment)
    for *_, data in spec["tensors"]:
        b.out += data + bytes(-len(data) % alignment)
    return bytes(b.out), b.fields


def _gguf_seed() -> dict:
    rng = np.random.default_rng(0)
    Q = gguf.GGMLQuantizationType

    def quant(shape, qtype):
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype).tobytes()

    q6k = rng.integers(0, 256, size=(1, 210), dtype=np.uint8)
    q6k[:, 208:210] = np.array([0.01], dtype=np.float16).view(np.uint8)
    tensors = [
        ("f32", (3, 2), Q.F32, rng.standard_normal(6).astype(np.float32).tobytes()),
        ("f16", (4,), Q.F16, rng.standard_normal(4).astype(np.float16).tobytes()),
        ("bf16", (2,), Q.BF16, quant((2,), Q.BF16)),
        ("q8_0", (32, 2), Q.Q8_0, quant((2, 32), Q.Q8_0)),
        ("q4_0", (32,), Q.Q4_0, quant((32,), Q.Q4_0)),
        ("q4_1", (32,), Q.Q4_1, quant((32,), Q.Q4_1)),
        ("q5_0", (32,), Q.Q5_0, quant((32,), Q.Q5_0)),
        ("q5_1", (32,), Q.Q5_1, quant((32,), Q.Q5_1)),
        ("q6_k", (256,), Q.Q6_K, q6k.tobytes()),
        ("empty", (0, 3), Q.F32, b""),
    ]
    kvs = [("general.architecture", STRING, "llama"), ("t.u8", U8, 200), ("t.i8", I8, -3), ("t.u16", U16, 7),
           ("t.i16", I16, -300), ("t.u32", U32, 4_000_000_000), ("t.i32", I32, -5), ("t.f32", F32, 0.5),
           ("t.bool", BOOL, True), ("t.u64", U64, 2**40), ("t.i64", I64, -(2**40)), ("t.f64", F64, 1e-300),
           ("t.str", STRING, "héllo"), ("t.strs", ARRAY, (STRING, ["a", "", "Ġthe"])),
           ("t.ints", ARRAY, (I32, [1, -2, 3])), ("t.floats", ARRAY, (F32, [0.25, 1.5])),
           ("t.bools", ARRAY, (BOOL, [True, False])), ("t.empty", ARRAY, (U8, [])),
           ("t.nested", ARRAY, (ARRAY, [(U8, [1, 2]), (U8, [])]))]
    return {"version": 3, "alignment": None, "kvs": kvs, "tensors": tensors, "offsets": {}}


GGUF_SEED = _gguf_seed()


def _writer_seed() -> bytes:
    path = WORKDIR / "writer.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("t.u32", 7)
    writer.add_array("t.strs", ["x", "yz"])
    writer.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.add_tensor("b", np.ones(5, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


WRITER_SEED = _writer_seed()
GGML_TYPES = [0, 1, 2, 3, 6, 7, 8, 14, 30, 9, 12, 24, 28, 39, 40, 2**31]


def scalar_value(data, vtype: int):
    fmt = SCALAR_FMT[vtype]
    return struct.unpack(fmt, data.draw(st.binary(min_size=struct.calcsize(fmt), max_size=struct.calcsize(fmt)),
                                        label="scalar bytes"))[0]


def mutate_gguf_spec(data, spec: dict) -> dict:
    spec = {**spec, "kvs": list(spec["kvs"]), "tensors": list(spec["tensors"]), "offsets": dict(spec["offsets"])}
    for _ in range(data.draw(st.integers(1, 3), label="n spec edits")):
        op = data.draw(st.sampled_from(["alignment", "kv", "dup_key", "deep", "unknown_item", "bad_utf8",
                                        "dup_tensor", "dims", "ggml_type", "offset", "data", "drop_tensor",
                                        "reorder", "version", "n_dims"]), label="spec edit")
        t = data.draw(st.integers(0, len(spec["tensors"]) - 1), label="tensor") if spec["tensors"] else None
        k = data.draw(st.integers(0, len(spec["kvs"]) - 1), label="kv")
        if op == "alignment":
            vtype = data.draw(st.sampled_from([U32, U32, U32, U64, I32, U16, STRING]), label="alignment type")
            value = data.draw(st.sampled_from([0, 1, 2, 3, 8, 16, 24, 31, 32, 64, 4096, 2**31]), label="alignment")
            spec["alignment"] = (vtype, str(value) if vtype == STRING else value)
        elif op == "kv":
            vtype = data.draw(st.sampled_from(list(range(13)) + [13, 2**31]), label="value type")
            if vtype in SCALAR_FMT:
                value = scalar_value(data, vtype)
            elif vtype == STRING:
                value = data.draw(st.text(max_size=5), label="string")
            elif vtype == ARRAY:
                item = data.draw(st.sampled_from([U8, I32, F32, BOOL, F64, STRING]), label="item type")
                items = [scalar_value(data, item) if item in SCALAR_FMT else data.draw(st.text(max_size=3))
                         for _ in range(data.draw(st.integers(0, 3), label="n items"))]
                value = (item, items)
            else:
                value = Raw(data.draw(st.binary(max_size=8), label="unknown value"))
            spec["kvs"][k] = (spec["kvs"][k][0], vtype, value)
        elif op == "dup_key":
            spec["kvs"].append(spec["kvs"][k])
        elif op == "deep":
            depth = data.draw(st.sampled_from([1, 2, 10, 63, 64, 65, 66, 200, 1000]), label="depth")
            raw = (struct.pack("<IQ", ARRAY, 1) * (depth - 1)) + struct.pack("<IQ", U8, 1) + b"\x05"
            spec["kvs"].append(("t.deep", ARRAY, Raw(raw)))
        elif op == "unknown_item":
            spec["kvs"].append(("t.unknown", ARRAY, (data.draw(st.sampled_from([13, 99, 2**31])), [])))
        elif op == "bad_utf8":
            bad = data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80"]), label="bad bytes")
            if data.draw(st.booleans(), label="in a key"):
                spec["kvs"][k] = (bad,) + spec["kvs"][k][1:]
            else:
                spec["kvs"][k] = (spec["kvs"][k][0], STRING, bad)
        elif t is None:
            continue
        elif op == "dup_tensor":
            spec["tensors"].append(spec["tensors"][t])
        elif op == "dims" and spec["tensors"][t][1]:
            name, dims, gtype, payload = spec["tensors"][t]
            dims = list(dims)
            dims[data.draw(st.integers(0, len(dims) - 1))] = data.draw(st.sampled_from(EDGE_INTS[:-3] + [2**64 - 1]))
            spec["tensors"][t] = (name, tuple(d % 2**64 for d in dims), gtype, payload)
        elif op == "n_dims":
            name, dims, gtype, payload = spec["tensors"][t]
            dims = data.draw(st.sampled_from([(), (1,) * 5, tuple(dims) + (1,), tuple(dims)[:1]]), label="new dims")
            spec["tensors"][t] = (name, dims, gtype, payload)
        elif op == "ggml_type":
            name, dims, _, payload = spec["tensors"][t]
            spec["tensors"][t] = (name, dims, data.draw(st.sampled_from(GGML_TYPES), label="ggml type"), payload)
        elif op == "offset":
            spec["offsets"][spec["tensors"][t][0]] = data.draw(
                st.sampled_from([0, 1, 4, 16, 31, 32, 33, 64, 96, 2**32, 2**63, 2**64 - 1]), label="offset")
        elif op == "data":
            name, dims, gtype, payload = spec["tensors"][t]
            cut = data.draw(st.sampled_from([-1, 1, 32, -32]), label="data change")
            payload = payload[:cut] if cut < 0 else payload + bytes(cut)
            spec["tensors"][t] = (name, dims, gtype, payload)
        elif op == "drop_tensor":
            del spec["tensors"][t]
        elif op == "reorder" and len(spec["tensors"]) > 1:
            spec["tensors"] = data.draw(st.permutations(spec["tensors"]), label="order")
        elif op == "version":
            spec["version"] = data.draw(st.sampled_from([0, 1, 2, 4, 0x03000000, 2**32 - 1]), label="version")
    return spec


@st.composite
def gguf_files(draw) -> bytes:
    data = draw(st.data())
    kind = data.draw(st.sampled_from(["spec", "field", "bytes", "writer"]), label="kind")
    spec = mutate_gguf_spec(data, GGUF_SEED) if kind == "spec" else GGUF_SEED
    raw, fields = build_gguf(spec)
    if kind == "field" or (kind == "spec" and data.draw(st.integers(0, 4), label="also field") == 0):
        pos, fmt = data.draw(st.sampled_from(fields), label="field")
        (old,) = struct.unpack_from(fmt, raw, pos)
        size = struct.calcsize(fmt)
        value = data.draw(st.sampled_from([0, 1, 2, 3, old - 1, old + 1, old * 2, 2**(8 * size - 1) - 1,
                                           2**(8 * size - 1), 2**(8 * size) - 1]), label="field value")
        raw = raw[:pos] + struct.pack(fmt.upper(), value % 2**(8 * size)) + raw[pos + size:]
    if kind == "writer":
        raw = WRITER_SEED
    if kind in ("bytes", "writer") or data.draw(st.integers(0, 4), label="also bytes") == 0:
        raw = mutate_bytes(data, raw)
    return raw


class BoundedGGUFReader(gguf.GGUFReader):
    """The gguf library's reader, made to fail where it reads past the end of the file. Unchanged, it takes an
    empty read for an item and goes on: with an array count of 2**63 it appends empty items until memory runs
    out, and a last array that claims more items than the file holds is read short without a word."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if int(count) and offset + np.dtype(dtype).itemsize * int(count) > len(self.data):
            raise ValueError(f"reading {count} x {np.dtype(dtype)} at byte {offset} runs past the end")
        return super()._get(offset, dtype, count, override_order)


def reference_gguf(path: Path):
    """(tensors, metadata) as the gguf library reads them, or None if it refuses the file. Tensors: name ->
    (type name, torch-order shape, float32 values). Metadata leaves out arrays of arrays, which it flattens."""
    try:
        reader = BoundedGGUFReader(path)
        tensors = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            # gguf.quants.dequantize cannot reshape an empty block-quantized tensor; it has no values to compare
            values = (np.zeros(shape, np.float32) if t.data.size == 0
                      else np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            tensors[t.name] = (t.tensor_type.name, shape, values)
        metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")
                    and not (f.types[:2] == [gguf.GGUFValueType.ARRAY] * 2)}
        return tensors, metadata, [k for k in reader.fields if not k.startswith("GGUF.")]
    except Exception:  # noqa: BLE001 - any refusal of the reference counts, whatever its type
        return None


def same_value(a, b) -> bool:
    """Equal, NaN equal to NaN, element by element for lists."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b


def check_gguf(raw: bytes) -> str:
    """Read `raw` with both readers; return the outcome, or raise AssertionError on a wrong one."""
    path = WORKDIR / "fuzz.gguf"
    path.write_bytes(raw)
    try:
        ours = weights.read_gguf(path)
    except WeightFileError as e:
        assert len(str(e).splitlines()) == 1 and str(path) in str(e) and e.what, str(e)
        return "refused by both" if reference_gguf(path) is None else "refused by us only"
    except BaseException:
        OUTCOMES["gguf"]["anything else"] += 1
        raise
    ref = reference_gguf(path)
    if ref is None:
        # The one principled exception: the gguf library files the header counts under the keys GGUF.version,
        # GGUF.tensor_count and GGUF.kv_count, so it refuses a file whose own metadata uses one of those names
        # as a duplicate key. GGUF reserves no such names; we read the file.
        if any(key.startswith("GGUF.") for key in ours.metadata):
            return "accepted, GGUF.* key"
        OUTCOMES["gguf"]["anything else"] += 1
        raise AssertionError(f"the reference refuses this file, we read {sorted(ours.tensors)}: {raw!r:.300}")
    ref_tensors, ref_metadata, ref_keys = ref
    problems = [] if ours.tensors.keys() == ref_tensors.keys() else ["tensor names"]
    for name, (type_name, shape, values) in ref_tensors.items():
        ok = (name in ours.tensors and ours.tensor_types[name] == type_name
              and tuple(ours.tensors[name].shape) == shape
              and np.array_equal(ours.tensors[name].numpy(), values.reshape(shape), equal_nan=True))
        problems += [] if ok else [f"tensor {name}"]
    problems += [] if list(ours.metadata) == ref_keys else ["metadata keys"]
    problems += [f"metadata {k}" for k, v in ref_metadata.items() if not same_value(ours.metadata.get(k), v)]
    if problems:
        OUTCOMES["gguf"]["anything else"] += 1
        raise AssertionError(f"we read other values than the reference ({', '.join(problems)}): {raw!r:.300}")
    return "accepted and equal"


def test_the_gguf_seeds_are_read_exactly():
    assert check_gguf(build_gguf(GGUF_SEED)[0]) == "accepted and equal"
    assert check_gguf(WRITER_SEED) == "accepted and equal"


@FUZZ
@given(gguf_files())
def test_gguf_fuzz(raw):
    OUTCOMES["gguf"][check_gguf(raw)] += 1
