"""What an all-reduce does to the numbers, in one place for every synchronizer.

The mesh: every node sends its partial output to every other node and adds all partials
in node order 0 .. N-1, each as it crossed the wire -- its own too, decoded from the very
bytes it sent -- so every node computes the same float operations on the same values and
holds a bit-identical sum, with no second trip.
With "q8_0" on the wire a vector of dim floats travels as dim/32 blocks of 34 bytes
(3.8x smaller than float32); "f32" is exact.
dim must be a multiple of 32 for q8_0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dllama_node.model import quants

WIRE_FORMATS = ("q8_0", "f32")


def check_wire(wire: str, dim: int) -> str:
    from dllama_node.common.errors import UsageError

    if wire not in WIRE_FORMATS:
        raise UsageError(f"wire format {wire!r}: expected one of {', '.join(WIRE_FORMATS)}")
    if wire == "q8_0" and dim % quants.QK:
        raise UsageError(f"wire format q8_0 needs dim to be a multiple of 32; this model's dim "
                         f"is {dim}: use --wire f32")
    return wire


def row_bytes(dim: int, wire: str) -> int:
    """Bytes one row of dim floats takes on the wire."""
    if wire == "f32":
        return 4 * dim
    return dim // quants.QK * quants.Q8_0_BLOCK_BYTES


def encode(x: np.ndarray, wire: str, out: np.ndarray = None) -> np.ndarray:
    """float32 (n, dim) -> the bytes that travel: uint8 (n, dim/32*34) or float32 itself."""
    if wire == "f32":
        return x
    from dllama_node import kernels

    if out is None:
        out = np.empty((x.shape[0], x.shape[1] // quants.QK * quants.Q8_0_BLOCK_BYTES), np.uint8)
    kernels.quantize_q8_0(x, out, 1)
    return out


def decode(data: np.ndarray, wire: str, out: np.ndarray = None) -> np.ndarray:
    """The travelling bytes -> float32 (n, dim); into `out` when given.

    q8_0 is read through strided views of the blocks (scales and int8 values in place,
    no copies): the same numbers as model/quants.py's dequantize_q8_0, a few times faster,
    which matters 44 times per token."""
    if wire == "f32":
        if out is not None and out is not data:
            out[...] = data
            return out
        return data
    data = np.ascontiguousarray(data)
    n, width = data.shape
    nb = width // quants.Q8_0_BLOCK_BYTES
    scales = np.ndarray((n, nb, 1), np.float16, buffer=data,
                        strides=(width, quants.Q8_0_BLOCK_BYTES, 2)).astype(np.float32)
    values = np.ndarray((n, nb, quants.QK), np.int8, buffer=data, offset=2,
                        strides=(width, quants.Q8_0_BLOCK_BYTES, 1))
    if out is None:
        out = np.empty((n, nb * quants.QK), np.float32)
    np.multiply(values, scales, out=out.reshape(n, nb, quants.QK))
    return out


def sum_parts_into(out: np.ndarray, encoded: Sequence[np.ndarray], wire: str,
                   scratch: np.ndarray) -> np.ndarray:
    """The mesh's sum: out (n, dim) float32 = decode(encoded[0]) + decode(encoded[1]) + ...
    added left to right in node order. scratch (n, dim) float32 holds one decoded part.
    Every node calls this with the same bytes and gets the same bits."""
    decode(encoded[0], wire, out)
    for part in encoded[1:]:
        out += decode(part, wire, scratch)
    return out


def _numpy_sum_parts_q8_0(parts: np.ndarray, out: np.ndarray) -> None:
    sum_parts_into(out, list(parts), "q8_0", np.empty_like(out))


def sum_parts_q8_0_kernel():
    """sum_parts_q8_0(parts uint8 (n_parts, n, width), out float32 (n, dim)): the compiled
    kernel (kernels/src/wire_sum.h, about 1 us for two TinyLlama rows), or this module's
    numpy arithmetic -- the same bits -- where the built extension predates it."""
    from dllama_node.kernels import _kernels

    return getattr(_kernels, "sum_parts_q8_0", _numpy_sum_parts_q8_0)


def reduce_parts(parts: Sequence[np.ndarray], wire: str) -> np.ndarray:
    """The all-reduced value every node continues with, from the partial outputs of
    nodes 0 (the root) .. N-1 -- the arithmetic of the TCP runtime, for the fake."""
    encoded = [encode(np.ascontiguousarray(p, dtype=np.float32), wire).copy() for p in parts]
    out = np.empty(parts[0].shape, np.float32)
    return sum_parts_into(out, encoded, wire, np.empty_like(out))
