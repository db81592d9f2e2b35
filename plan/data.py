"""The plan as data: what a node reports (NodeCapacity), what the user asks (PlanOptions), and
what the planner answers (ShardPlan of NodeSlice, each with its NodeMemory) -- or PlanError.

Ranges are half-open [start, stop), (0, 0) when empty; bytes are Python ints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

from dllama_node.common.errors import MemoryPlanError
from dllama_node.common.units import MiB
from dllama_node.model.tensors import SliceSpec

from .accounting import ROLE_COORDINATOR, NodeMemory
from .layout import ModelLayout
from .seq_len import DEFAULT_MAX_SEQ_LEN_CAP

DEFAULT_RESERVE_BYTES = 64 * MiB


class PlanError(MemoryPlanError):
    """The model does not fit the nodes: names the node, the numbers, and what would fit."""

    def __init__(self, message: str, node_id: Optional[str] = None, needed_bytes: int = 0,
                 available_bytes: int = 0, fixes: Sequence[str] = ()):
        super().__init__(message)
        self.node_id = node_id
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.fixes = tuple(fixes)


@dataclass(frozen=True)
class NodeCapacity:
    """What a node reports: its memory, its cores and a relative speed score."""

    node_id: str
    available_ram_bytes: int
    free_swap_bytes: int
    memlock_limit_bytes: int            # -1: unlimited
    cores: int
    speed: float                        # e.g. tokens/s of a short kernel benchmark
    coordinator_only: bool = False      # runs no slice (a bigger root that only coordinates)


@dataclass(frozen=True)
class PlanOptions:
    max_seq_len: Optional[int] = None   # None: the largest that fits every node, <= the model's
    seq_len_cap: Optional[int] = DEFAULT_MAX_SEQ_LEN_CAP   # ... and <= this (None: no cap)
    allow_swap: bool = False
    reserve_bytes: int = DEFAULT_RESERVE_BYTES   # per node
    kv_bytes_per_value: int = 4         # f32 KV cache
    split: Optional[Tuple[float, ...]] = None    # relative weights per capacity, overriding speed
    batch_size: int = 1                 # tokens per forward call: activation buffers scale with it

    def to_dict(self) -> dict:
        return {"max_seq_len": self.max_seq_len, "seq_len_cap": self.seq_len_cap,
                "allow_swap": self.allow_swap,
                "reserve_bytes": self.reserve_bytes, "kv_bytes_per_value": self.kv_bytes_per_value,
                "split": list(self.split) if self.split is not None else None,
                "batch_size": self.batch_size}


@dataclass(frozen=True)
class NodeSlice:
    """One node's part of the plan: who holds it, its units (the SliceSpec the node's
    weights are cut by, half-open ranges, (0, 0) when empty) and what they cost."""

    node_id: str
    node_index: int             # position in the plan; the root is 0
    role: str                   # "root", "worker" or "coordinator"
    weight: float               # the speed score or split weight its share followed
    spec: SliceSpec
    memory: NodeMemory

    def to_dict(self) -> dict:
        return {"node_id": self.node_id, "node_index": self.node_index, "role": self.role,
                "weight": self.weight, **self.spec.to_dict(), "memory": self.memory.to_dict()}


@dataclass(frozen=True)
class ExcludedNode:
    node_id: str
    reason: str


TOTAL_FIELDS = ("weights", "kv_cache", "buffers", "reserve", "total", "available", "swap_used", "headroom")


@dataclass(frozen=True)
class ShardPlan:
    """Per-node slices and their byte accounting; printed, journaled and checked against RSS."""

    layout: ModelLayout
    options: PlanOptions
    max_seq_len: int
    seq_len_reason: str
    nodes: Tuple[NodeSlice, ...]
    excluded: Tuple[ExcludedNode, ...] = ()
    warnings: Tuple[str, ...] = field(default=())

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def slice_nodes(self) -> Tuple[NodeSlice, ...]:
        """The nodes that hold rows (all but a coordinator-only root)."""
        return tuple(n for n in self.nodes if n.role != ROLE_COORDINATOR)

    def node(self, node_id: str) -> NodeSlice:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(f"node {node_id} is not in the plan")

    def totals(self) -> Dict[str, int]:
        """Sums over the plan's nodes of each byte column."""
        return {name: sum(getattr(n.memory, name) for n in self.nodes) for name in TOTAL_FIELDS}

    def to_dict(self) -> dict:
        return {"model": self.layout.describe(), "options": self.options.to_dict(),
                "max_seq_len": self.max_seq_len, "seq_len_reason": self.seq_len_reason,
                "nodes": [n.to_dict() for n in self.nodes],
                "excluded": [{"node_id": e.node_id, "reason": e.reason} for e in self.excluded],
                "warnings": list(self.warnings), "totals": self.totals()}


@dataclass(frozen=True)
class Shortfall:
    """Why a plan at one max_seq_len failed: one sentence with its node and numbers."""

    text: str
    node_id: Optional[str]
    needed_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Draft:
    nodes: Tuple[NodeSlice, ...]
    excluded: Tuple[ExcludedNode, ...]
    warnings: Tuple[str, ...]
