"""Open-weight file formats: readers of safetensors and GGUF, a safetensors writer. No pickle anywhere.

Two file formats carry every weight this project loads:

safetensors (Hugging Face)::

    [8 bytes: N, little-endian uint64][N bytes: JSON header][raw tensor bytes]

    The header maps each tensor name to {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]},
    offsets counted from the first byte after the header; an optional "__metadata__" entry maps str -> str.
    Tensors are stored C-contiguous, little-endian, exactly prod(shape) * itemsize bytes each.

GGUF v3 (llama.cpp)::

    b"GGUF", uint32 version, uint64 tensor_count, uint64 kv_count,
    kv_count x (string key, uint32 value type, value)        # the model's metadata and tokenizer
    tensor_count x (string name, uint32 n_dims, uint64 ne[n_dims], uint32 ggml type, uint64 offset)
    padding to general.alignment (default 32), then the tensor data.

    A GGUF string is a uint64 byte count followed by UTF-8 bytes. Dimensions are in ggml order, ne[0]
    fastest, so a torch tensor has the REVERSED shape: ne = [576, 49152] is torch shape (49152, 576).
    Quantized tensors are stored in blocks along ne[0]; each block format below has its own small
    dequantization function whose docstring draws the block layout.

Which models this project knows, and where their files come from, is registry.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch

__all__ = [
    "WeightFileError", "read_safetensors", "read_safetensors_metadata", "write_safetensors", "atomic_write",
    "GGUFFile", "read_gguf", "read_gguf_metadata",
]


class WeightFileError(ValueError):
    """A weight file is missing, truncated or malformed. The message is one line naming the file. ``what`` holds
    the problem alone, without the advice after it (set by ``_fail``; None for the other messages)."""
    what: str | None = None


def _fail(path: str | os.PathLike, what: str, todo: str) -> WeightFileError:
    """Build the one-line error every reader raises: '<file>: <what is wrong>; <what to do>'. Any line break (a
    tensor name may hold one) becomes a space."""
    error = WeightFileError(" ".join(f"{path}: {what}; {todo}".splitlines()))
    error.what = " ".join(what.splitlines())
    return error


def _check_exists(path: Path, kind: str) -> None:
    """Raise a WeightFileError naming `path` if it is not a regular file."""
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise _fail(path, f"{kind} file {where}",
                    "check the path, or pass a registry name (see registry.STUDENTS / registry.TEACHERS) "
                    "so the file is located or downloaded for you")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a temporary file beside `path` for binary writing; on success it replaces `path` in one step.

    The temp file lives in the same folder (os.replace is only atomic within one file system), is flushed
    and fsync'ed before the rename, and is deleted on ANY exception, KeyboardInterrupt included. So a
    reader sees either the old file or the complete new one, never half of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------------

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _ST_DTYPES.items()}
_ST_TODO = "the file is truncated, corrupt or not safetensors — delete it and download again"
_ST_MAX_HEADER = 100_000_000    # the reference reader refuses longer headers
_MAX_DIMS = 64                  # numpy's limit; real tensors have at most a handful
# How deep JSON arrays/objects and GGUF arrays of arrays may nest. A real header nests 3 deep (header, entry,
# shape); the bound keeps parsing clear of Python's recursion limit and below serde_json's 128, where the
# reference safetensors reader stops.
_MAX_NESTING = 64
# A JSON string, or an unterminated one running to the end of the text.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)


def _check_dims(path: Path, what: str, dims: Any, max_elements: int, todo: str) -> None:
    """Refuse dimensions that are not up to _MAX_DIMS non-negative integers, or that no file of this size could
    hold. Zero dims count as 1 here: numpy and torch refuse an empty tensor whose other dims multiply past int64."""
    # bool is an int to Python, not to JSON or GGUF
    if not (isinstance(dims, (list, tuple)) and len(dims) <= _MAX_DIMS
            and all(type(d) is int and d >= 0 for d in dims)):
        raise _fail(path, f"{what} has invalid shape {dims!r:.100}", todo)
    if math.prod(d or 1 for d in dims) > max_elements:
        raise _fail(path, f"{what} has shape {list(dims)}, more elements than a file of this size can hold", todo)


def _json_number(text: str) -> int | float:
    """A JSON number as serde_json (in the reference reader) takes it: integers of at most 64 bits, -0 a float,
    floats finite. Python's json also hands NaN and Infinity here, which are no JSON."""
    if text.lstrip("-").isdigit() and text != "-0":
        if len(text.lstrip("-")) > 20:
            raise ValueError(f"integer {text[:24]}... is out of range")
        return int(text)
    if not math.isfinite(value := float(text)):
        raise ValueError(f"{text[:24]} is not a finite number")
    return value


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object without duplicate keys: with two, which one a reader takes is a guess."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _parse_json_header(path: Path, raw: bytes) -> dict[str, Any]:
    """Parse the header as strictly as the reference reader: UTF-8, bounded nesting, no NaN, no duplicate keys."""
    try:
        text = raw.decode("utf-8")
        codes = np.frombuffer(_JSON_STRING.sub("", text).encode(), dtype=np.uint8)  # brackets in strings don't nest
        steps = np.isin(codes, list(b"[{")).astype(np.int64) - np.isin(codes, list(b"]}"))
        if codes.size and np.cumsum(steps).max() > _MAX_NESTING:
            raise ValueError(f"arrays and objects nest deeper than {_MAX_NESTING}")
        header = json.loads(text, object_pairs_hook=_json_object, parse_int=_json_number, parse_float=_json_number,
                            parse_constant=_json_number)
        json.dumps(header, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) is no UTF-8 text
    except ValueError as e:  # JSONDecodeError and UnicodeError are ValueErrors
        raise _fail(path, f"header is not valid JSON ({e})", _ST_TODO) from None
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, expected an object", _ST_TODO)
    return header


