"""GGUF files read without torch: the one validating parser every GGUF path uses (`read_gguf`), and the file's
tensors as zero-copy views of a memory map. It imports numpy and gguf-py's constants only, so header-only tools
(`lowbit inspect`) start in a fraction of a second; lowbit.formats.gguf builds models and writes files on top.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import CorruptFile, LowbitError

MAGIC = b"GGUF"
READ_VERSIONS = (2, 3)
WRITE_VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUF metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
                   FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_ARRAY_DTYPES = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
                 FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}

# ggml tensor types lowbit reads and writes: name -> (id, values per block, bytes per block)
FLOAT_TENSOR_TYPES = {"F32": (0, 1, 4), "F16": (1, 1, 2), "BF16": (30, 1, 2)}
# the block types lowbit.schemes.ggml implements (a test checks the two agree); ids and sizes are llama.cpp's
QUANTIZED_TYPE_NAMES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
TENSOR_TYPES = {**FLOAT_TENSOR_TYPES,
                **{name: (GGMLQuantizationType[name].value, *GGML_QUANT_SIZES[GGMLQuantizationType[name]])
                   for name in QUANTIZED_TYPE_NAMES}}
TYPE_NAMES = {v[0]: k for k, v in TENSOR_TYPES.items()}



@dataclass
class GGUFTensor:
    """One tensor of a GGUF file. `shape` is in PyTorch order (rows first); `data` the raw bytes or values."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    data: np.ndarray
    offset: int = 0

    @property
    def is_quantized(self) -> bool:
        return self.type_name in QUANTIZED_TYPE_NAMES

    def rows(self) -> np.ndarray:
        """Raw data as [rows, bytes_per_row] uint8 (the layout of GGMLScheme.from_blocks)."""
        flat = self.data.reshape(-1).view(np.uint8)
        return flat.reshape(math.prod(self.shape[:-1]), -1)

    def to_float(self) -> np.ndarray:
        """float32 values in PyTorch order."""
        if self.type_name == "F32":
            values = self.data.view("<f4")
        elif self.type_name == "F16":
            values = self.data.view("<f2").astype(np.float32)
        elif self.type_name == "BF16":
            values = (self.data.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            from lowbit.schemes.ggml import dequantize_rows   # torch: only when blocks are dequantized

            values = dequantize_rows(self.rows(), self.type_name)
        return np.asarray(values, dtype=np.float32).reshape(self.shape)


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata (key -> value, in file order), their types, and tensors by name."""

    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[int, int | None]]
    tensors: dict[str, GGUFTensor]
    alignment: int = DEFAULT_ALIGNMENT
    _map: Any = field(default=None, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def __deepcopy__(self, memo: dict) -> GGUFFile:
        return self          # read-only: a copied model shares the mapping (its tensors are copied by torch)

    def __reduce__(self):
        return read_gguf, (self.path,)     # a pickled model maps the file again where it is unpickled

    def without_tokenizer_arrays(self) -> GGUFFile:
        """This file (its mapping, tensors and metadata) without the tokenizer's arrays (vocabulary, merges, scores,
        token types): what a loaded model keeps. The tokenizer holds them once built, and as Python lists they are
        tens of MB (37 MB for Gemma-3's 262k tokens and scores); the architecture's arrays (per-layer head counts,
        rope sections) stay."""
        kept = {key: value for key, value in self.metadata.items()
                if not (isinstance(value, list) and key.startswith("tokenizer."))}
        return replace(self, metadata=kept, value_types={key: self.value_types[key] for key in kept})

    def release_pages(self) -> None:
        """Let the OS drop this process's resident pages of the file (they are re-read on the next access)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._map.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


# -- reading ---------------------------------------------------------------------------------------------
_LENGTH = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file; every overrun is a CorruptFile."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> CorruptFile:
        return CorruptFile(f"{self.path}: {what}; the file is truncated or corrupt, re-download or re-export it")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"unexpected end of file while reading {what} at byte {self.pos}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, vtype: int, what: str):
        fmt = _SCALAR_FORMATS[vtype]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar(UINT64, f"the length of {what}")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def strings(self, count: int, what: str) -> list[str]:
        """`count` length-prefixed strings: the vocabularies and merges of 150k-token tokenizers, so the loop
        reads the buffer directly instead of through take()/scalar() (4x faster; the same checks)."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        unpack_length = _LENGTH.unpack_from
        out: list[str] = []
        append = out.append
        index = 0
        try:
            for index in range(count):
                (n,) = unpack_length(buf, pos)
                pos += 8
                if pos + n > size:
                    raise struct.error
                append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except struct.error:
            raise self.fail(f"unexpected end of file while reading {what}[{index}] at byte {pos}") from None
        except UnicodeDecodeError:
            raise self.fail(f"{what}[{index}] is not valid UTF-8") from None
        self.pos = pos
        return out

    def value(self, vtype: int, what: str):
        if vtype == STRING:
            return self.string(what)
        if vtype in _SCALAR_FORMATS:
            return self.scalar(vtype, what)
        if vtype == ARRAY:
            sub = self.scalar(UINT32, f"the element type of {what}")
            count = self.scalar(UINT64, f"the length of {what}")
            if sub == STRING:
                if count > len(self.buf) - self.pos:  # each string needs at least its 8-byte length
                    raise self.fail(f"{what} claims {count} strings, more than the file holds")
                return self.strings(count, what), sub
            if sub == ARRAY or sub not in _ARRAY_DTYPES:
                raise self.fail(f"{what} has unsupported array element type {sub}")
            dtype = np.dtype(_ARRAY_DTYPES[sub])
            raw = self.take(count * dtype.itemsize, what)
            values = np.frombuffer(raw, dtype=dtype)
            return (values.astype(bool) if sub == BOOL else values).tolist(), sub
        raise self.fail(f"{what} has unknown value type {vtype}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file; tensor data stay on disk (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"GGUF file {path} not found")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise CorruptFile(f"{path}: only {size} bytes, too short for a GGUF header; the file is truncated")
        # copy-on-write: tensors built on the pages are writable for torch (the file itself never is)
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    cur = _Cursor(memoryview(mapped), path)
    magic = bytes(cur.take(4, "the magic"))
    if magic != MAGIC:
        raise CorruptFile(f"{path}: bad magic {magic!r} (expected b'GGUF'); this is not a GGUF file")
    version = cur.scalar(UINT32, "the version")
    if version not in READ_VERSIONS:
        raise CorruptFile(f"{path}: GGUF version {version} is not supported (lowbit reads versions "
                          f"{', '.join(map(str, READ_VERSIONS))}); re-convert it with a current llama.cpp")
    n_tensors = cur.scalar(UINT64, "the tensor count")
    n_kv = cur.scalar(UINT64, "the key-value count")
    if n_tensors > size // 24 or n_kv > size // 12:  # each entry needs at least that many bytes
        raise cur.fail(f"header claims {n_tensors} tensors and {n_kv} key-values, more than {size} bytes hold")

    metadata: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        if key in metadata:
            raise CorruptFile(f"{path}: duplicate metadata key {key!r}; the file is malformed")
        vtype = cur.scalar(UINT32, f"the type of {key}")
        value = cur.value(vtype, key)
        sub = None
        if vtype == ARRAY:
            value, sub = value
        metadata[key], types[key] = value, (vtype, sub)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise CorruptFile(f"{path}: general.alignment {alignment!r} is not a power of two")

    infos = []
    names = set()
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}")
        if name in names:
            raise CorruptFile(f"{path}: duplicate tensor name {name!r}; the file is malformed")
        names.add(name)
        n_dims = cur.scalar(UINT32, f"the rank of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CorruptFile(f"{path}: tensor {name} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        ne = [cur.scalar(UINT64, f"the shape of {name}") for _ in range(n_dims)]
        type_id = cur.scalar(UINT32, f"the type of {name}")
        offset = cur.scalar(UINT64, f"the offset of {name}")
        if type_id not in TYPE_NAMES:
            raise CorruptFile(f"{path}: tensor {name} has ggml type {type_id}, which lowbit does not know "
                              f"(supported: {', '.join(TENSOR_TYPES)}); re-quantize it to one of those")
        infos.append((name, ne, TYPE_NAMES[type_id], offset))
    data_start = -(-cur.pos // alignment) * alignment
    data_size = size - data_start
    if data_size < 0 and infos:  # a file without tensors may end right after its header
        raise cur.fail("the data section starts past the end of the file")

    tensors: dict[str, GGUFTensor] = {}
    for name, ne, type_name, offset in infos:
        _, block, type_size = TENSOR_TYPES[type_name]
        if min(ne) < 1:
            raise CorruptFile(f"{path}: tensor {name} has shape {ne} with an empty dimension; the file is corrupt")
        if ne[0] % block:
            raise CorruptFile(f"{path}: tensor {name} has rows of {ne[0]} values, not a multiple of the "
                              f"{type_name} block size {block}")
        n_rows = math.prod(ne[1:])          # Python integers: a shape of 2**63 x 4 cannot wrap around
        nbytes = n_rows * (ne[0] // block) * type_size
        if offset % alignment:
            raise CorruptFile(f"{path}: tensor {name} starts at offset {offset}, not aligned to {alignment} bytes")
        if offset + nbytes > data_size:
            raise CorruptFile(f"{path}: tensor {name} needs bytes {offset}..{offset + nbytes} of the data section "
                              f"but it holds only {data_size}; the file is truncated or corrupt")
        data = np.frombuffer(mapped, dtype=np.uint8, count=nbytes, offset=data_start + offset)
        tensors[name] = GGUFTensor(name, type_name, tuple(int(d) for d in reversed(ne)), data, offset)
    check_tiling(path, sorted((t.offset, t.offset + t.data.size, t.name) for t in tensors.values()), alignment,
                 data_size)
    return GGUFFile(path, version, metadata, types, tensors, alignment, mapped)


def check_tiling(path: Path, spans: list[tuple[int, int, str]], alignment: int, data_size: int) -> None:
    """Tensors tile the data section as GGUF writers lay them out: in some order, each starting at the aligned end
    of the one before, the first at 0, and the file ends at the last one's (aligned) end. An overlap, or a gap (a
    tensor whose type or shape in the header was changed to one of fewer bytes: the bytes would be read as
    something they are not), is a corrupt file."""
    expected, expected_end, previous = 0, 0, None
    for start, end, name in spans:
        if previous is not None and start < expected_end:
            raise CorruptFile(f"{path}: tensors {previous} and {name} overlap in the data section; the file is "
                              "malformed")
        if start != expected:
            where = f"after tensor {previous}" if previous else "at the start of the data section"
            raise CorruptFile(f"{path}: {start - expected} bytes {where} belong to no tensor (tensor {name} starts "
                              f"at {start}, expected {expected}); a tensor's type or shape in the header is wrong")
        expected_end = end
        expected = -(-end // alignment) * alignment
        previous = name
    # llama.cpp's and gguf-py's writers pad the last tensor like the others, so a file that goes on past that
    # padding has a last tensor whose type or shape was shrunk (the same gap as above), or foreign data appended
    if previous is not None and data_size > expected:
        raise CorruptFile(f"{path}: {data_size - expected} bytes after the last tensor ({previous}, ending at "
                          f"{expected_end}) belong to no tensor; a tensor's type or shape in the header is wrong, or "
                          "data was appended to the file")
