"""The forward pass of one node: token ids in, logits of the last position out.

Read `Transformer.forward` top to bottom like the paper: per layer,
rmsnorm -> Q/K/V of this node's heads -> RoPE -> attention over its KV slice -> its part
of the output projection -> all-reduce -> residual -> its FFN rows -> SiLU * up -> its
part of ffn_down -> all-reduce -> residual. On a single node the synchronizer is the
identity; in a cluster it sums the partial outputs of all nodes (cluster/).

Buffers are allocated once, for the largest batch (RunState in llama2.c). Every compute
step is a kernel call with the GIL released; Python only sequences them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from dllama_node.engine.kv_cache import KVCache
from dllama_node.engine.sync import LocalSynchronizer, Synchronizer
from dllama_node.engine.weights import NodeWeights, Weight
from dllama_node.model import quants

_BLOCK_TYPES = (quants.GGML_Q4_0, quants.GGML_Q8_0)


def _q8_width(n: int) -> int:
    return n // quants.QK * quants.Q8_0_BLOCK_BYTES


class RunState:
    """Activation buffers for up to `batch` tokens at once; shapes for this node's slice."""

    def __init__(self, weights: NodeWeights, batch: int, seq_len: int, n_threads: int):
        cfg, s = weights.config, weights.slice
        q_dim = s.n_q_heads * cfg.head_dim
        kv_dim = s.n_kv_heads * cfg.head_dim
        ffn = s.n_ffn_rows
        f32 = np.float32
        self.x = np.zeros((batch, cfg.dim), f32)            # (batch, dim) residual stream
        self.xb = np.zeros((batch, cfg.dim), f32)           # (batch, dim) normed input
        self.xq = np.zeros((batch, _q8_width(cfg.dim)), np.uint8)   # q8_0 of xb
        self.q = np.zeros((batch, q_dim), f32)              # (batch, local heads * head_dim)
        self.k = np.zeros((batch, kv_dim), f32)             # (batch, local kv heads * head_dim)
        self.v = np.zeros((batch, kv_dim), f32)
        self.att = np.zeros((batch, q_dim), f32)            # attention output, local heads
        self.attq = np.zeros((batch, _q8_width(q_dim)), np.uint8)
        self.xo = np.zeros((batch, cfg.dim), f32)           # partial output, all-reduced
        self.hb = np.zeros((batch, ffn), f32)               # (batch, local ffn rows) gate
        self.hb2 = np.zeros((batch, ffn), f32)              # up
        self.hq = np.zeros((batch, _q8_width(ffn)), np.uint8)
        self.logits = np.zeros((1, s.n_vocab_rows), f32)
        self.positions = np.zeros(batch, np.int64)

    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


