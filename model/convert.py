"""Dequantizers for the GGUF types our kernels do not run, and the conversion at load.

The kernels run F32, F16, Q4_0 and Q8_0. A file that carries other types (a Q4_K_M
file has Q4_K and Q6_K, many files have BF16) is converted when a tensor is loaded:
dequantized here in numpy, then a matrix is requantized to Q8_0 (or kept F32 when its
rows are not whole 32-value blocks) and a vector becomes F32.

Each dequantizer maps uint8 blocks (n_blocks, block_bytes) to float32
(n_blocks, block_size), in the order of GGML's dequantize_row_* (ggml-quants.c), with
the same float32 operation order so results match GGML bit for bit where numpy allows.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np

from dllama_node.common.errors import UnsupportedModelError
from dllama_node.model import quants

# Values of the 4-bit non-linear types (kvalues_iq4nl in ggml-common.h).
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10,
                          1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """float32 (n, 1) from the little-endian f16 at byte `start` of each block."""
    return blocks[:, start:start + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 (n, m) -> (n, 2m): the m low nibbles, then the m high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits32(b: np.ndarray) -> np.ndarray:
    """4 bytes (n, 4), a little-endian uint32 per row -> uint8 (n, 32): bit j at column j."""
    word = b.copy().view("<u4").astype(np.uint32)           # (n, 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view("<f4").astype(np.float32)


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view("<f2").astype(np.float32)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)


def dequantize_f64(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view("<f8").astype(np.float32)


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    return quants.dequantize_q4_0(blocks)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    return quants.dequantize_q8_0(blocks)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """20 bytes: f16 d, f16 m, 16 bytes of nibbles; value = q * d + m."""
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return d * _nibbles(blocks[:, 4:20]).astype(np.float32) + m


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """22 bytes: f16 d, 32 high bits, 16 bytes of nibbles; value = (q - 16) * d."""
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 6:22]) | (_bits32(blocks[:, 2:6]) << 4)
    return d * (q.astype(np.float32) - 16)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """24 bytes: f16 d, f16 m, 32 high bits, 16 bytes of nibbles; value = q * d + m."""
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:24]) | (_bits32(blocks[:, 4:8]) << 4)
    return d * q.astype(np.float32) + m


def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """84 bytes: 16 scale/min bytes, 64 bytes of 2-bit values, f16 d, f16 dmin.

    Value o = h*128 + j*32 + p (h < 2, j < 4, p < 32) is bits 2j of byte h*32 + p,
    with scale byte h*8 + j*2 + p // 16 (low nibble scale, high nibble min)."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 80)[:, :, None, None], _f16(blocks, 82)[:, :, None, None]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    q = (blocks[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3             # (n, 2, 4, 32)
    sc = np.repeat(blocks[:, :16].reshape(n, 2, 4, 2), 16, axis=3)       # (n, 2, 4, 32)
    dl = d * (sc & 0x0F).astype(np.float32)
    ml = dmin * (sc >> 4).astype(np.float32)
    return (dl * q.astype(np.float32) - ml).reshape(n, 256)


