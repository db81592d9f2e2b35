"""The kernels in plain numpy: the contract and the test oracle for the C kernels.

Every function here has the same name and arguments as its compiled twin in
dllama_node.kernels (which re-exports _kernels). Shapes, in the house vocabulary:

    n            tokens in this call (1 while decoding, the batch size on a prompt)
    k            elements per weight row (the input width)
    rows         output features (weight rows)
    w            F32: float32 (rows, k); F16: float16 (rows, k);
                 Q4_0 / Q8_0: uint8 (rows, k // 32 * block_bytes). The last axis is
                 contiguous; the row stride may be larger (a column slice of a matrix).
    x            Q4_0 / Q8_0 weights: q8_0 activations, uint8 (n, k // 32 * 34);
                 F32 / F16 weights: float32 (n, k)
    out          float32 (n, rows)
"""
from __future__ import annotations

import numpy as np

from dllama_node.model import quants

F32, F16, Q4_0, Q8_0 = quants.GGML_F32, quants.GGML_F16, quants.GGML_Q4_0, quants.GGML_Q8_0


def kernel_path() -> str:
    return "numpy-reference"


def quantize_q8_0(x: np.ndarray, out: np.ndarray, n_threads: int = 1) -> None:
    """x float32 (n, k) -> out uint8 (n, k // 32 * 34)."""
    out[...] = quants.quantize_q8_0(x)


def dequantize_weights(w: np.ndarray, wtype: int) -> np.ndarray:
    if wtype == Q4_0:
        return quants.dequantize_q4_0(w)
    if wtype == Q8_0:
        return quants.dequantize_q8_0(w)
    return np.asarray(w, dtype=np.float32)


def matmul(w: np.ndarray, wtype: int, x: np.ndarray, out: np.ndarray, n_threads: int = 1) -> None:
    """out[t, r] = dot(w[r], x[t])."""
    wf = dequantize_weights(w, wtype).astype(np.float64)
    xf = (quants.dequantize_q8_0(x) if wtype in (Q4_0, Q8_0) else np.asarray(x)).astype(np.float64)
    out[...] = (xf @ wf.T).astype(np.float32)


def matmul_multi(items, x: np.ndarray, xq: np.ndarray, n_threads: int = 1) -> None:
    """matmul for several weights sharing one input: for each (w, wtype, out) of items,
    out = the rows of w times xq (Q4_0 / Q8_0 weights, q8_0 blocks of x) or x (F32 /
    F16 weights, float32 (n, k)). At most 16 items."""
    for w, wtype, out in items:
        matmul(w, wtype, xq if wtype in (Q4_0, Q8_0) else x, out, n_threads)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out = x / sqrt(mean(x^2) + eps) * weight, per row. x, out float32 (n, dim)."""
    x64 = x.astype(np.float64)
    scale = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)
    out[...] = (x64 * scale * weight).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, head_dim: int, inv_freq: np.ndarray) -> None:
    """In place. x float32 (n, n_heads * head_dim); pairs (2i, 2i+1) of each head rotate
    by positions[t] * inv_freq[i] (GGML "normal" rope; HF's rotate_half order is
    matched by permuting the Q/K weights when a model is converted)."""
    n = x.shape[0]
    v = x.reshape(n, -1, head_dim // 2, 2).astype(np.float64)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = v[..., 0].copy(), v[..., 1].copy()
    v[..., 0] = a * cos - b * sin
    v[..., 1] = a * sin + b * cos
    x[...] = v.reshape(x.shape).astype(np.float32)


def softmax(x: np.ndarray) -> None:
    """In place, per row of a float32 (n, m) array."""
    x64 = x.astype(np.float64)
    x64 = np.exp(x64 - x64.max(axis=-1, keepdims=True))
    x[...] = (x64 / x64.sum(axis=-1, keepdims=True)).astype(np.float32)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> None:
    """In place: gate = silu(gate) * up. Both float32 (n, hidden_dim)."""
    g = gate.astype(np.float64)
    gate[...] = (g / (1.0 + np.exp(-g)) * up).astype(np.float32)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start_pos: int,
              head_dim: int, kv_group: int, out: np.ndarray, q_head0: int = 0,
              kv_head0: int = 0, n_threads: int = 1) -> None:
    """Causal attention for n tokens at positions start_pos .. start_pos + n - 1.

    q       float32 (n, n_heads * head_dim): this node's query heads, global heads
            q_head0 .. q_head0 + n_heads - 1
    k_cache float32 (seq_len, n_local_kv * head_dim), rows [0, start_pos + n) filled;
    v_cache the same. Global query head g reads global KV head g // kv_group, which is
            local KV head g // kv_group - kv_head0.
    out     float32 (n, n_heads * head_dim)
    """
    n = q.shape[0]
    n_heads = q.shape[1] // head_dim
    scale = 1.0 / np.sqrt(head_dim)
    for t in range(n):
        end = start_pos + t + 1
        for h in range(n_heads):
            kv = (q_head0 + h) // kv_group - kv_head0
            qh = q[t, h * head_dim:(h + 1) * head_dim].astype(np.float64)
            kh = k_cache[:end, kv * head_dim:(kv + 1) * head_dim].astype(np.float64)
            vh = v_cache[:end, kv * head_dim:(kv + 1) * head_dim].astype(np.float64)
            s = kh @ qh * scale
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h * head_dim:(h + 1) * head_dim] = (p @ vh).astype(np.float32)
