"""What one node's slice costs in bytes: weights, KV cache, buffers, reserve (all Python ints).

A slice is counted by how many units of each kind the node holds (the planner turns counts
into half-open ranges; the bytes depend only on the counts):

    n_q_heads     query heads            -> attn_q rows, attn_output columns (x head_dim)
    n_kv_heads    key/value heads        -> attn_k / attn_v rows (x head_dim), the KV cache
    n_ffn_rows    FFN rows               -> ffn_gate / ffn_up rows, ffn_down columns
    n_vocab_rows  classifier rows        -> output.weight rows (token_embd's when tied)

Formulas (f32 = 4 bytes, b = batch_size tokens per forward call, q8(k) = ceil(k / 32) * 34,
wire = q8(dim) when dim is whole blocks else 4 * dim, rb(type, k) = bytes of a k-value row):

    weights   sum over layers of
                  n_q_heads * head_dim * rb(attn_q, dim) + dim * rb(attn_output, n_q_heads * head_dim)
                + 2 * n_kv_heads * head_dim * rb(attn_k|v, dim)
                + 2 * n_ffn_rows * rb(ffn_gate|up, dim) + dim * rb(ffn_down, n_ffn_rows)
                + 2 * dim * 4                                   (attn_norm, ffn_norm)
              + n_vocab_rows * rb(output, dim) + dim * 4        (classifier rows, output_norm)
              A coordinator holds no weights.
    kv_cache  2 * n_layers * seq_len * n_kv_heads * head_dim * kv_bytes_per_value
    buffers   x, xb, partial (this node's sum before the all-reduce): 3 * b * dim * 4
              xq (q8_0 of xb, input of Q/K/V, gate/up, classifier):  b * q8(dim)
              sync_send: b * wire; sync_recv: b * wire * peers (a star all-reduce: the root
                  receives from every other slice node, a worker receives the sum)
              sync_mesh (the all-gather mesh, the default: a frame per node of the
                  exchange, a coordinator included, cluster/mesh.py):
                  n_exchange_nodes * (16 + b * wire), none for a node alone
              q, k, v, att_out: b * (2 * n_q_heads + 2 * n_kv_heads) * head_dim * 4
              att (scores): b * n_q_heads * seq_len * 4; att_out_q: b * q8(n_q_heads * head_dim)
              rope (inverse frequencies): head_dim / 2 * 4 when the node has heads
              hb, hb2: 2 * b * n_ffn_rows * 4; hb_q: b * q8(n_ffn_rows)
              logits (this node's rows, last token only): n_vocab_rows * 4
              root only: embed_row (one row read from the memmap, never the table):
                  b * rb(token_embd, dim); logits_all (gathered): vocab_size * 4;
                  sampler (probability + index per token): vocab_size * 8
    reserve   options.reserve_bytes (interpreter, libraries, page tables, slack)
    total     weights + kv_cache + buffers + reserve
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

from dllama_node.model import quants
from dllama_node.model.tensors import UNITS, SliceSpec, TensorKind, tensor_table

from .layout import ModelLayout, slice_row_bytes

F32_BYTES = 4
SAMPLER_BYTES_PER_TOKEN = 8   # float prob + int32 index per vocab entry (llama2.c's ProbIndex)

ROLE_ROOT = "root"
ROLE_WORKER = "worker"
ROLE_COORDINATOR = "coordinator"   # the root, holding no slice


def q8_bytes(k: int) -> int:
    """Bytes of k values as q8_0 (a short last block is padded to a whole one)."""
    return -(-int(k) // quants.QK) * quants.Q8_0_BLOCK_BYTES


def wire_row_bytes(dim: int) -> int:
    """One dim-wide activation on the wire: q8_0 when dim is whole blocks, else f32."""
    return q8_bytes(dim) if dim % quants.QK == 0 else dim * F32_BYTES


@dataclass(frozen=True)
class SliceCounts:
    """How many units of each kind a node holds."""

    n_q_heads: int = 0
    n_kv_heads: int = 0
    n_ffn_rows: int = 0
    n_vocab_rows: int = 0

    @classmethod
    def of(cls, spec: SliceSpec) -> "SliceCounts":
        return cls(**{f"n_{unit}": spec.count(unit) for unit in UNITS})

    def count(self, unit: str) -> int:
        """Units held of a kind named as in SliceSpec ("q_heads" -> n_q_heads)."""
        return getattr(self, "n_" + unit)


@dataclass(frozen=True)
class MemoryNeed:
    """What a slice needs, before it meets a node."""

    weights_by_group: Mapping[str, int] = field(hash=False)
    kv_cache: int
    buffers_by_name: Mapping[str, int] = field(hash=False)
    reserve: int

    @property
    def weights(self) -> int:
        return sum(self.weights_by_group.values())

    @property
    def buffers(self) -> int:
        return sum(self.buffers_by_name.values())

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers + self.reserve


def weight_bytes(layout: ModelLayout, counts: SliceCounts, holds_layers: bool = True) -> Dict[str, int]:
    """Exact bytes of a slice's part of every tensor the tensor table puts in a slice, all
    layers, summed by the table's group ("attn_q", ..., "norms", "output")."""
    if not holds_layers:
        return {}
    c = layout.config
    table = tensor_table(c)
    out: Dict[str, int] = {}

    def add(kind: TensorKind, layers) -> None:
        if not kind.in_slice or kind.group is None:
            return
        shape = kind.held_shape(c, counts.count)
        n_rows = 1
        for n in shape[:-1]:
            n_rows *= n
        out[kind.group] = out.get(kind.group, 0) + sum(
            n_rows * slice_row_bytes(layout.type_of(kind, layer), shape[-1]) for layer in layers)

    for kind in table.layer:
        add(kind, range(c.n_layers))
    for kind in table.head + table.tail:
        add(kind, (None,))
    return out