def _q3_k_scales(sc: np.ndarray) -> np.ndarray:
    """12 bytes (n, 12) -> the 16 signed 6-bit scales (n, 16), already minus 32."""
    i = np.arange(16)
    low = np.where(i < 8, sc[:, i % 8] & 0x0F, sc[:, i % 8] >> 4)
    high = (sc[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
    return (low | (high << 4)).astype(np.int8).astype(np.float32) - 32


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """110 bytes: 32 bytes high-bit mask, 64 bytes of 2-bit values, 12 scale bytes, f16 d.

    Value o = h*128 + j*32 + p is ((byte h*32 + p of qs) >> 2j) & 3, minus 4 unless
    bit h*4 + j of mask byte p is set; scale o // 16."""
    n = blocks.shape[0]
    d = _f16(blocks, 108)[:, :, None, None]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    q = ((blocks[:, 32:96].reshape(n, 2, 1, 32) >> shifts) & 3).astype(np.int8)
    mask_bit = (np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1))
    hm = (blocks[:, None, None, :32] >> mask_bit) & 1                      # (n, 2, 4, 32)
    q = q - np.where(hm == 0, 4, 0).astype(np.int8)
    scales = np.repeat(_q3_k_scales(blocks[:, 96:108]).reshape(n, 2, 4, 2), 16, axis=3)
    return ((d * scales) * q.astype(np.float32)).reshape(n, 256)


def _k4_scale_min(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The 12 packed scale bytes of Q4_K/Q5_K (n, 12) -> 8 scales and 8 mins, 6 bits each."""
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty((s.shape[0], 8), dtype=np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """144 bytes: f16 d, f16 dmin, 12 scale bytes, 128 bytes of nibbles. Eight groups of
    32: group 2c is the low nibbles of bytes c*32..c*32+31, group 2c+1 their high ones."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k4_scale_min(blocks[:, 4:16])
    qs = blocks[:, 16:144].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    dl = (d * sc)[:, :, None]
    ml = (dmin * mn)[:, :, None]
    return (dl * q.astype(np.float32) - ml).reshape(n, 256)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """176 bytes: f16 d, f16 dmin, 12 scale bytes, 32 bytes of high bits, 128 bytes of
    nibbles; group g takes its fifth bit from bit g of the high-bit byte."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k4_scale_min(blocks[:, 4:16])
    qs = blocks[:, 48:176].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    high = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = q + (high << 4)
    dl = (d * sc)[:, :, None]
    ml = (dmin * mn)[:, :, None]
    return (dl * q.astype(np.float32) - ml).reshape(n, 256)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """210 bytes: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, f16 d.
    Value o has scale o // 16; within a half h, group g < 4 of 32 takes nibble
    (g >= 2) of ql byte h*64 + (g % 2)*32 + l and bits 2g of qh byte h*32 + l."""
    n = blocks.shape[0]
    d = _f16(blocks, 208)
    ql = blocks[:, :128].reshape(n, 2, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)                     # (n, 2, 4, 32)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    scales = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    dl = np.repeat(d * scales, 16, axis=1)                                   # (n, 256)
    return dl * q.reshape(n, 256).astype(np.float32)


def dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    """18 bytes: f16 d, 16 bytes of nibbles indexing the IQ4 value table."""
    return _f16(blocks, 0) * IQ4_NL_VALUES[_nibbles(blocks[:, 2:18])]


def dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    """136 bytes: f16 d, u16 high scale bits, 4 bytes low scale nibbles, 128 bytes of
    nibbles; eight groups of 32 with 6-bit scales (minus 32)."""
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    ib = np.arange(8)
    scales_h = blocks[:, 2:4].copy().view("<u2").astype(np.uint32)          # (n, 1)
    low = (blocks[:, 4 + ib // 2] >> (4 * (ib % 2)).astype(np.uint8)) & 0x0F
    high = (scales_h >> (2 * ib).astype(np.uint32)) & 3
    ls = (low.astype(np.int32) | (high.astype(np.int32) << 4)) - 32
    dl = (d * ls.astype(np.float32))[:, :, None]                             # (n, 8, 1)
    qs = blocks[:, 8:136].reshape(n, 8, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)                         # (n, 8, 32)
    return (dl * IQ4_NL_VALUES[q]).reshape(n, 256)


DEQUANTIZERS: Dict[int, Callable[[np.ndarray], np.ndarray]] = {
    0: dequantize_f32, 1: dequantize_f16, 2: dequantize_q4_0, 3: dequantize_q4_1,
    6: dequantize_q5_0, 7: dequantize_q5_1, 8: dequantize_q8_0, 10: dequantize_q2_k,
    11: dequantize_q3_k, 12: dequantize_q4_k, 13: dequantize_q5_k, 14: dequantize_q6_k,
    20: dequantize_iq4_nl, 23: dequantize_iq4_xs, 28: dequantize_f64, 30: dequantize_bf16,
}

# Types the kernels run as stored; everything else in DEQUANTIZERS is converted.
KERNEL_TYPES = (quants.GGML_F32, quants.GGML_F16, quants.GGML_Q4_0, quants.GGML_Q8_0)

# Elements converted per step: bounds the float32 scratch to 16 MiB for any tensor.
CHUNK_VALUES = 1 << 22


def supported_type_names() -> str:
    return ", ".join(quants.GGML_TYPES[t].name for t in sorted(DEQUANTIZERS))


def dequantize(data: np.ndarray, ggml_type: int) -> np.ndarray:
    """uint8 (..., row_bytes) of one GGML type -> float32 (..., row values).

    Raises UnsupportedModelError for a type without a dequantizer."""
    fn = DEQUANTIZERS.get(int(ggml_type))
    t = quants.GGML_TYPES.get(int(ggml_type))
    if fn is None or t is None:
        raise UnsupportedModelError(
            f"GGML type {quants.type_name(ggml_type)} has no converter "
            f"(supported: {supported_type_names()})")
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.shape[-1] % t.block_bytes:
        raise ValueError(f"{t.name}: {data.shape[-1]} bytes per row is not a multiple "
                         f"of the block size {t.block_bytes}")
    n_values = data.shape[-1] // t.block_bytes * t.block_size
    out = fn(data.reshape(-1, t.block_bytes))
    return np.asarray(out, dtype=np.float32).reshape(*data.shape[:-1], n_values)


def converted_type(ggml_type: int, shape: Tuple[int, ...]) -> int:
    """The kernel type a tensor of this stored type and numpy shape is loaded as."""
    if int(ggml_type) in KERNEL_TYPES and len(shape) >= 2:
        return int(ggml_type)
    if len(shape) < 2 or shape[-1] % quants.QK:
        return quants.GGML_F32
    return quants.GGML_Q8_0


def convert_tensor(data: np.ndarray, ggml_type: int, shape: Tuple[int, ...]) -> Tuple[np.ndarray, int]:
    """Stored bytes (any layout, contiguous) -> (array, kernel_type) for the kernels.

    A matrix of a kernel type comes back as a view in the loader's layout.

    A matrix (rows, cols) becomes uint8 (rows, cols // 32 * 34) Q8_0 when cols is a
    multiple of 32, else float32 (rows, cols); a vector (n,) becomes float32 (n,).
    Converted a chunk of rows at a time, so the float32 scratch stays small."""
    target = converted_type(ggml_type, shape)
    t = quants.GGML_TYPES[int(ggml_type)]
    cols = int(shape[-1])
    rows = 1
    for s in shape[:-1]:
        rows *= int(s)
    src = np.asarray(data).reshape(-1).view(np.uint8).reshape(rows, cols // t.block_size * t.block_bytes)
    if target == int(ggml_type):        # a kernel type already: the stored layout, no copy
        if target in (quants.GGML_F32, quants.GGML_F16):
            return src.view("<f4" if target == quants.GGML_F32 else "<f2").reshape(shape), target
        return src.reshape(*shape[:-1], src.shape[-1]), target
    if target == quants.GGML_Q8_0:
        out = np.empty((rows, cols // quants.QK * quants.Q8_0_BLOCK_BYTES), dtype=np.uint8)
    else:
        out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, CHUNK_VALUES // max(cols, 1))
    for r0 in range(0, rows, step):
        values = dequantize(src[r0:r0 + step], ggml_type)
        out[r0:r0 + step] = quants.quantize_q8_0(values) if target == quants.GGML_Q8_0 else values
    if target == quants.GGML_F32:
        out = out.reshape(shape)
    else:
        out = out.reshape(*shape[:-1], out.shape[-1])
    return out, target