_STEntry = tuple[torch.dtype, list[int], int, int]    # dtype, shape, begin and end within the data section


def _check_safetensors_entry(path: Path, name: str, entry: Any, file_size: int) -> _STEntry:
    """Check one header entry and return it."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _fail(path, f"tensor '{name}' header entry {entry!r:.100} lacks dtype/shape/data_offsets", _ST_TODO)
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    dtype = _ST_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise _fail(path, f"tensor '{name}' has unknown dtype {dtype_name!r:.40} "
                          f"(this reader knows {', '.join(_ST_DTYPES)})",
                    "convert the file to one of those dtypes")
    _check_dims(path, f"tensor '{name}'", shape, file_size, _ST_TODO)  # an element takes a byte or more
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"tensor '{name}' has invalid data_offsets {offsets!r:.100}", _ST_TODO)
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise _fail(path, f"tensor '{name}' holds {end - begin} bytes but shape {shape} of {dtype_name} "
                          f"needs {expected}", _ST_TODO)
    return dtype, shape, begin, end


def _read_safetensors_header(path: Path) -> tuple[dict[str, _STEntry], dict[str, str], int]:
    """Read and check the header and the layout it describes. Returns (tensor entries, metadata, first data byte)."""
    _check_exists(path, "safetensors")
    file_size = path.stat().st_size
    if file_size < 8:
        raise _fail(path, f"file is {file_size} bytes, shorter than the 8-byte header length", _ST_TODO)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(file_size - 8, _ST_MAX_HEADER):
            raise _fail(path, f"header length {n} runs past the end of the file ({file_size} bytes) or past "
                              f"the {_ST_MAX_HEADER}-byte limit", _ST_TODO)
        header = _parse_json_header(path, f.read(n))
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _fail(path, f"__metadata__ is {metadata!r:.100}, expected an object of strings", _ST_TODO)
    entries = {name: _check_safetensors_entry(path, name, entry, file_size) for name, entry in header.items()}
    # Sorted by offsets, the tensors must tile the data section exactly, as the reference reader demands: a gap,
    # an overlap or a trailing byte means the header does not describe these bytes.
    covered, data_len = 0, file_size - 8 - n
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != covered:
            raise _fail(path, f"tensor '{name}' starts at data byte {begin}, but the tensors before it end at "
                              f"{covered} (a gap or an overlap)", _ST_TODO)
        covered = end
    if covered != data_len:
        raise _fail(path, f"the tensors cover {covered} bytes of the {data_len}-byte data section", _ST_TODO)
    return entries, metadata, 8 + n


def read_safetensors(path: str | os.PathLike, names=None) -> dict[str, torch.Tensor]:
    """Read every tensor of a .safetensors file (or only those in ``names``), each in its stored dtype and shape.

    The whole header is checked even when only some tensors are read. Each tensor gets its own freshly allocated
    buffer, so the tensors are writable and keep no file open.
    """
    path = Path(path)
    entries, _, data_start = _read_safetensors_header(path)
    if names is not None:
        names = set(names)
        absent = sorted(names - entries.keys())
        if absent:
            raise _fail(path, f"no tensor named {absent[0]!r}", "is it a checkpoint of the expected kind?")
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in entries.items():
            if names is not None and name not in names:
                continue
            tensors[name] = torch.empty(shape, dtype=dtype)
            f.seek(data_start + begin)
            if f.readinto(tensors[name].reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise _fail(path, f"tensor '{name}' is cut short by the end of the file", _ST_TODO)
    return tensors


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the header's free-form "__metadata__" dict (str -> str), or {} if the file has none."""
    return _read_safetensors_header(Path(path))[1]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, C-contiguous, without a copy where possible."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (and optional str -> str `metadata`) to a .safetensors file, atomically.

    Tensors are laid out back to back in the order given; the header is padded with spaces to a multiple
    of 8 bytes, as the reference implementation does, so that 8-byte dtypes start aligned.
    """
    path = Path(path)
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError(f"{path}: safetensors metadata must map str to str, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{path}: value for '{name}' is a {type(tensor).__name__}, expected a torch.Tensor")
        if tensor.dtype not in _ST_NAMES:
            raise ValueError(f"{path}: tensor '{name}' has dtype {tensor.dtype}, which safetensors here does "
                             f"not store; cast it to one of {sorted(map(str, _ST_NAMES))}")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _ST_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(_tensor_bytes(tensor))


# ---------------------------------------------------------------------------------------------------------
# GGUF: block dequantization. Each function maps (n_blocks, type_size) uint8 -> (n_blocks, block) float32.
# ---------------------------------------------------------------------------------------------------------

def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 holding little-endian float16 -> (n, 1) float32."""
    return two_bytes.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _dequant_f32(blocks: np.ndarray) -> np.ndarray:
    """F32: block of 1 element, 4 bytes little-endian float32."""
    return blocks.view(np.float32).astype(np.float32)


