"""The KV cache: keys and values of every position so far, for this node's KV heads."""
from __future__ import annotations

from typing import Tuple

import numpy as np


class KVCache:
    """float32 (n_layers, 2, seq_len, kv_dim): [layer, 0] keys, [layer, 1] values.

    kv_dim is this node's share (its KV heads * head_dim). Allocated with np.zeros, so
    pages are only touched (and counted in RSS) as positions fill, unless locked.
    """

    BYTES_PER_VALUE = 4

    def __init__(self, n_layers: int, seq_len: int, kv_dim: int):
        self.n_layers, self.seq_len, self.kv_dim = n_layers, seq_len, kv_dim
        self.data = np.zeros((n_layers, 2, seq_len, kv_dim), np.float32)

    @staticmethod
    def bytes_for(n_layers: int, seq_len: int, kv_dim: int) -> int:
        return 2 * int(n_layers) * int(seq_len) * int(kv_dim) * KVCache.BYTES_PER_VALUE

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def layer(self, layer: int) -> Tuple[np.ndarray, np.ndarray]:
        """(keys, values) of one layer, each (seq_len, kv_dim)."""
        return self.data[layer, 0], self.data[layer, 1]
