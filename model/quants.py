"""Block quantization formats, in numpy: the reference the C kernels are tested against.

Bit-exact with GGML (ggml-quants.c quantize_row_*_ref) and with the `gguf` package's
quants.py. Blocks are 32 values; a quantized row of k values is k // 32 blocks of bytes.

    q4_0: 18 bytes = f16 d, 16 bytes qs; element j (j < 16) is the low nibble of qs[j],
          element j + 16 its high nibble; value = (nibble - 8) * d
    q8_0: 34 bytes = f16 d, 32 int8 qs; value = q * d
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK = 32
Q4_0_BLOCK_BYTES = 18
Q8_0_BLOCK_BYTES = 34

# GGML type ids.
GGML_F32 = 0
GGML_F16 = 1
GGML_Q4_0 = 2
GGML_Q8_0 = 8
GGML_BF16 = 30


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: block_size values are stored in block_bytes bytes."""

    type_id: int
    name: str
    block_size: int
    block_bytes: int


# Every type a GGUF file may carry (ids and sizes as in ggml.h / gguf-py constants).
# Knowing a type's size lets the reader lay out a file even when it cannot convert it.
GGML_TYPES = {t.type_id: t for t in (
    GGMLType(0, "F32", 1, 4), GGMLType(1, "F16", 1, 2),
    GGMLType(2, "Q4_0", 32, 18), GGMLType(3, "Q4_1", 32, 20),
    GGMLType(6, "Q5_0", 32, 22), GGMLType(7, "Q5_1", 32, 24),
    GGMLType(8, "Q8_0", 32, 34), GGMLType(9, "Q8_1", 32, 36),
    GGMLType(10, "Q2_K", 256, 84), GGMLType(11, "Q3_K", 256, 110),
    GGMLType(12, "Q4_K", 256, 144), GGMLType(13, "Q5_K", 256, 176),
    GGMLType(14, "Q6_K", 256, 210), GGMLType(15, "Q8_K", 256, 292),
    GGMLType(16, "IQ2_XXS", 256, 66), GGMLType(17, "IQ2_XS", 256, 74),
    GGMLType(18, "IQ3_XXS", 256, 98), GGMLType(19, "IQ1_S", 256, 50),
    GGMLType(20, "IQ4_NL", 32, 18), GGMLType(21, "IQ3_S", 256, 110),
    GGMLType(22, "IQ2_S", 256, 82), GGMLType(23, "IQ4_XS", 256, 136),
    GGMLType(24, "I8", 1, 1), GGMLType(25, "I16", 1, 2), GGMLType(26, "I32", 1, 4),
    GGMLType(27, "I64", 1, 8), GGMLType(28, "F64", 1, 8), GGMLType(29, "IQ1_M", 256, 56),
    GGMLType(30, "BF16", 1, 2), GGMLType(34, "TQ1_0", 256, 54),
    GGMLType(35, "TQ2_0", 256, 66), GGMLType(39, "MXFP4", 32, 17),
)}


def type_name(ggml_type: int) -> str:
    """'Q4_K' for 12; 'unknown type 99' for an id GGML does not define."""
    t = GGML_TYPES.get(int(ggml_type))
    return t.name if t is not None else f"unknown type {int(ggml_type)}"


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of the block size {QK}")
    return x.reshape(-1, QK)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero (np.round rounds halves to even)."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 (..., k) -> uint8 (..., k // 32 * 34)."""
    x = np.asarray(x, dtype=np.float32)
    blocks = _blocks(x)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    qs = _roundf(blocks * inv).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), qs.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * Q8_0_BLOCK_BYTES)


def dequantize_q8_0(q: np.ndarray) -> np.ndarray:
    """uint8 (..., n_blocks * 34) -> float32 (..., n_blocks * 32)."""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    blocks = q.reshape(-1, Q8_0_BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * qs).reshape(*q.shape[:-1], q.shape[-1] // Q8_0_BLOCK_BYTES * QK)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """float32 (..., k) -> uint8 (..., k // 32 * 18)."""
    x = np.asarray(x, dtype=np.float32)
    blocks = _blocks(x)
    imax = np.abs(blocks).argmax(axis=1)[:, None]
    vmax = np.take_along_axis(blocks, imax, axis=1)
    d = vmax / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    qs = np.trunc(blocks * inv + np.float32(8.5)).clip(0, 15).astype(np.uint8)
    packed = qs[:, :16] | (qs[:, 16:] << 4)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * Q4_0_BLOCK_BYTES)


def dequantize_q4_0(q: np.ndarray) -> np.ndarray:
    """uint8 (..., n_blocks * 18) -> float32 (..., n_blocks * 32)."""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    blocks = q.reshape(-1, Q4_0_BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:]
    vals = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8
    return (d * vals).reshape(*q.shape[:-1], q.shape[-1] // Q4_0_BLOCK_BYTES * QK)


def row_bytes(ggml_type: int, k: int) -> int:
    """Bytes of one row of k values in this type."""
    if ggml_type == GGML_F32:
        return 4 * k
    if ggml_type == GGML_F16:
        return 2 * k
    if ggml_type == GGML_Q4_0:
        return k // QK * Q4_0_BLOCK_BYTES
    if ggml_type == GGML_Q8_0:
        return k // QK * Q8_0_BLOCK_BYTES
    t = GGML_TYPES.get(int(ggml_type))
    if t is not None:
        return int(k) // t.block_size * t.block_bytes
    raise ValueError(f"no row size for GGML type {ggml_type}")