def _dequant_f16(blocks: np.ndarray) -> np.ndarray:
    """F16: block of 1 element, 2 bytes IEEE half."""
    return _f16(blocks)


def _dequant_bf16(blocks: np.ndarray) -> np.ndarray:
    """BF16: block of 1 element, 2 bytes = the top 16 bits of a float32 (so x = bits << 16)."""
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: 32 elements in 34 bytes.

        [f16 d][int8 q0 ... q31]        x_i = d * q_i
    """
    d = _f16(blocks[:, :2])                                   # (n, 1)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)        # (n, 32)
    return q * d


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: 32 elements in 18 bytes.

        [f16 d][16 bytes: byte j = q_j (low nibble) | q_{j+16} (high nibble)]       x_i = d * (q_i - 8)
    """
    d = _f16(blocks[:, :2])                                               # (n, 1)
    q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)              # (n, 32) in -8..7
    return d * q.astype(np.float32)


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: 32 elements in 20 bytes.

        [f16 d][f16 m][16 bytes: byte j = q_j (low nibble) | q_{j+16} (high nibble)]     x_i = d * q_i + m
    """
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])                     # (n, 1) each
    q = _nibbles(blocks[:, 4:]).astype(np.float32)                        # (n, 32) in 0..15
    return d * q + m


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes = one little-endian uint32 per block -> (n, 32) bits, bit i is element i's 5th bit."""
    bits = qh.view(np.uint32) >> np.arange(32, dtype=np.uint32)           # (n, 1) >> (32,) -> (n, 32)
    return (bits & 1).astype(np.uint8)


