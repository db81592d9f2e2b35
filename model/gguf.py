"""GGUF files: the header parser (metadata and tensor index), with no model semantics.

Layout (all little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    u32 magic "GGUF" | u32 version (2 or 3) | u64 tensor_count | u64 kv_count
    kv_count x  (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml_type, u64 offset)
    padding to general.alignment (default 32), then the data section;
    a tensor's bytes are [data_offset + offset, data_offset + offset + nbytes).

A string is u64 length + UTF-8 bytes; an array is u32 element type, u64 count, elements.
ne[0] is the number of values in a row: the numpy shape is ne reversed.

The header is read through a growing buffer, never the whole file, and every count is
checked against the bytes left before anything is allocated: a corrupt header that
claims 10^12 array elements fails with a message, it does not exhaust memory.
"""
from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np

from dllama_node.common.errors import ModelFileError, UnsupportedModelError
from dllama_node.model import quants

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4


class ValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numpy dtype of each fixed-size value type.
SCALAR_DTYPES = {
    ValueType.UINT8: np.dtype("<u1"), ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"), ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"), ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"), ValueType.BOOL: np.dtype("<u1"),
    ValueType.UINT64: np.dtype("<u8"), ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}

# Smallest encodings, for checking counts against the bytes left.
_MIN_KV_BYTES = 8 + 4 + 1          # empty key, type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_HEADER_BYTES = 4 + 4 + 8 + 8
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor index. shape is numpy order (ne reversed)."""

    name: str
    ggml_type: int
    shape: Tuple[int, ...]
    offset: int          # absolute byte offset in the file
    nbytes: int

    @property
    def n_values(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class GGUFFile:
    """What the header says: metadata (arrays as lists), the tensor index, the layout."""

    path: str
    version: int
    metadata: Dict[str, Any]
    value_types: Dict[str, Tuple[ValueType, ValueType | None]]   # key -> (type, array element type)
    tensors: Dict[str, GGUFTensor]
    alignment: int
    data_offset: int
    file_size: int
    header_bytes: int = field(default=0)    # end of the tensor index, before the padding


class _HeaderReader:
    """Sequential reads from the start of a file through a buffer that grows on demand."""

    def __init__(self, f, path: str, file_size: int):
        self._f = f
        self.path = path
        self.file_size = file_size
        self._buf = bytearray()
        self.pos = 0

    def left(self) -> int:
        return self.file_size - self.pos

    def take(self, n: int, what: str) -> memoryview:
        """The next n bytes (0 <= n), or a truncation error naming the byte and the read."""
        end = self.pos + n
        if end > self.file_size:
            raise ModelFileError(
                f"{self.path}: truncated header: reading {what} at byte {self.pos} needs "
                f"{n} bytes, the file has {self.file_size} bytes")
        if end > len(self._buf):
            want = min(self.file_size, max(end, 2 * len(self._buf), 1 << 20)) - len(self._buf)
            self._f.seek(len(self._buf))
            chunk = self._f.read(want)
            if len(chunk) != want:
                raise ModelFileError(f"{self.path}: short read at byte {len(self._buf)} "
                                     f"(file changed while reading?)")
            self._buf += chunk
        view = memoryview(self._buf)[self.pos:end]
        self.pos = end
        return view

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little")

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > self.left():
            raise ModelFileError(
                f"{self.path}: {what} at byte {self.pos - 8} claims {n} bytes, only "
                f"{self.left()} bytes are left in the file")
        return bytes(self.take(n, what)).decode("utf-8", errors="surrogateescape")

    def strings(self, count: int, what: str) -> List[str]:
        """count strings (a tokenizer's 128k tokens and 280k merges): a tight loop over the
        buffer, falling back to string() where a string crosses the buffer's end."""
        out: List[str] = []
        unpack = _U64.unpack_from
        buf, pos, end = self._buf, self.pos, len(self._buf)
        for i in range(count):
            if pos + 8 <= end:
                n = unpack(buf, pos)[0]
                if pos + 8 + n <= end:
                    out.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="surrogateescape"))
                    pos += 8 + n
                    continue
            self.pos = pos
            out.append(self.string(f"{what}[{i}]"))
            buf, pos, end = self._buf, self.pos, len(self._buf)
        self.pos = pos
        return out

    def value(self, vtype: int, what: str) -> Tuple[Any, ValueType | None]:
        """One metadata value of type vtype -> (python value, array element type)."""
        try:
            vtype = ValueType(vtype)
        except ValueError:
            raise ModelFileError(f"{self.path}: {what} has unknown value type {vtype} "
                                 f"(byte {self.pos - 4})") from None
        if vtype == ValueType.STRING:
            return self.string(what), None
        if vtype == ValueType.ARRAY:
            etype_raw = self.u32(f"element type of {what}")
            count = self.u64(f"element count of {what}")
            try:
                etype = ValueType(etype_raw)
            except ValueError:
                raise ModelFileError(f"{self.path}: {what} is an array of unknown value type "
                                     f"{etype_raw}") from None
            if etype == ValueType.ARRAY:
                raise ModelFileError(f"{self.path}: {what} is an array of arrays (not supported)")
            min_item = 8 if etype == ValueType.STRING else SCALAR_DTYPES[etype].itemsize
            if count * min_item > self.left():
                raise ModelFileError(
                    f"{self.path}: {what} claims {count} elements ({count * min_item} bytes "
                    f"or more) at byte {self.pos}, only {self.left()} bytes are left in the file")
            if etype == ValueType.STRING:
                return self.strings(count, what), etype
            dtype = SCALAR_DTYPES[etype]
            raw = self.take(count * dtype.itemsize, what)
            arr = np.frombuffer(raw, dtype=dtype, count=count)
            if etype == ValueType.BOOL:
                return [bool(x) for x in arr], etype
            return arr.tolist(), etype
        dtype = SCALAR_DTYPES[vtype]
        x = np.frombuffer(self.take(dtype.itemsize, what), dtype=dtype)[0]
        if vtype == ValueType.BOOL:
            return bool(x), None
        if vtype == ValueType.FLOAT32:
            return float(str(x)), None       # shortest decimal that is this float32: 1e-05
        return x.item(), None


