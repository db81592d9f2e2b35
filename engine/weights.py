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
from typing import Callable, Iterator, List, Optional

import numpy as np

from dllama_node.common.errors import ModelFileError, UsageError
from dllama_node.model import quants
from dllama_node.model.config import ModelConfig
from dllama_node.model.tensors import Range, SliceSpec, TensorKind, Weight, tensor_table

__all__ = ["LayerWeights", "NodeWeights", "SliceSpec", "Weight", "column_slice", "row_slice",
           "weight_nbytes"]


def row_slice(w: Weight, start: int, stop: int) -> Weight:
    arr, wtype = w
    return Weight(arr[start:stop], wtype)


def column_slice(w: Weight, start: int, stop: int) -> Weight:
    """Columns [start, stop) of a matrix; block types need multiples of 32."""
    arr, wtype = w
    if wtype in (quants.GGML_Q4_0, quants.GGML_Q8_0):
        if start % quants.QK or (stop % quants.QK and stop != _n_cols(w)):
            raise ValueError(f"column slice [{start}, {stop}) is not aligned to {quants.QK}-value blocks")
        per_block = quants.Q4_0_BLOCK_BYTES if wtype == quants.GGML_Q4_0 else quants.Q8_0_BLOCK_BYTES
        return Weight(arr[:, start // quants.QK * per_block:stop // quants.QK * per_block], wtype)
    return Weight(arr[:, start:stop], wtype)


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


def cut_view(w: Weight, rows: Optional[Range], cols: Optional[Range]):
    """A node's part of a tensor as views (TensorKind.cut_ranges): a float32 vector when
    rows is None, else rows [r0, r1) and, when cols is given, columns [c0, c1) of them."""
    if rows is None:
        return _vector(w)
    w = row_slice(w, *rows)
    return w if cols is None else column_slice(w, *cols)


@dataclass
class LayerWeights:
    """One layer of this node's slice: an attribute per kind of the tensor table (its key)."""

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
        table = tensor_table(cfg)

        def bind(kind: TensorKind, layer: Optional[int] = None):
            return cut_view(model.tensor(kind.source(cfg, layer)), *kind.cut_ranges(cfg, spec))

        layers = [LayerWeights(**{k.key: bind(k, i) for k in table.layer})
                  for i in range(cfg.n_layers)]
        tail = {k.key: bind(k) for k in table.tail}
        rope_inv_freq = model.rope_inv_freq()
        if rope_inv_freq.shape != (cfg.head_dim // 2,):
            raise ModelFileError(f"tensor rope_freqs.weight: expected {cfg.head_dim // 2} values "
                                 f"(head_dim / 2), found {rope_inv_freq.shape[0]}")

        def embed_rows(tokens: np.ndarray) -> np.ndarray:
            return model.dequantize_rows("token_embd.weight", tokens)

        return cls(cfg, spec, embed_rows, layers, rope_inv_freq=rope_inv_freq, **tail)

    def embed(self, tokens: np.ndarray, out: np.ndarray) -> None:
        """out[i] = the embedding row of tokens[i], float32. Only these rows are read
        (and dequantized) from the memory map; the table is never copied whole."""
        tokens = np.asarray(tokens, dtype=np.int64)
        bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)]
        if bad.size:
            raise UsageError(f"token id {int(bad[0])} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        out[...] = self.embed_rows(tokens)

    def tensors(self) -> Iterator:
        """Every tensor this node holds, in table order: Weight matrices, float32 vectors."""
        table = tensor_table(self.config)
        for lw in self.layers:
            for kind in table.layer:
                yield getattr(lw, kind.key)
        for kind in table.tail:
            yield getattr(self, kind.key)

    def matrices(self) -> List[np.ndarray]:
        """The arrays of every matrix this node holds (what the service locks in RAM)."""
        return [t.array for t in self.tensors() if isinstance(t, Weight)]

    def nbytes(self) -> int:
        """Bytes of this node's slice of the weights (what it reads per token)."""
        return sum(weight_nbytes(t) if isinstance(t, Weight) else int(t.nbytes)
                   for t in self.tensors())


def _vector(w: Weight) -> np.ndarray:
    arr, _ = w
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