def _dequant_q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0: 32 elements in 22 bytes.

        [f16 d][uint32 qh: bit i = high bit of q_i][16 bytes of low nibbles as in Q4_0]
        q_i = low_i | (bit_i << 4) in 0..31;   x_i = d * (q_i - 16)
    """
    d = _f16(blocks[:, :2])
    q = (_nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def _dequant_q5_1(blocks: np.ndarray) -> np.ndarray:
    """Q5_1: 32 elements in 24 bytes.

        [f16 d][f16 m][uint32 qh: bit i = high bit of q_i][16 bytes of low nibbles as in Q4_0]
        q_i = low_i | (bit_i << 4) in 0..31;   x_i = d * q_i + m
    """
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    q = (_nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)).astype(np.float32)
    return d * q + m


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 256 elements in 210 bytes, two halves of 128 elements.

        [ql: 128 bytes][qh: 64 bytes][scales: 16 x int8][f16 d]
        In half h (elements 128h .. 128h+127), with ql_h = ql[64h:64h+64], qh_h = qh[32h:32h+32]:
          low 4 bits:  elements 0..63 are ql_h & 0xF, elements 64..127 are ql_h >> 4
          high 2 bits: element 32k + l takes bits 2k, 2k+1 of qh_h[l]   (k = 0..3, l = 0..31)
        q = low | high << 4 in 0..63;   x_e = d * scales[e // 16] * (q_e - 32)
    """
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)                  # (n, 16)
    d = _f16(blocks[:, 208:210])                                                  # (n, 1)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)                            # (n, 2, 128)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = ((qh >> shifts) & 0x03).reshape(n, 2, 128)                             # (n, 2, 4, 32) -> (n, 2, 128)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    q = q.reshape(n, 16, 16)                                                      # (n, scale group, 16)
    return ((d * scales).reshape(n, 16, 1) * q).reshape(n, 256)


@dataclass(frozen=True)
class _GGMLType:
    """One ggml tensor type: `block` elements are stored in `size` bytes and decoded by `dequant`."""
    name: str
    block: int
    size: int
    dequant: Callable[[np.ndarray], np.ndarray]


_GGML_TYPES: dict[int, _GGMLType] = {
    0: _GGMLType("F32", 1, 4, _dequant_f32),
    1: _GGMLType("F16", 1, 2, _dequant_f16),
    2: _GGMLType("Q4_0", 32, 18, _dequant_q4_0),
    3: _GGMLType("Q4_1", 32, 20, _dequant_q4_1),
    6: _GGMLType("Q5_0", 32, 22, _dequant_q5_0),
    7: _GGMLType("Q5_1", 32, 24, _dequant_q5_1),
    8: _GGMLType("Q8_0", 32, 34, _dequant_q8_0),
    14: _GGMLType("Q6_K", 256, 210, _dequant_q6_k),
    30: _GGMLType("BF16", 1, 2, _dequant_bf16),
}
# Types that exist in ggml but that this reader does not decode; named only to make the error readable.
_GGML_OTHER_NAMES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}

# ---------------------------------------------------------------------------------------------------------
# GGUF: header parsing
# ---------------------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)        # v2 and v3 differ only in v3 allowing big-endian files, which we reject
_GGUF_DEFAULT_ALIGNMENT = 32
_GGUF_MAX_DIMS = 4
# Metadata value types 0..12: struct format for scalars; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_UINT32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9
# The fewest bytes a value of each type takes: a string is at least its length, an array its item type and count.
_GGUF_MIN_SIZE = {**{t: struct.calcsize(f) for t, f in _GGUF_SCALARS.items()}, _GGUF_STRING: 8, _GGUF_ARRAY: 12}
_GGUF_TODO = "the file is truncated, corrupt or not GGUF — delete it and get it again"