def read_gguf(path: str) -> GGUFFile:
    """Parse the header of a GGUF file and lay out its tensors.

    Raises ModelFileError (missing file, wrong magic, truncated header, counts that
    overflow the file, a tensor whose data lies outside the file, bad dimensions) and
    UnsupportedModelError (version, unknown tensor type)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path} does not exist" if not os.path.exists(path)
                             else f"model file {path} is not a regular file")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        r = _HeaderReader(f, path, file_size)
        magic = bytes(r.take(4, "the magic"))
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{path}: not a GGUF file: starts with {magic!r}, "
                                 f"a GGUF file starts with {GGUF_MAGIC!r}")
        version = r.u32("the version")
        if version not in GGUF_VERSIONS:
            hint = ""
            if version & 0xFFFF == 0 and (version >> 24) in GGUF_VERSIONS:
                hint = f" (a big-endian GGUF v{version >> 24} file?)"
            raise UnsupportedModelError(
                f"{path}: GGUF version {version} is not supported{hint}; "
                f"supported: {', '.join(map(str, GGUF_VERSIONS))}")
        n_tensors = r.u64("the tensor count")
        n_kv = r.u64("the metadata count")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > r.left():
            raise ModelFileError(
                f"{path}: header claims {n_kv} metadata entries and {n_tensors} tensors "
                f"(at least {n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES} bytes), "
                f"the file has {r.left()} bytes after byte {_HEADER_BYTES}")

        metadata: Dict[str, Any] = {}
        value_types: Dict[str, Tuple[ValueType, ValueType | None]] = {}
        for i in range(n_kv):
            key = r.string(f"the key of metadata entry {i}")
            vtype = r.u32(f"the value type of {key}")
            value, etype = r.value(vtype, key)
            if key in metadata:
                raise ModelFileError(f"{path}: metadata key {key} appears twice")
            metadata[key] = value
            value_types[key] = (ValueType(vtype), etype)

        alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            raise ModelFileError(f"{path}: general.alignment is {alignment!r}, expected a "
                                 f"positive integer")

        infos: List[Tuple[str, int, Tuple[int, ...], int]] = []
        for i in range(n_tensors):
            name = r.string(f"the name of tensor {i}")
            n_dims = r.u32(f"the dimension count of tensor {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise ModelFileError(f"{path}: tensor {name} has {n_dims} dimensions, "
                                     f"expected 1 to {GGML_MAX_DIMS}")
            ne = [r.u64(f"dimension {d} of tensor {name}") for d in range(n_dims)]
            ggml_type = r.u32(f"the type of tensor {name}")
            offset = r.u64(f"the data offset of tensor {name}")
            infos.append((name, ggml_type, tuple(reversed(ne)), offset))
        header_bytes = r.pos

    data_offset = _align(header_bytes, alignment)
    tensors: Dict[str, GGUFTensor] = {}
    for name, ggml_type, shape, offset in infos:
        t = quants.GGML_TYPES.get(ggml_type)
        if t is None:
            raise UnsupportedModelError(f"{path}: tensor {name} has {quants.type_name(ggml_type)}, "
                                        f"which GGML does not define")
        cols = shape[-1]
        if cols % t.block_size:
            raise ModelFileError(f"tensor {name}: row length {cols} is not a multiple of the "
                                 f"{t.name} block size {t.block_size}")
        if offset % alignment:
            raise ModelFileError(f"tensor {name}: data offset {offset} is not a multiple of the "
                                 f"alignment {alignment}")
        n_values = 1
        for s in shape:
            n_values *= s
        nbytes = n_values // t.block_size * t.block_bytes
        start = data_offset + offset
        if start + nbytes > file_size:
            raise ModelFileError(f"tensor {name}: data ends at byte {start + nbytes}, file has "
                                 f"{file_size} bytes (truncated?)")
        if name in tensors:
            raise ModelFileError(f"{path}: tensor {name} appears twice in the tensor index")
        tensors[name] = GGUFTensor(name, ggml_type, shape, start, nbytes)
    return GGUFFile(path, version, metadata, value_types, tensors, alignment, data_offset,
                    file_size, header_bytes)


def _align(x: int, alignment: int) -> int:
    return (x + alignment - 1) // alignment * alignment


def peek_magic(path: str, n: int = 8) -> bytes:
    """The first n bytes of a file (fewer when it is shorter)."""
    with open(path, "rb") as f:
        return f.read(n)

