"""The synchronizer seam between the forward pass and the other nodes.

The forward pass calls start_forward with the embedded input, all_reduce after each
partial output projection and gather_logits at the end. A single node needs neither: LocalSynchronizer is the
identity. The cluster runtime (cluster/sync_tcp.py) implements the same methods over
TCP -- by default a mesh in which every node sends its partial output to every other
node -- and an in-process fake (cluster/fake.py) lets N-node logic be tested in one
process with the same arithmetic.
"""
from __future__ import annotations

import numpy as np

try:  # typing.Protocol is 3.8+
    from typing import Protocol
except ImportError:  # pragma: no cover
    Protocol = object


class Synchronizer(Protocol):
    def start_forward(self, x: np.ndarray, start_pos: int, logits: bool) -> None:
        """At the root: hand the embedded input (n, dim) of this step to every node."""

    def all_reduce(self, buf: np.ndarray, layer: int, phase: str) -> None:
        """Sum buf (n, dim) float32 across all nodes, in place."""

    def gather_logits(self, local: np.ndarray) -> np.ndarray:
        """This node's logits rows -> the full vocabulary (at the root)."""


class LocalSynchronizer:
    """One node holds everything: nothing to exchange."""

    def start_forward(self, x: np.ndarray, start_pos: int, logits: bool) -> None:
        return None

    def all_reduce(self, buf: np.ndarray, layer: int, phase: str) -> None:
        return None

    def gather_logits(self, local: np.ndarray) -> np.ndarray:
        return local