class _Cursor:
    """Reads little-endian values from a byte buffer, raising WeightFileError instead of running off its end."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise _fail(self.path, f"file ends at byte {len(self.buf)} while reading {what} at byte {self.pos}",
                        _GGUF_TODO)

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self, item_size: int, what: str) -> int:
        """A uint64 count of items of at least `item_size` bytes, refused before anything is built from it when
        that many items cannot fit in the bytes left."""
        n = self.unpack("<Q", what)
        if n * item_size > len(self.buf) - self.pos:
            raise _fail(self.path, f"{what} is {n}, but the file ends {len(self.buf) - self.pos} bytes later, too "
                                   f"soon for {n} items of {item_size} or more bytes", _GGUF_TODO)
        return n

    def bytes(self, n: int, what: str) -> memoryview:
        self._need(n, what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        try:
            return str(self.bytes(n, what), "utf-8")
        except UnicodeDecodeError:
            raise _fail(self.path, f"{what} at byte {self.pos - n} is not UTF-8", _GGUF_TODO) from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        """One metadata value of type `vtype` as a python scalar, str or (nested) list."""
        if vtype not in _GGUF_MIN_SIZE:
            raise _fail(self.path, f"metadata key '{key}' has unknown value type {vtype} (GGUF defines 0..12)",
                        _GGUF_TODO)
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype], f"the value of '{key}'")
        if vtype == _GGUF_STRING:
            return self.string(f"the value of '{key}'")
        if depth == _MAX_NESTING:
            raise _fail(self.path, f"metadata key '{key}' nests arrays deeper than {_MAX_NESTING}", _GGUF_TODO)
        item_type = self.unpack("<I", f"the item type of '{key}'")
        if item_type not in _GGUF_MIN_SIZE:
            self.value(item_type, key)  # raises: an unknown item type is refused even in an empty array
        count = self.count(_GGUF_MIN_SIZE[item_type], f"the length of '{key}'")
        if item_type in _GGUF_SCALARS:  # numeric arrays in one numpy call: token_type has ~50k items
            fmt = _GGUF_SCALARS[item_type]
            dtype = np.dtype(bool) if fmt == "<?" else np.dtype(fmt)
            raw = self.bytes(count * dtype.itemsize, f"the items of '{key}'")
            return np.frombuffer(raw, dtype=dtype).tolist()
        return [self.value(item_type, key, depth + 1) for _ in range(count)]


@dataclass
class GGUFFile:
    """A GGUF file read into memory.

    version:      the GGUF format version (2 or 3).
    metadata:     key -> python scalar, str or list, e.g. metadata["llama.block_count"] == 30.
    tensors:      name -> float32 tensor in TORCH shape order (reversed ggml dims), dequantized.
    tensor_types: name -> the ggml type it was stored as ('F32', 'Q4_1', ...).
    """
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tensor_types: dict[str, str]


def _open_gguf(path: Path) -> np.ndarray:
    """Memory-map a GGUF file as a read-only uint8 array after checking it exists and is big enough."""
    _check_exists(path, "GGUF")
    size = path.stat().st_size
    if size < 24:  # magic + version + two counts
        raise _fail(path, f"file is {size} bytes, shorter than the 24-byte GGUF header", _GGUF_TODO)
    return np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))


def _read_gguf_kv(path: Path, cur: _Cursor) -> tuple[int, int, dict[str, Any]]:
    """Parse magic, version, counts and the metadata. Returns (version, tensor_count, metadata)."""
    magic = bytes(cur.bytes(4, "the magic"))
    if magic != _GGUF_MAGIC:
        raise _fail(path, f"starts with {magic!r}, not the GGUF magic b'GGUF'",
                    "this is not a GGUF file — pass a .gguf file or a folder with model.safetensors")
    version = cur.unpack("<I", "the version")
    if version not in _GGUF_VERSIONS:
        raise _fail(path, f"GGUF version {version} is not supported (this reader knows versions "
                          f"{', '.join(map(str, _GGUF_VERSIONS))}, little-endian)",
                    "re-convert the model with a current llama.cpp convert script")
    tensor_count = cur.count(32, "the tensor count")   # a tensor info takes at least 32 bytes
    kv_count = cur.count(13, "the metadata count")      # a key/value pair at least 13
    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise _fail(path, f"metadata key '{key}' occurs twice", _GGUF_TODO)
        vtype = cur.unpack("<I", f"the value type of '{key}'")
        if key == "general.alignment" and vtype != _GGUF_UINT32:  # llama.cpp and gguf read it as a uint32 only
            raise _fail(path, f"general.alignment has value type {vtype}, not {_GGUF_UINT32} (uint32)", _GGUF_TODO)
        metadata[key] = cur.value(vtype, key)
    return version, tensor_count, metadata


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read only the metadata of a GGUF file (architecture, hyper-parameters, tokenizer); fast, no tensors."""
    path = Path(path)
    return _read_gguf_kv(path, _Cursor(memoryview(_open_gguf(path)), path))[2]


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor lives: ggml dims (ne0 fastest), type, and byte offset within the data section."""
    name: str
    dims: tuple[int, ...]
    ggml_type: _GGMLType
    offset: int
    nbytes: int


def _read_tensor_info(path: Path, cur: _Cursor) -> _TensorInfo:
    """Parse and check one tensor-info record."""
    name = cur.string("a tensor name")
    n_dims = cur.unpack("<I", f"the n_dims of '{name}'")
    if not 1 <= n_dims <= _GGUF_MAX_DIMS:
        raise _fail(path, f"tensor '{name}' has {n_dims} dims (ggml allows 1..{_GGUF_MAX_DIMS})", _GGUF_TODO)
    dims = tuple(cur.unpack("<Q", f"the dims of '{name}'") for _ in range(n_dims))
    type_id = cur.unpack("<I", f"the type of '{name}'")
    offset = cur.unpack("<Q", f"the offset of '{name}'")
    gtype = _GGML_TYPES.get(type_id)
    if gtype is None:
        known = _GGML_OTHER_NAMES.get(type_id, "unknown")
        raise _fail(path, f"tensor '{name}' has ggml type {type_id} ({known}), which this reader does not "
                          f"dequantize (supported: {', '.join(t.name for t in _GGML_TYPES.values())})",
                    "use a GGUF file quantized to one of those types, e.g. with llama.cpp's llama-quantize")
    if dims[0] % gtype.block:
        raise _fail(path, f"tensor '{name}' has ne0 = {dims[0]}, not a multiple of the {gtype.name} block "
                          f"size {gtype.block}", _GGUF_TODO)
    _check_dims(path, f"tensor '{name}'", dims, len(cur.buf) * gtype.block, _GGUF_TODO)  # a block takes a byte or more
    nbytes = math.prod(dims) // gtype.block * gtype.size
    return _TensorInfo(name, dims, gtype, offset, nbytes)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Read a GGUF file: metadata plus every tensor dequantized to float32 in torch shape order.

    Tensors are returned exactly as stored; llama.cpp's permutation of the Q/K projection rows (for its
    rotary embedding layout) is NOT undone here, the model loader does that.
    """
    path = Path(path)
    buf = _open_gguf(path)
    cur = _Cursor(memoryview(buf), path)
    version, tensor_count, metadata = _read_gguf_kv(path, cur)
    alignment = metadata.get("general.alignment", _GGUF_DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):  # ggml pads with a bit mask, which needs a power of two
        raise _fail(path, f"general.alignment is {alignment}, not a power of two", _GGUF_TODO)
    infos: dict[str, _TensorInfo] = {}
    for _ in range(tensor_count):
        info = _read_tensor_info(path, cur)
        if info.name in infos:
            raise _fail(path, f"tensor name '{info.name}' occurs twice", _GGUF_TODO)
        infos[info.name] = info
    data_start = cur.pos + (-cur.pos % alignment)
    tensors: dict[str, torch.Tensor] = {}
    tensor_types: dict[str, str] = {}
    expected = 0
    for info in infos.values():
        # llama.cpp's layout rule: each tensor starts where the one before it ends, padded to the alignment. Any
        # other offset (a gap, an overlap, a misaligned start) means the table does not describe the data.
        if info.offset != expected:
            raise _fail(path, f"tensor '{info.name}' starts at data offset {info.offset}, expected {expected} "
                              f"(right after the tensor before it, padded to {alignment} bytes)", _GGUF_TODO)
        expected += info.nbytes + (-info.nbytes % alignment)
        begin = data_start + info.offset
        if begin + info.nbytes > len(buf):
            raise _fail(path, f"tensor '{info.name}' data (bytes {begin}..{begin + info.nbytes}) runs past the "
                              f"end of the file ({len(buf)} bytes)", _GGUF_TODO)
        blocks = buf[begin:begin + info.nbytes].reshape(-1, info.ggml_type.size)   # (n_blocks, type_size)
        with np.errstate(invalid="ignore", over="ignore"):  # inf or NaN scales are what the file holds
            values = info.ggml_type.dequant(blocks)                                 # (n_blocks, block)
        shape = tuple(reversed(info.dims))                                          # torch order
        tensors[info.name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))
        tensor_types[info.name] = info.ggml_type.name
    return GGUFFile(version=version, metadata=metadata, tensors=tensors, tensor_types=tensor_types)
