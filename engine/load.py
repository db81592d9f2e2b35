"""Loading this node's slice into its own memory.

The model file stays a read-only memory map (zero-copy views, 64-bit offsets); loading
reads just the byte ranges of this node's slice with pread into anonymous memory
advised for transparent huge pages. Why copy at all:
- huge pages: fewer TLB misses on the weight stream (about 7% faster decode here);
- RSS is the slice, once: the map's pages are never touched, so they are not counted;
- it is the memory that gets locked (mlock) and that survives the file changing.
Column slices (attn_output, ffn_down on a node with part of the heads/FFN rows) are
read a band of rows at a time and packed, so the loaded slice is contiguous.
"""
from __future__ import annotations

import mmap
import os
from typing import Callable, Optional, Tuple

import numpy as np

from dllama_node.engine.weights import NodeWeights
from dllama_node.model import quants
from dllama_node.model.tensors import SliceSpec, TensorKind, Weight, tensor_table

KERNEL_TYPES = (quants.GGML_F32, quants.GGML_F16, quants.GGML_Q4_0, quants.GGML_Q8_0)
_DTYPES = {quants.GGML_F32: np.float32, quants.GGML_F16: np.float16}
_BAND_BYTES = 8 << 20


def anonymous_array(shape: Tuple[int, ...], dtype) -> np.ndarray:
    """Zero-filled array in its own anonymous mapping, advised for huge pages."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE") and nbytes >= (2 << 20):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # THP off or unsupported: plain pages
    return np.frombuffer(buf, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize).reshape(shape)


class SliceReader:
    """Reads byte ranges of a tensor's rows from the model file into anonymous arrays."""

    def __init__(self, model, progress: Optional[Callable[[int], None]] = None):
        self.model = model
        self.fd = os.open(model.path, os.O_RDONLY)
        self.progress = progress

    def close(self) -> None:
        os.close(self.fd)

    def _pread_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{self.model.path}: short read at byte {offset + done}")
            done += n
        if self.progress:
            self.progress(len(view))

    def read(self, name: str, rows: Tuple[int, int], col_bytes: Optional[Tuple[int, int]],
             loaded_type: int, view_shape_cols: int) -> np.ndarray:
        """Rows [r0, r1) of tensor `name`, optionally only bytes [b0, b1) of each row."""
        info = self.model.tensors[name]
        row_bytes = quants.row_bytes(info.ggml_type, info.shape[1])
        r0, r1 = rows
        b0, b1 = col_bytes if col_bytes is not None else (0, row_bytes)
        width = b1 - b0
        dtype = _DTYPES.get(loaded_type, np.uint8)
        out = anonymous_array((r1 - r0, view_shape_cols), dtype)
        if out.size == 0:       # a node without rows of this kind
            return out
        flat = out.view(np.uint8).reshape(r1 - r0, width)
        if width == row_bytes:
            self._pread_into(memoryview(flat).cast("B"), info.offset + r0 * row_bytes)
            return out
        band_rows = max(1, _BAND_BYTES // row_bytes)
        band = np.empty((band_rows, row_bytes), np.uint8)
        for start in range(r0, r1, band_rows):
            n = min(band_rows, r1 - start)
            self._pread_into(memoryview(band[:n]).cast("B"), info.offset + start * row_bytes)
            flat[start - r0:start - r0 + n] = band[:n, b0:b1]
        return out


def load_weights(model, spec: Optional[SliceSpec] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> NodeWeights:
    """NodeWeights of this node's slice, copied out of the file into its own memory.

    Tensors the file stores in a kernel type are read with pread; converted types were
    already copied by the model file when viewed. progress(bytes_done, bytes_total).
    """
    weights = NodeWeights.bind(model, spec)
    total = weights.nbytes()
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress(min(done[0], total), total)

    reader = SliceReader(model, advance)
    cfg, s = weights.config, weights.slice
    table = tensor_table(cfg)
    try:
        def load(kind: TensorKind, held, layer: Optional[int] = None):
            """This node's part of one tensor in its own memory: `held` is its view."""
            name = kind.source(cfg, layer)
            rows, cols = kind.cut_ranges(cfg, s)
            if rows is None:            # a vector: a plain copy
                arr = np.array(held)
                advance(arr.nbytes)
                return arr
            arr, wtype = held
            if model.tensors[name].ggml_type not in KERNEL_TYPES:
                advance(arr.nbytes)
                return held
            col_bytes = None
            if cols is not None:
                col_bytes = (quants.row_bytes(wtype, cols[0]), quants.row_bytes(wtype, cols[1]))
                if col_bytes == (0, quants.row_bytes(wtype, model.tensors[name].shape[1])):
                    col_bytes = None
            return Weight(reader.read(name, rows, col_bytes, wtype, arr.shape[1]), wtype)

        for i, lw in enumerate(weights.layers):
            for kind in table.layer:
                setattr(lw, kind.key, load(kind, getattr(lw, kind.key), i))
        for kind in table.tail:
            setattr(weights, kind.key, load(kind, getattr(weights, kind.key)))
    finally:
        reader.close()
    return weights
