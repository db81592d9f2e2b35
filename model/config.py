"""The model's shape, as every part of the node sees it.

One vocabulary for dimensions everywhere: dim, hidden_dim, n_layers, n_heads,
n_kv_heads, head_dim, kv_dim, vocab_size, seq_len.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1/3.2 frequency scaling ("llama3" rope type)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str                 # "llama"
    dim: int                  # embedding width
    hidden_dim: int           # FFN width
    n_layers: int
    n_heads: int              # query heads
    n_kv_heads: int           # key/value heads (GQA when < n_heads)
    head_dim: int
    vocab_size: int
    seq_len: int              # context length the model was trained for (the model card's)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tied_embeddings: bool = False   # classifier reuses token_embd.weight

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def rope_inv_freq(self) -> np.ndarray:
        """float32 (head_dim // 2,): the rotation speed of each pair, scaled as the model says."""
        half = self.head_dim // 2
        inv = 1.0 / (self.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2 / self.head_dim))
        s = self.rope_scaling
        if s is not None:
            low_wavelen = s.original_max_position / s.low_freq_factor
            high_wavelen = s.original_max_position / s.high_freq_factor
            wavelen = 2 * math.pi / inv
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
            mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
            scaled = np.where(mid, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
            inv = scaled
        return inv.astype(np.float32)
