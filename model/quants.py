"""Block quantization formats, in numpy: the reference the C kernels are tested against.

Bit-exact with GGML (ggml-quants.c quantize_row_*_ref) and with the `gguf` package's
quants.py. Blocks are 32 values; a quantized row of k values is k // 32 blocks of bytes.

    q4_0: 18 bytes = f16 d, 16 bytes qs; element j (j < 16) is the low nibble of qs[j],
          element j + 16 its high nibble; value = (nibble - 8) * d
    q8_0: 34 bytes = f16 d, 32 int8 qs; value = q * d
"""
from __future__ import annotations

import numpy as np

QK = 32
Q4_0_BLOCK_BYTES = 18
Q8_0_BLOCK_BYTES = 34

# GGML type ids.
GGML_F32 = 0
GGML_F16 = 1
GGML_Q4_0 = 2
GGML_Q8_0 = 8


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
    raise ValueError(f"no row size for GGML type {ggml_type}")
