"""The plan's words: why a node was left out, why max_seq_len is what it is, and -- when nothing
fits -- one PlanError naming the node and the numbers, with what would make it fit (found by
asking the planner: a shorter max_seq_len, allowing swap, one more node, a smaller quantization).

Amounts a node has are rounded down, amounts it needs are rounded up, so a message never says
"has 530 MiB, needs 530 MiB".
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from dllama_node.common.errors import ModelFileError
from dllama_node.common.units import GiB, MiB

from .accounting import ROLE_COORDINATOR, ROLE_WORKER, MemoryNeed, SliceCounts
from .data import Draft, NodeCapacity, NodeSlice, PlanError, Shortfall
from .layout import F16, F32, Q4_0, Q8_0
from .seq_len import (LIMIT_CAP, LIMIT_MEMORY, LIMIT_MODEL, default_lengths,
                      seq_len_reason as reason_text, shorter_lengths)

if TYPE_CHECKING:   # the planner imports this module
    from .shard_plan import Planner


def _fmt(n: int, up: bool) -> str:
    rnd = math.ceil if up else math.floor
    if abs(n) >= GiB:
        return f"{rnd(n * 10 / GiB) / 10:.1f} GiB"
    return f"{rnd(n / MiB)} MiB"


def have(n: int) -> str:
    """An amount a node has (rounded down): '412 MiB', '1.2 GiB'."""
    return _fmt(n, up=False)


def needs(n: int) -> str:
    """An amount something needs (rounded up)."""
    return _fmt(n, up=True)


def too_small_text(node_id: str, budget: int, need: MemoryNeed, seq_len: int, use_swap: bool,
                   subject: bool = False) -> str:
    """'node b3 has 412 MiB available, its smallest slice needs 530 MiB (weights ...)'."""
    where = "available with swap" if use_swap else "available"
    text = (f"has {have(budget)} {where}, its smallest slice needs {needs(need.total)} "
            f"(weights {needs(need.weights)}, KV cache {needs(need.kv_cache)} at max_seq_len {seq_len}, "
            f"buffers {needs(need.buffers)}, reserve {needs(need.reserve)})")
    return f"node {node_id} {text}" if subject else text


def coordinator_text(node_id: str, budget: int, need: MemoryNeed) -> str:
    return (f"node {node_id} (the root, coordinating only) has {have(budget)} available, coordinating "
            f"needs {needs(need.total)} (logits, sampler and sync buffers {needs(need.buffers)}, "
            f"reserve {needs(need.reserve)})")


def cluster_text(kind: str, nodes: Sequence[Tuple[str, int]], seq_len: int, need_total: int,
                 weights: int, kv_cache: int) -> str:
    """'node b1 has 400 MiB available, the model needs 627 MiB on it (...)', or for several
    nodes their sum against the least the slices need with every node's buffers and reserve."""
    parts = (f"weights {needs(weights)}, KV cache {needs(kv_cache)} at max_seq_len {seq_len}, "
             f"buffers and reserve {needs(need_total - weights - kv_cache)}")
    if len(nodes) == 1:
        node_id, budget = nodes[0]
        return (f"node {node_id} has {have(budget)} available, the model needs {needs(need_total)} "
                f"on it ({parts})")
    listed = ", ".join(f"{node_id} ({have(budget)})" for node_id, budget in nodes)
    total = sum(b for _, b in nodes)
    but = "" if total < need_total else " but cut in whole units they do not pack into the nodes"
    return (f"nodes {listed} have {have(total)} available in all, the slices need at least "
            f"{needs(need_total)} ({parts}){but}: no node has room left for the {kind}")


def node_warnings(node: NodeSlice) -> List[str]:
    m = node.memory
    out = []
    if m.swap_used:
        out.append(f"node {node.node_id} puts {needs(m.swap_used)} of its {needs(m.total)} in swap: "
                   f"its memory is not locked and tokens will be slower")
    if not m.lockable:
        out.append(f"node {node.node_id}: its {needs(m.total)} exceed the memlock limit of "
                   f"{have(m.memlock_limit)}; it runs unlocked (LimitMEMLOCK=infinity or CAP_IPC_LOCK "
                   f"would lock it)")
    return out


