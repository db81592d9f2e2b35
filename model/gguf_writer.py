"""Our own GGUF v3 writer: metadata of every value type, tensor index, streaming data.

The .deb cannot depend on the PyPI `gguf` package, so the generator and the tools
write GGUF through this module. Tensor data goes to disk one tensor (or one chunk)
at a time, so a 1.1B model never sits in memory whole:

    with GGUFWriter(path) as w:
        w.add("general.architecture", "llama")
        w.add("llama.block_count", 22)                        # UINT32 by inference
        w.add("tokenizer.ggml.scores", scores)                # float32 ndarray -> ARRAY of FLOAT32
        w.add_tensor_info("token_embd.weight", (32000, 2048), GGML_Q4_0)
        ...
        w.write_header()
        w.write_tensor("token_embd.weight", data)             # or an iterable of chunks

Offsets follow the format: the data section starts at the first multiple of the
alignment after the tensor index, and every tensor starts at a multiple of it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from dllama_node.model import quants
from dllama_node.model.gguf import (GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, SCALAR_DTYPES,
                                    ValueType)

log = logging.getLogger(__name__)

Chunk = Union[bytes, bytearray, memoryview, np.ndarray]


def _encode_string(s: str) -> bytes:
    b = s.encode("utf-8", errors="surrogateescape")
    return len(b).to_bytes(8, "little") + b


def _infer_int_type(values: Iterable[int]) -> ValueType:
    lo = min(values, default=0)
    hi = max(values, default=0)
    if lo >= 0:
        return ValueType.UINT32 if hi < 2 ** 32 else ValueType.UINT64
    return ValueType.INT32 if lo >= -2 ** 31 and hi < 2 ** 31 else ValueType.INT64


def _dtype_value_type(dtype: np.dtype) -> ValueType:
    if dtype == np.bool_:
        return ValueType.BOOL
    for vt, dt in SCALAR_DTYPES.items():
        if vt != ValueType.BOOL and dt == dtype.newbyteorder("<"):
            return vt
    raise TypeError(f"no GGUF value type for numpy dtype {dtype}")


def infer_value_type(value: Any) -> Tuple[ValueType, Optional[ValueType]]:
    """The (value type, array element type) a Python or numpy value is written as.

    bool -> BOOL, int -> UINT32 (INT32 when negative, 64-bit when it does not fit),
    float -> FLOAT32, str -> STRING, list/tuple/ndarray -> ARRAY of the inferred type."""
    if isinstance(value, (bool, np.bool_)):
        return ValueType.BOOL, None
    if isinstance(value, np.generic):
        return _dtype_value_type(value.dtype), None
    if isinstance(value, int):
        return _infer_int_type([value]), None
    if isinstance(value, float):
        return ValueType.FLOAT32, None
    if isinstance(value, str):
        return ValueType.STRING, None
    if isinstance(value, np.ndarray):
        return ValueType.ARRAY, _dtype_value_type(value.dtype)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return ValueType.ARRAY, ValueType.STRING
        if all(isinstance(v, (bool, np.bool_)) for v in value):
            return ValueType.ARRAY, ValueType.BOOL
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if -2 ** 31 <= min(value) and max(value) < 2 ** 31:
                return ValueType.ARRAY, ValueType.INT32
            return ValueType.ARRAY, _infer_int_type(value)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return ValueType.ARRAY, ValueType.FLOAT32
        raise TypeError("a GGUF array holds values of one type")
    raise TypeError(f"no GGUF value type for {type(value).__name__}")


def encode_value(value: Any, vtype: ValueType, etype: Optional[ValueType] = None) -> bytes:
    """The bytes of one value (without its type tag)."""
    if vtype == ValueType.STRING:
        return _encode_string(value)
    if vtype == ValueType.ARRAY:
        if etype is None or etype == ValueType.ARRAY:
            raise TypeError("an array needs a scalar element type")
        head = int(etype).to_bytes(4, "little") + len(value).to_bytes(8, "little")
        if etype == ValueType.STRING:
            return head + b"".join(_encode_string(s) for s in value)
        arr = np.asarray(value)
        if etype == ValueType.BOOL:
            arr = arr.astype(bool)
        return head + np.ascontiguousarray(arr, dtype=SCALAR_DTYPES[etype]).tobytes()
    if vtype == ValueType.BOOL:
        return b"\x01" if value else b"\x00"
    return np.asarray(value, dtype=SCALAR_DTYPES[vtype]).tobytes()


class GGUFWriter:
    """Writes one GGUF v3 file: add metadata and tensor infos, write_header, then each
    tensor's data in the order the infos were added."""

    def __init__(self, path: Union[str, os.PathLike], alignment: int = GGUF_DEFAULT_ALIGNMENT):
        if alignment <= 0:
            raise ValueError(f"alignment {alignment} must be positive")
        self.path = os.fspath(path)
        self.alignment = int(alignment)
        self._kv: Dict[str, bytes] = {}
        self._tensors: List[Tuple[str, Tuple[int, ...], int, int, int]] = []  # name, shape, type, rel offset, nbytes
        self._next_rel = 0
        self._f = None
        self._next_tensor = 0
        self.data_offset: Optional[int] = None
        if self.alignment != GGUF_DEFAULT_ALIGNMENT:
            self.add("general.alignment", self.alignment, ValueType.UINT32)

    # -- metadata and index ---------------------------------------------------------
    def add(self, key: str, value: Any, value_type: Optional[ValueType] = None,
            element_type: Optional[ValueType] = None) -> None:
        """Add one metadata entry; the type is inferred unless given."""
        if self._f is not None:
            raise RuntimeError("metadata must be added before write_header()")
        if key in self._kv:
            raise ValueError(f"metadata key {key} added twice")
        if value_type is None:
            value_type, inferred = infer_value_type(value)
            element_type = element_type or inferred
        value_type = ValueType(value_type)
        self._kv[key] = _encode_string(key) + int(value_type).to_bytes(4, "little") + \
            encode_value(value, value_type, element_type)

    def add_tensor_info(self, name: str, shape: Tuple[int, ...], ggml_type: int) -> None:
        """Announce a tensor: shape in numpy order (rows, cols), stored as ggml_type."""
        if self._f is not None:
            raise RuntimeError("tensor infos must be added before write_header()")
        t = quants.GGML_TYPES[int(ggml_type)]
        shape = tuple(int(s) for s in shape)
        if shape[-1] % t.block_size:
            raise ValueError(f"tensor {name}: row length {shape[-1]} is not a multiple of the "
                             f"{t.name} block size {t.block_size}")
        if any(n == name for n, *_ in self._tensors):
            raise ValueError(f"tensor {name} added twice")
        n_values = 1
        for s in shape:
            n_values *= s
        nbytes = n_values // t.block_size * t.block_bytes
        self._tensors.append((name, shape, int(ggml_type), self._next_rel, nbytes))
        self._next_rel = _align(self._next_rel + nbytes, self.alignment)

    @property
    def total_size(self) -> int:
        """Bytes of the finished file (known once write_header() has run)."""
        if self.data_offset is None:
            raise RuntimeError("write_header() first")
        if not self._tensors:
            return self.data_offset
        _, _, _, rel, nbytes = self._tensors[-1]
        return self.data_offset + rel + nbytes

    def tensor_offset(self, name: str) -> int:
        """Absolute byte offset of a tensor's data (after write_header())."""
        for n, _, _, rel, _ in self._tensors:
            if n == name:
                return self.data_offset + rel
        raise KeyError(name)

    def tensor_nbytes(self) -> Dict[str, int]:
        return {n: nbytes for n, _, _, _, nbytes in self._tensors}

    def write_header(self) -> None:
        """Write magic, counts, metadata, tensor index and the padding to the data section."""
        parts = [GGUF_MAGIC, (3).to_bytes(4, "little"), len(self._tensors).to_bytes(8, "little"),
                 len(self._kv).to_bytes(8, "little")]
        parts.extend(self._kv.values())
        for name, shape, ggml_type, rel, _ in self._tensors:
            parts.append(_encode_string(name))
            parts.append(len(shape).to_bytes(4, "little"))
            parts.extend(int(s).to_bytes(8, "little") for s in reversed(shape))
            parts.append(ggml_type.to_bytes(4, "little") + rel.to_bytes(8, "little"))
        header = b"".join(parts)
        self.data_offset = _align(len(header), self.alignment)
        self._f = open(self.path, "wb")
        self._f.write(header)
        self._f.write(b"\0" * (self.data_offset - len(header)))
        log.debug("wrote GGUF header of %d bytes, %d metadata entries, %d tensors to %s",
                  len(header), len(self._kv), len(self._tensors), self.path)

    # -- data -----------------------------------------------------------------------
    def _expect(self, name: str) -> Tuple[str, Tuple[int, ...], int, int, int]:
        if self._f is None:
            raise RuntimeError("write_header() first")
        if self._next_tensor >= len(self._tensors):
            raise ValueError(f"tensor {name}: every announced tensor is already written")
        entry = self._tensors[self._next_tensor]
        if entry[0] != name:
            raise ValueError(f"tensor {name} written out of order: {entry[0]} is next")
        return entry

    def write_tensor(self, name: str, data: Union[Chunk, Iterable[Chunk]]) -> None:
        """Write the next tensor's bytes, as stored: one array/bytes object, or an
        iterable of chunks (each a numpy array or bytes) written as they come."""
        _, _, _, rel, nbytes = self._expect(name)
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)) else data
        written = 0
        for chunk in chunks:
            if isinstance(chunk, np.ndarray):
                if chunk.dtype.byteorder == ">":
                    chunk = chunk.astype(chunk.dtype.newbyteorder("<"))
                chunk = np.ascontiguousarray(chunk)
                buf = memoryview(chunk.reshape(-1).view(np.uint8))
            else:
                buf = memoryview(chunk).cast("B")
            if written + len(buf) > nbytes:
                raise ValueError(f"tensor {name}: more than the expected {nbytes} bytes")
            self._f.write(buf)
            written += len(buf)
        if written != nbytes:
            raise ValueError(f"tensor {name}: wrote {written} bytes, expected {nbytes}")
        self._finish_tensor(rel, nbytes)

    def skip_tensor(self, name: str) -> None:
        """Leave the next tensor's bytes as a hole (zeros; sparse on disk). For test files."""
        _, _, _, rel, nbytes = self._expect(name)
        self._f.seek(nbytes, os.SEEK_CUR)
        self._finish_tensor(rel, nbytes)

    def _finish_tensor(self, rel: int, nbytes: int) -> None:
        self._next_tensor += 1
        if self._next_tensor < len(self._tensors):
            pad = self._tensors[self._next_tensor][3] - (rel + nbytes)
            self._f.write(b"\0" * pad)

    def close(self) -> None:
        """Finish the file; raises if an announced tensor was never written."""
        if self._f is None:
            return
        try:
            missing = [n for n, *_ in self._tensors[self._next_tensor:]]
            end = self._f.tell()
            self._f.truncate(end)       # a trailing skipped tensor still makes the file whole
            if missing:
                raise ValueError(f"{self.path}: tensors never written: {', '.join(missing[:5])}"
                                 + (" ..." if len(missing) > 5 else ""))
        finally:
            self._f.close()
            self._f = None

    def __enter__(self) -> "GGUFWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._f is not None:
            self._f.close()
            self._f = None
            return
        self.close()


def _align(x: int, alignment: int) -> int:
    return (x + alignment - 1) // alignment * alignment
