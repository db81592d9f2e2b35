"""This node's weights: views into the memory-mapped model file, cut to its slice.

A slice is given as half-open ranges [start, stop) over the model's units:
query heads, KV heads, FFN rows (rows of ffn_gate/ffn_up = columns of ffn_down) and
classifier rows (vocab). A single node holds the full ranges. Row slices of a matrix
are contiguous views; column slices (attn_output over this node's heads, ffn_down over
its FFN rows) are strided views whose last axis stays contiguous, as the kernels take.
Nothing here copies weights, except tensors the model file had to convert at load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np

from dllama_node.common.errors import ModelFileError, UsageError
from dllama_node.model import quants
from dllama_node.model.config import ModelConfig

Weight = Tuple[np.ndarray, int]   # (array, GGML type)


@dataclass(frozen=True)
class SliceSpec:
    """The units one node computes, as half-open ranges."""

    q_heads: Tuple[int, int]
    kv_heads: Tuple[int, int]
    ffn_rows: Tuple[int, int]
    vocab_rows: Tuple[int, int]

    @classmethod
    def full(cls, config: ModelConfig) -> "SliceSpec":
        return cls((0, config.n_heads), (0, config.n_kv_heads), (0, config.hidden_dim),
                   (0, config.vocab_size))

    @property
    def n_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def row_slice(w: Weight, start: int, stop: int) -> Weight:
    arr, wtype = w
    return arr[start:stop], wtype


def column_slice(w: Weight, start: int, stop: int) -> Weight:
    """Columns [start, stop) of a matrix; block types need multiples of 32."""
    arr, wtype = w
    if wtype in (quants.GGML_Q4_0, quants.GGML_Q8_0):
        if start % quants.QK or (stop % quants.QK and stop != _n_cols(w)):
            raise ValueError(f"column slice [{start}, {stop}) is not aligned to {quants.QK}-value blocks")
        per_block = quants.Q4_0_BLOCK_BYTES if wtype == quants.GGML_Q4_0 else quants.Q8_0_BLOCK_BYTES
        return arr[:, start // quants.QK * per_block:stop // quants.QK * per_block], wtype
    return arr[:, start:stop], wtype


def _n_cols(w: Weight) -> int:
    arr, wtype = w
    if wtype == quants.GGML_Q4_0:
        return arr.shape[1] // quants.Q4_0_BLOCK_BYTES * quants.QK
    if wtype == quants.GGML_Q8_0:
        return arr.shape[1] // quants.Q8_0_BLOCK_BYTES * quants.QK
    return arr.shape[1]


def weight_nbytes(w: Weight) -> int:
    arr, _ = w
    return int(arr.shape[0]) * int(arr.shape[1]) * arr.itemsize if arr.ndim == 2 else int(arr.nbytes)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray   # (dim,) float32
    wq: Weight              # (n_local_heads * head_dim, dim)
    wk: Weight              # (n_local_kv_heads * head_dim, dim)
    wv: Weight              # (n_local_kv_heads * head_dim, dim)
    wo: Weight              # (dim, n_local_heads * head_dim)   column slice
    ffn_norm: np.ndarray    # (dim,) float32
    w_gate: Weight          # (n_local_ffn_rows, dim)
    w_up: Weight            # (n_local_ffn_rows, dim)
    w_down: Weight          # (dim, n_local_ffn_rows)           column slice


@dataclass
class NodeWeights:
    config: ModelConfig
    slice: SliceSpec
    embed_rows: Callable        # token ids -> float32 (n, dim) rows of token_embd, read on demand
    layers: List[LayerWeights]
    output_norm: np.ndarray     # (dim,) float32
    output: Weight              # (n_local_vocab_rows, dim)
    rope_inv_freq: np.ndarray   # (head_dim // 2,) float32

    @classmethod
    def bind(cls, model, spec: SliceSpec = None) -> "NodeWeights":
        """Views of `model`'s tensors (a dllama_node.model.ModelFile) for this node's slice."""
        cfg: ModelConfig = model.config
        spec = spec or SliceSpec.full(cfg)
        hd = cfg.head_dim
        q0, q1 = spec.q_heads[0] * hd, spec.q_heads[1] * hd
        k0, k1 = spec.kv_heads[0] * hd, spec.kv_heads[1] * hd
        f0, f1 = spec.ffn_rows
        t = model.tensor
        layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            layers.append(LayerWeights(
                attn_norm=_vector(t(p + "attn_norm.weight")),
                wq=row_slice(t(p + "attn_q.weight"), q0, q1),
                wk=row_slice(t(p + "attn_k.weight"), k0, k1),
                wv=row_slice(t(p + "attn_v.weight"), k0, k1),
                wo=column_slice(t(p + "attn_output.weight"), q0, q1),
                ffn_norm=_vector(t(p + "ffn_norm.weight")),
                w_gate=row_slice(t(p + "ffn_gate.weight"), f0, f1),
                w_up=row_slice(t(p + "ffn_up.weight"), f0, f1),
                w_down=column_slice(t(p + "ffn_down.weight"), f0, f1),
            ))
        output = t("token_embd.weight") if cfg.tied_embeddings else t("output.weight")
        rope_inv_freq = model.rope_inv_freq()
        if rope_inv_freq.shape != (cfg.head_dim // 2,):
            raise ModelFileError(f"tensor rope_freqs.weight: expected {cfg.head_dim // 2} values "
                                 f"(head_dim / 2), found {rope_inv_freq.shape[0]}")

        def embed_rows(tokens: np.ndarray) -> np.ndarray:
            return model.dequantize_rows("token_embd.weight", tokens)

        return cls(cfg, spec, embed_rows, layers, _vector(t("output_norm.weight")),
                   row_slice(output, *spec.vocab_rows), rope_inv_freq)

    def embed(self, tokens: np.ndarray, out: np.ndarray) -> None:
        """out[i] = the embedding row of tokens[i], float32. Only these rows are read
        (and dequantized) from the memory map; the table is never copied whole."""
        tokens = np.asarray(tokens, dtype=np.int64)
        bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)]
        if bad.size:
            raise UsageError(f"token id {int(bad[0])} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        out[...] = self.embed_rows(tokens)

    def nbytes(self) -> int:
        """Bytes of this node's slice of the weights (what it reads per token)."""
        total = sum(w.nbytes for w in (self.output_norm,)) + weight_nbytes(self.output)
        for lw in self.layers:
            total += lw.attn_norm.nbytes + lw.ffn_norm.nbytes
            total += sum(weight_nbytes(w) for w in (lw.wq, lw.wk, lw.wv, lw.wo,
                                                    lw.w_gate, lw.w_up, lw.w_down))
        return total


def _vector(w: Weight) -> np.ndarray:
    arr, _ = w
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
