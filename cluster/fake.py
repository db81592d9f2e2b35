"""N nodes in one process: the cluster's arithmetic without sockets.

Each node is a Transformer over its slice, run in its own thread; all-reduce and the
logits gather meet at a barrier and use cluster/wire.py exactly as the TCP runtime
does, so a test here predicts the real cluster's numbers. Not for production: for
testing slicing and planning logic quickly.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Sequence

import numpy as np

from dllama_node.cluster.wire import reduce_parts
from dllama_node.engine.forward import Transformer
from dllama_node.engine.weights import NodeWeights


class _Exchange:
    def __init__(self, n: int, wire: str):
        self.n, self.wire = n, wire
        self.barrier = threading.Barrier(n, timeout=60)
        self.parts: List[np.ndarray] = [None] * n
        self.result = None

    def all_reduce(self, index: int, buf: np.ndarray) -> None:
        self.parts[index] = buf.copy()
        if self.barrier.wait() == 0:
            self.result = reduce_parts(self.parts, self.wire)
        self.barrier.wait()
        buf[...] = self.result
        self.barrier.wait()

    def gather(self, index: int, local: np.ndarray) -> np.ndarray:
        self.parts[index] = local.copy()
        self.barrier.wait()
        full = np.concatenate(self.parts)
        self.barrier.wait()
        return full


class _FakeSync:
    def __init__(self, exchange: _Exchange, index: int):
        self.exchange, self.index = exchange, index

    def start_forward(self, x, start_pos, logits):
        return None

    def all_reduce(self, buf, layer, phase):
        self.exchange.all_reduce(self.index, buf)

    def gather_logits(self, local):
        return self.exchange.gather(self.index, local)


class InProcessCluster:
    """Quacks like a Transformer (forward, batch, seq_len), so a Session can drive it.

    weights: one NodeWeights per node, node 0 the root; their vocab_rows must tile the
    vocabulary in node order (the planner's ranges do). The all-reduce is the mesh's
    arithmetic (cluster/wire.py)."""

    def __init__(self, weights: Sequence[NodeWeights], seq_len: int, batch: int = 16,
                 wire: str = "q8_0", kernels=None):
        self.exchange = _Exchange(len(weights), wire)
        self.nodes = [Transformer(w, seq_len, 1, batch, _FakeSync(self.exchange, i), kernels)
                      for i, w in enumerate(weights)]
        self.seq_len, self.batch = seq_len, batch
        self.pool = ThreadPoolExecutor(len(weights))

    def forward(self, tokens, start_pos: int, logits: bool = True):
        n = len(tokens)
        root = self.nodes[0]
        root.w.embed(tokens, root.s.x[:n])
        for node in self.nodes[1:]:
            node.s.x[:n] = root.s.x[:n]
        futures = [self.pool.submit(node.forward_embedded, n, start_pos, logits)
                   for node in self.nodes]
        return [f.result() for f in futures][0]

    def close(self) -> None:
        self.pool.shutdown()