def kv_cache_bytes(layout: ModelLayout, n_kv_heads: int, seq_len: int, kv_bytes_per_value: int) -> int:
    """2 (K and V) * n_layers * seq_len * n_kv_heads * head_dim * kv_bytes_per_value."""
    c = layout.config
    return 2 * c.n_layers * int(seq_len) * n_kv_heads * c.head_dim * int(kv_bytes_per_value)


MESH_FRAME_HEADER_BYTES = 16      # cluster/protocol.py HEADER: magic, version, kind, length


def buffer_bytes(layout: ModelLayout, counts: SliceCounts, *, seq_len: int, role: str,
                 n_slice_nodes: int, batch_size: int = 1,
                 n_exchange_nodes: Optional[int] = None) -> Dict[str, int]:
    """Activation buffers by name (see the module docstring for each formula).
    n_exchange_nodes: the nodes of the all-gather (default: the slice nodes, and the
    coordinator when this node is one)."""
    c = layout.config
    if n_exchange_nodes is None:
        n_exchange_nodes = n_slice_nodes + (1 if role == ROLE_COORDINATOR else 0)
    b = int(batch_size)
    hd = c.head_dim
    wire = wire_row_bytes(c.dim)
    if role == ROLE_WORKER:
        peers = 1
    elif role == ROLE_ROOT:
        peers = n_slice_nodes - 1
    else:
        peers = n_slice_nodes
    out = {
        "x": b * c.dim * F32_BYTES,
        "xb": b * c.dim * F32_BYTES,
        "partial": b * c.dim * F32_BYTES,
        "xq": b * q8_bytes(c.dim),
        "sync_send": b * wire,
        "sync_recv": b * wire * peers,
        "sync_mesh": (n_exchange_nodes * (MESH_FRAME_HEADER_BYTES + b * wire)
                      if n_exchange_nodes > 1 else 0),
        "q": b * counts.n_q_heads * hd * F32_BYTES,
        "k": b * counts.n_kv_heads * hd * F32_BYTES,
        "v": b * counts.n_kv_heads * hd * F32_BYTES,
        "att": b * counts.n_q_heads * int(seq_len) * F32_BYTES,
        "att_out": b * counts.n_q_heads * hd * F32_BYTES,
        "att_out_q": b * q8_bytes(counts.n_q_heads * hd),
        "rope": (hd // 2) * F32_BYTES if counts.n_q_heads else 0,
        "hb": b * counts.n_ffn_rows * F32_BYTES,
        "hb2": b * counts.n_ffn_rows * F32_BYTES,
        "hb_q": b * q8_bytes(counts.n_ffn_rows),
        "logits": counts.n_vocab_rows * F32_BYTES,
    }
    if role in (ROLE_ROOT, ROLE_COORDINATOR):
        out["embed_row"] = b * slice_row_bytes(layout.token_embd_type, c.dim)
        out["logits_all"] = c.vocab_size * F32_BYTES
        out["sampler"] = c.vocab_size * SAMPLER_BYTES_PER_TOKEN
    return out


def memory_need(layout: ModelLayout, counts: SliceCounts, *, seq_len: int, role: str, n_slice_nodes: int,
                kv_bytes_per_value: int = 4, reserve_bytes: int = 0, batch_size: int = 1,
                n_exchange_nodes: Optional[int] = None) -> MemoryNeed:
    """Everything a node with this slice and role holds at max_seq_len `seq_len`."""
    holds_layers = role != ROLE_COORDINATOR
    return MemoryNeed(
        weights_by_group=weight_bytes(layout, counts, holds_layers),
        kv_cache=kv_cache_bytes(layout, counts.n_kv_heads, seq_len, kv_bytes_per_value),
        buffers_by_name=buffer_bytes(layout, counts, seq_len=seq_len, role=role,
                                     n_slice_nodes=n_slice_nodes, batch_size=batch_size,
                                     n_exchange_nodes=n_exchange_nodes),
        reserve=int(reserve_bytes))


@dataclass(frozen=True)
class NodeMemory:
    """A slice's need met with a node's memory. Bytes are Python ints; headroom may not be < 0
    in a plan (the planner never emits one that is)."""

    weights: int
    kv_cache: int
    buffers: int
    reserve: int
    total: int
    available: int            # RAM the node reported (cgroup limits respected)
    swap_allowed: int         # free swap the plan may use (0 unless allow_swap)
    swap_used: int            # total beyond available RAM, in swap
    headroom: int             # available + swap_allowed - total
    memlock_limit: int        # -1: unlimited
    lockable: bool            # total fits under the memlock limit
    lock: bool                # lockable and nothing in swap: the node mlocks its memory
    weights_by_group: Mapping[str, int] = field(hash=False, default_factory=dict)
    buffers_by_name: Mapping[str, int] = field(hash=False, default_factory=dict)

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in (
            "weights", "kv_cache", "buffers", "reserve", "total", "available", "swap_allowed",
            "swap_used", "headroom", "memlock_limit", "lockable", "lock")}
        out["weights_by_group"] = dict(self.weights_by_group)
        out["buffers_by_name"] = dict(self.buffers_by_name)
        return out


def settle(need: MemoryNeed, *, available: int, free_swap: int, allow_swap: bool,
           memlock_limit: int) -> NodeMemory:
    """Put a need on a node: how much lands in swap, what is left, whether it can be locked."""
    total = need.total
    swap_allowed = int(free_swap) if allow_swap else 0
    swap_used = min(max(0, total - int(available)), swap_allowed)
    lockable = memlock_limit < 0 or total <= memlock_limit
    return NodeMemory(
        weights=need.weights, kv_cache=need.kv_cache, buffers=need.buffers, reserve=need.reserve,
        total=total, available=int(available), swap_allowed=swap_allowed, swap_used=swap_used,
        headroom=int(available) + swap_allowed - total, memlock_limit=int(memlock_limit),
        lockable=lockable, lock=lockable and swap_used == 0,
        weights_by_group=dict(need.weights_by_group), buffers_by_name=dict(need.buffers_by_name))
