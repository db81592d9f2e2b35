"""What an all-reduce does to the numbers, in one place for every synchronizer.

The root adds the partial outputs in node order: its own (exact), then each worker's
as it crossed the wire. The sum crosses the wire back, and every node -- the root too --
continues from the sum as received, so all nodes hold the same residual stream.
With "q8_0" on the wire a vector of dim floats travels as dim/32 blocks of 34 bytes
(3.8x smaller than float32); "f32" is exact. dim must be a multiple of 32 for q8_0.
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


def reduce_parts(parts: Sequence[np.ndarray], wire: str) -> np.ndarray:
    """The all-reduced value every node continues with, from the partial outputs of
    nodes 0 (the root) .. N-1 -- the arithmetic of the TCP runtime, for the fake."""
    total = parts[0].astype(np.float32, copy=True)
    for part in parts[1:]:
        total += decode(encode(np.ascontiguousarray(part), wire), wire)
    return decode(encode(total, wire), wire).astype(np.float32, copy=False)