class Transformer:
    def __init__(self, weights: NodeWeights, seq_len: int, n_threads: int = 1, batch: int = 64,
                 sync: Optional[Synchronizer] = None, kernels=None):
        if kernels is None:
            from dllama_node import kernels  # the compiled kernels
        self.k = kernels
        self.w = weights
        self.cfg = weights.config
        self.seq_len = seq_len
        self.batch = batch
        self.n_threads = n_threads
        self.sync = sync or LocalSynchronizer()
        self.cache = KVCache(self.cfg.n_layers, seq_len, weights.slice.n_kv_heads * self.cfg.head_dim)
        self.s = RunState(weights, batch, seq_len, n_threads)

    def _matmul(self, w: Weight, x: np.ndarray, xq: np.ndarray, out: np.ndarray) -> None:
        """out = x @ W.T, feeding the q8_0 activations to block-quantized weights."""
        arr, wtype = w
        self.k.matmul(arr, wtype, xq if wtype in _BLOCK_TYPES else x, out, self.n_threads)

    def _matmuls(self, x: np.ndarray, xq: np.ndarray, *pairs) -> None:
        """out = x @ W.T for each (W, out) sharing the input: one parallel kernel call."""
        self.k.matmul_multi([(w[0], w[1], out) for w, out in pairs], x, xq, self.n_threads)

    def _quantize_for(self, x: np.ndarray, out: np.ndarray, *consumers: Weight) -> None:
        """q8_0 of x, when a block-quantized weight is going to read it."""
        if out.shape[1] and any(w[1] in _BLOCK_TYPES for w in consumers):
            self.k.quantize_q8_0(x, out, self.n_threads)

    def forward(self, tokens, start_pos: int, logits: bool = True) -> Optional[np.ndarray]:
        """Run tokens at positions [start_pos, start_pos + n); n <= batch.

        Returns the logits of the last token (this node's vocab rows; gathered to the
        full vocabulary by the synchronizer), or None when logits=False.
        """
        n = len(tokens)
        self.w.embed(tokens, self.s.x[:n])
        self.sync.start_forward(self.s.x[:n], start_pos, logits)
        return self.forward_embedded(n, start_pos, logits)

    def forward_embedded(self, n: int, start_pos: int, logits: bool = True) -> Optional[np.ndarray]:
        """The layers, from the embedded input already in the state's x[:n] (a worker
        receives it from the root instead of embedding tokens itself)."""
        K, w, s, cfg, T = self.k, self.w, self.s, self.cfg, self.n_threads
        has_heads, has_ffn = w.slice.n_q_heads > 0, w.slice.n_ffn_rows > 0
        x, xb, xq = s.x[:n], s.xb[:n], s.xq[:n]
        q, k, v, att, attq = s.q[:n], s.k[:n], s.v[:n], s.att[:n], s.attq[:n]
        xo, hb, hb2, hq = s.xo[:n], s.hb[:n], s.hb2[:n], s.hq[:n]
        pos = s.positions[:n]
        pos[:] = np.arange(start_pos, start_pos + n)

        for layer, lw in enumerate(w.layers):
            # attention over this node's heads (a node may hold none: it adds zeros)
            if has_heads:
                K.rmsnorm(x, lw.attn_norm, cfg.norm_eps, xb)
                self._quantize_for(xb, xq, lw.wq, lw.wk, lw.wv)
                self._matmuls(xb, xq, (lw.wq, q), (lw.wk, k), (lw.wv, v))
                K.rope(q, pos, cfg.head_dim, w.rope_inv_freq)
                K.rope(k, pos, cfg.head_dim, w.rope_inv_freq)
                k_cache, v_cache = self.cache.layer(layer)
                k_cache[start_pos:start_pos + n] = k
                v_cache[start_pos:start_pos + n] = v
                K.attention(q, k_cache, v_cache, start_pos, cfg.head_dim, cfg.kv_group, att,
                            w.slice.q_heads[0], w.slice.kv_heads[0], T)
                self._quantize_for(att, attq, lw.wo)
                self._matmul(lw.wo, att, attq, xo)
            else:
                xo[...] = 0
            self.sync.all_reduce(xo, layer, "attention")
            x += xo

            # feed-forward over this node's FFN rows
            if has_ffn:
                K.rmsnorm(x, lw.ffn_norm, cfg.norm_eps, xb)
                self._quantize_for(xb, xq, lw.w_gate, lw.w_up)
                self._matmuls(xb, xq, (lw.w_gate, hb), (lw.w_up, hb2))
                K.silu_mul(hb, hb2)
                self._quantize_for(hb, hq, lw.w_down)
                self._matmul(lw.w_down, hb, hq, xo)
            else:
                xo[...] = 0
            self.sync.all_reduce(xo, layer, "ffn")
            x += xo

        if not logits:
            return None
        last = slice(n - 1, n)
        if s.logits.shape[1]:
            K.rmsnorm(x[last], w.output_norm, cfg.norm_eps, xb[last])
            self._quantize_for(xb[last], xq[last], w.output)
            self._matmul(w.output, xb[last], xq[last], s.logits)
        return self.sync.gather_logits(s.logits[0])