def seq_len_reason(planner: "Planner", draft: Draft, seq_len: int, balanced: bool = False) -> str:
    """Why the default max_seq_len is `seq_len`: the node the model card's length overflows."""
    model_seq = planner.layout.config.seq_len
    swapping = [n.node_id for n in draft.nodes if n.memory.swap_used]
    slice_nodes = [n for n in draft.nodes if n.role != ROLE_COORDINATOR]
    notes = (["slices in proportion to speed"] if balanced and seq_len < model_seq
             and len(slice_nodes) > 1 else []) + (
        [f"with swap on {', '.join(swapping)}"] if swapping else [])
    if seq_len == model_seq:
        return reason_text(seq_len, model_seq, LIMIT_MODEL, notes=notes)
    cap = planner.options.seq_len_cap
    if cap is not None and seq_len == cap:
        # the cap, not memory, may be what holds it: how far --max-seq-len could go
        longest, _ = planner.search(default_lengths(model_seq), planner.fit)
        if longest > seq_len:
            return reason_text(seq_len, model_seq, LIMIT_CAP, notes=notes, longest=longest,
                               memory_limits_longest=longest < model_seq)
    worst: Optional[Tuple[int, NodeSlice, MemoryNeed]] = None
    for node in slice_nodes:
        counts = SliceCounts.of(node.spec)
        full = planner.need(counts, node.role, model_seq, len(slice_nodes))
        deficit = full.total - node.memory.available - node.memory.swap_allowed
        if worst is None or deficit > worst[0]:
            worst = (deficit, node, full)
    if worst is None or worst[0] <= 0:
        why = f"the slices do not fit at {model_seq} tokens"
    else:
        _, node, full = worst
        why = (f"the KV cache of {model_seq} tokens would need {needs(full.kv_cache)} on node "
               f"{node.node_id}, which has {have(node.memory.available)} available")
    return reason_text(seq_len, model_seq, LIMIT_MEMORY, why_memory=why, notes=notes)


def plan_error(planner: "Planner", shortfall: Shortfall, seq_len: int) -> PlanError:
    """One PlanError: the shortfall's sentence, then each change that alone would make it fit."""
    fixes = []
    options = planner.options

    shorter = shorter_lengths(seq_len)
    if shorter:
        length, result = planner.search(shorter, planner.fit)
        if not isinstance(result, Shortfall):
            fixes.append(f"--max-seq-len {length}")

    if not options.allow_swap and any(planner.capacities[i].free_swap_bytes > 0 for i in planner.candidates):
        result = planner.plan_at(seq_len, use_swap=True)
        if not isinstance(result, Shortfall):
            users = ", ".join(f"{n.node_id} {needs(n.memory.swap_used)}" for n in result.nodes
                              if n.memory.swap_used)
            fixes.append(f"--allow-swap (swap would hold {users}, unlocked and slower)")

    extra_bytes = _smallest_extra_node(planner, seq_len)
    if extra_bytes is not None:
        fixes.append(f"another node with {needs(extra_bytes)} available")

    quant = _smaller_quantization(planner, seq_len)
    if quant:
        fixes.append(quant)

    if fixes:
        message = f"{shortfall.text}. Would fit: {'; or '.join(fixes)}"
    else:
        message = f"{shortfall.text}. No single change makes it fit: a smaller model, or more nodes"
    return PlanError(message, shortfall.node_id, shortfall.needed_bytes, shortfall.available_bytes, fixes)


def _smallest_extra_node(planner: "Planner", seq_len: int) -> Optional[int]:
    """The least RAM (to the MiB) of one more node, as fast as the fastest, that makes it fit."""
    weight = max(planner.weights) if any(planner.weights) else 1.0
    c = planner.layout.config

    def fits(n_bytes: int) -> bool:
        extra = (NodeCapacity("another node", n_bytes, 0, -1, 1, weight), weight)
        result = planner.plan_at(seq_len, planner.options.allow_swap, extra=[extra])
        return not isinstance(result, Shortfall)

    everything = SliceCounts(c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size)
    hi = -(-planner.need(everything, ROLE_WORKER, seq_len, len(planner.capacities) + 1).total // MiB)
    if not fits(hi * MiB):
        return None
    lo = 0                                  # invariant: lo MiB does not fit, hi MiB fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * MiB):
            hi = mid
        else:
            lo = mid
    return hi * MiB


def _smaller_quantization(planner: "Planner", seq_len: int) -> Optional[str]:
    layout = planner.layout
    types = layout.matrix_types()
    if not types & {F32, F16, Q8_0}:
        return None
    smaller = layout.requantized(Q4_0)
    try:
        smaller.check_sliceable()
    except ModelFileError:
        return None
    result = planner.plan_at(seq_len, planner.options.allow_swap, layout=smaller)
    if isinstance(result, Shortfall):
        return None
    weights = sum(n.memory.weights for n in result.nodes)
    return f"a q4_0 model ({needs(weights)} of weights on the nodes)"
