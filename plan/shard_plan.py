"""The shard plan: which rows of the model each node holds, and what that costs it.

    plan_shards(layout, capacities, options) -> ShardPlan        (pure: no sockets, files, /proc)

Units (DESIGN.md): attention by query heads (node i gets query heads [h0, h1) and computes and
caches the KV heads they read, [h0 // kv_group, (h1 - 1) // kv_group + 1): a KV head whose query
heads fall on two nodes is held by both); FFN rows (ffn_gate / ffn_up rows = ffn_down columns)
and classifier rows in 32-row blocks, the last block possibly short. A quantized attn_output
is cut at whole 32-value blocks, so its attention unit may be several heads (layout.heads_per_unit).

How the units are placed (apportion.py): each kind in turn -- attention, FFN, classifier -- unit
by unit to the node with the highest weight / (count + 1/2) that still has room; weights are the
nodes' speed scores, or options.split. A node whose proportional slice does not fit takes what
fits and the others share the rest (water-filling). Ranges follow node order: the root (node
index 0, capacities[0]) first. Attention, whose KV heads make its cost depend on where a range
starts, tries the proportional split first, then whole KV groups, then single units counted
at their worst case (place_attention).

Decisions a reader may look for:
- More nodes than attention units: the surplus nodes get no heads (and no KV cache) but still
  FFN and classifier rows. A node whose share rounds to no unit at all is excluded.
- A node that cannot hold one unit of each kind (with its KV heads, buffers and reserve) is
  excluded with the numbers as its reason (the default max_seq_len is shortened first, to keep
  every node in the plan, as long as that alone makes them fit). A root that cannot becomes
  coordinator-only (it embeds, gathers logits and samples); the plan says so in its warnings.
- Swap counts only with allow_swap, and only when RAM alone cannot hold the plan: a node whose
  total spills into swap does not lock its memory, and the plan carries a warning. The default
  max_seq_len is first sought in RAM alone; only when nothing fits RAM at any length does swap
  count.
- Default max_seq_len: the model card's, at most options.seq_len_cap (4096, as for a single node),
  if it fits; else the largest multiple of 256 (at least 128) for which every node's total fits;
  the plan states why (seq_len_reason). Balance comes
  first: the longest context at which every slice is still in proportion to speed, when that is
  at least 2048 tokens (or the model card's, if shorter); otherwise the longest at which
  water-filling fits. (Else the KV cache would crowd the weights onto the nodes with room left,
  and the node with the most work per unit of speed would set the pace. An explicit
  max_seq_len always water-fills.)
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from dllama_node.common.errors import UsageError
from dllama_node.model.tensors import SliceSpec

from . import advice
from .accounting import (ROLE_COORDINATOR, ROLE_ROOT, ROLE_WORKER, MemoryNeed, SliceCounts, memory_need,
                         settle)
from .apportion import Range, apportion, kv_range, max_kv_heads, ranges_from_counts
from .data import (DEFAULT_RESERVE_BYTES, Draft, ExcludedNode, NodeCapacity,  # noqa: F401 (re-exported)
                   NodeSlice, PlanError, PlanOptions, ShardPlan, Shortfall)
from .layout import ModelLayout
from .seq_len import LIMIT_ASKED, default_lengths, longest_fitting, seq_len_reason

log = logging.getLogger(__name__)

ROW_BLOCK = 32          # FFN and classifier rows go in blocks of this many
BALANCED_ENOUGH_SEQ = 2048   # balanced slices are preferred when they leave at least this context


def plan_shards(layout: ModelLayout, capacities: Sequence[NodeCapacity],
                options: PlanOptions = PlanOptions()) -> ShardPlan:
    """Slices for every node that can hold one, in proportion to speed, bounded by memory.

    capacities[0] is the root. Raises PlanError (a MemoryPlanError) when nothing fits, UsageError
    for inconsistent inputs, ModelFileError when quantized rows cannot be cut in whole blocks."""
    _validate(layout, capacities, options)
    layout.check_sliceable()
    planner = Planner(layout, list(capacities), options)
    model_seq = layout.config.seq_len
    if options.max_seq_len is not None:
        seq_len = options.max_seq_len
        result = planner.fit(seq_len)
        if isinstance(result, Shortfall):
            raise advice.plan_error(planner, result, seq_len)
        reason = seq_len_reason(seq_len, model_seq, LIMIT_ASKED)
    else:
        seq_len, result, balanced = planner.largest_fitting_seq_len()
        if isinstance(result, Shortfall):
            raise advice.plan_error(planner, result, seq_len)
        reason = advice.seq_len_reason(planner, result, seq_len, balanced)
    log.info("%s", reason)
    return ShardPlan(layout, options, seq_len, reason, result.nodes, result.excluded, result.warnings)


def _validate(layout: ModelLayout, capacities: Sequence[NodeCapacity], options: PlanOptions) -> None:
    if not capacities:
        raise UsageError("no nodes to plan for: capacities is empty")
    seen = set()
    for cap in capacities:
        if not cap.node_id or cap.node_id in seen:
            raise UsageError(f"node id {cap.node_id!r} is empty or not unique")
        seen.add(cap.node_id)
        for name in ("available_ram_bytes", "free_swap_bytes"):
            if int(getattr(cap, name)) < 0:
                raise UsageError(f"node {cap.node_id}: {name} is {getattr(cap, name)}, expected >= 0")
        if int(cap.memlock_limit_bytes) < -1:
            raise UsageError(f"node {cap.node_id}: memlock_limit_bytes is {cap.memlock_limit_bytes}, "
                             f"expected >= 0 or -1 (unlimited)")
        if not (math.isfinite(cap.speed) and cap.speed >= 0):
            raise UsageError(f"node {cap.node_id}: speed is {cap.speed}, expected a finite number >= 0")
    model_seq = layout.config.seq_len
    if options.max_seq_len is not None and not 1 <= options.max_seq_len <= model_seq:
        raise UsageError(f"max_seq_len {options.max_seq_len} is outside [1, {model_seq}] "
                         f"(the model's context is {model_seq})")
    if options.split is not None:
        if len(options.split) != len(capacities):
            raise UsageError(f"split has {len(options.split)} weights, there are {len(capacities)} nodes")
        for w in options.split:
            if not (math.isfinite(w) and w >= 0):
                raise UsageError(f"split weight {w} is not a finite number >= 0")
    if options.reserve_bytes < 0 or options.kv_bytes_per_value < 1 or options.batch_size < 1:
        raise UsageError(f"reserve_bytes {options.reserve_bytes} (>= 0), kv_bytes_per_value "
                         f"{options.kv_bytes_per_value} (>= 1), batch_size {options.batch_size} (>= 1)")


class Planner:
    """Plans for fixed inputs at any max_seq_len; the advice module asks it what-if questions."""

    def __init__(self, layout: ModelLayout, capacities: List[NodeCapacity], options: PlanOptions):
        self.layout = layout
        self.capacities = capacities
        self.options = options
        self.weights: List[float] = []
        self.candidates: List[int] = []              # capacity indices that may hold a slice
        self.pre_excluded: List[ExcludedNode] = []
        self.pre_warnings: List[str] = []
        for i, cap in enumerate(capacities):
            w = float(options.split[i] if options.split is not None else cap.speed)
            self.weights.append(w)
            what = "split weight" if options.split is not None else "speed score"
            if cap.coordinator_only:
                if i != 0:
                    self.pre_excluded.append(ExcludedNode(
                        cap.node_id, "coordinator_only, and only the root (node index 0) coordinates"))
            elif w == 0:
                if i == 0:      # the root stays in the plan: it embeds, gathers and samples
                    self.pre_warnings.append(f"root {cap.node_id} only coordinates: its {what} is 0")
                else:
                    self.pre_excluded.append(ExcludedNode(cap.node_id, f"its {what} is 0"))
            else:
                self.candidates.append(i)

    # -- the fit at one max_seq_len -------------------------------------------------------------

    def fit(self, seq_len: int) -> Union[Draft, Shortfall]:
        """A plan in RAM alone; with allow_swap, else one that uses swap."""
        result = self.plan_at(seq_len, use_swap=False)
        if isinstance(result, Shortfall) and self.options.allow_swap:
            result = self.plan_at(seq_len, use_swap=True)
        return result

    def largest_fitting_seq_len(self) -> Tuple[int, Union[Draft, Shortfall], bool]:
        """The default max_seq_len, its plan (or the shortfall at the smallest length), and
        whether the plan keeps every slice in proportion to speed (see the module docstring)."""
        model_seq = self.layout.config.seq_len
        lengths = default_lengths(model_seq, self.options.seq_len_cap)
        modes = (False, True) if self.options.allow_swap else (False,)
        failure: Optional[Shortfall] = None
        enough = min(BALANCED_ENOUGH_SEQ, lengths[-1])
        # RAM alone first, swap only when nothing fits RAM; every node in the plan first, leaving
        # out the ones too small for a slice only when nothing fits with them.
        for use_swap in modes:
            for keep_all in (True, False):
                balanced_len, balanced = self.search(lengths, lambda s: self.plan_at(
                    s, use_swap, balanced=True, keep_all=keep_all))
                if not isinstance(balanced, Shortfall) and balanced_len >= enough:
                    return balanced_len, balanced, True
                seq_len, result = self.search(lengths, lambda s: self.plan_at(s, use_swap, keep_all=keep_all))
                if not isinstance(result, Shortfall):
                    return seq_len, result, False
                failure = result
        assert failure is not None
        return lengths[0], failure, False

    @staticmethod
    def search(lengths: Sequence[int], attempt) -> Tuple[int, Union[Draft, Shortfall]]:
        """The largest length in ascending `lengths` whose attempt is a Draft, else the first
        one's Shortfall (plan/seq_len.longest_fitting)."""
        return longest_fitting(lengths, attempt, lambda r: not isinstance(r, Shortfall))

    def need(self, counts: SliceCounts, role: str, seq_len: int, n_slice_nodes: int,
             layout: Optional[ModelLayout] = None, coordinated: bool = False) -> MemoryNeed:
        """coordinated: a coordinator takes part in the exchange besides the slice nodes."""
        o = self.options
        return memory_need(layout or self.layout, counts, seq_len=seq_len, role=role,
                           n_slice_nodes=n_slice_nodes, kv_bytes_per_value=o.kv_bytes_per_value,
                           reserve_bytes=o.reserve_bytes, batch_size=o.batch_size,
                           n_exchange_nodes=n_slice_nodes + (1 if coordinated else 0))

    def smallest_counts(self, layout: Optional[ModelLayout] = None) -> SliceCounts:
        """One unit of each kind, with the most KV heads one attention unit can read."""
        layout = layout or self.layout
        c = layout.config
        unit = layout.heads_per_unit
        return SliceCounts(unit, max_kv_heads(unit, c.kv_group, c.n_kv_heads),
                           min(ROW_BLOCK, c.hidden_dim), min(ROW_BLOCK, c.vocab_size))

    def plan_at(self, seq_len: int, use_swap: bool, layout: Optional[ModelLayout] = None,
                extra: Sequence[Tuple[NodeCapacity, float]] = (), balanced: bool = False,
                keep_all: bool = False) -> Union[Draft, Shortfall]:
        """Plan at one max_seq_len. `layout` and `extra` (more nodes, with weights) are what-ifs.
        balanced: every node's slice in proportion to its weight, or a Shortfall (no water-filling).
        keep_all: a Shortfall rather than leaving out a node too small for a slice."""
        attempt = _Attempt(self, layout or self.layout, seq_len, use_swap, extra)
        admitted = attempt.admit(keep_all)
        if isinstance(admitted, Shortfall):
            return admitted
        counts = attempt.place(balanced)
        if isinstance(counts, Shortfall):
            return counts
        return attempt.draft(*counts, balanced=balanced)


class _Attempt:
    """One try at a plan: fixed max_seq_len, layout, nodes and swap rule. Three steps: admit the
    nodes that can hold a slice, place the units, write down each node's slice and bytes."""

    def __init__(self, planner: Planner, layout: ModelLayout, seq_len: int, use_swap: bool,
                 extra: Sequence[Tuple[NodeCapacity, float]]):
        self.planner = planner
        self.layout = layout
        self.config = layout.config
        self.seq_len = seq_len
        self.use_swap = use_swap
        self.caps = planner.capacities + [cap for cap, _ in extra]
        self.weights = planner.weights + [w for _, w in extra]
        self.members = planner.candidates + list(range(len(planner.capacities), len(self.caps)))
        self.excluded = list(planner.pre_excluded)
        self.warnings = list(planner.pre_warnings)
        self.root_coordinates = 0 not in self.members

    def budget(self, i: int) -> int:
        cap = self.caps[i]
        return int(cap.available_ram_bytes) + (int(cap.free_swap_bytes) if self.use_swap else 0)

    def need(self, i: int, counts: SliceCounts, role: Optional[str] = None,
             n_slice_nodes: Optional[int] = None) -> MemoryNeed:
        role = role or (ROLE_ROOT if i == 0 else ROLE_WORKER)
        n = len(self.members) if n_slice_nodes is None else n_slice_nodes
        return self.planner.need(counts, role, self.seq_len, n, self.layout,
                                 coordinated=bool(self.root_coordinates))

    def too_small(self, i: int, need: MemoryNeed) -> Shortfall:
        node_id = self.caps[i].node_id
        return Shortfall(advice.too_small_text(node_id, self.budget(i), need, self.seq_len, self.use_swap,
                                               subject=True), node_id, need.total, self.budget(i))

    def admit(self, keep_all: bool) -> Optional[Shortfall]:
        """Leave out the nodes that cannot hold one unit of each kind (a root only coordinates)."""
        smallest = self.planner.smallest_counts(self.layout)
        too_small: List[Tuple[int, MemoryNeed]] = []
        for i in list(self.members):
            need = self.need(i, smallest)
            if self.budget(i) < need.total:
                self.members.remove(i)
                too_small.append((i, need))
                reason = advice.too_small_text(self.caps[i].node_id, self.budget(i), need, self.seq_len,
                                               self.use_swap)
                if i == 0:
                    self.root_coordinates = True
                    self.warnings.append(f"root {self.caps[0].node_id} only coordinates: it {reason}")
                else:
                    self.excluded.append(ExcludedNode(self.caps[i].node_id, reason))
        if too_small and keep_all:
            return self.too_small(*too_small[0])
        if not self.members:
            if too_small:
                return self.too_small(*max(too_small, key=lambda t: self.budget(t[0]) - t[1].total))
            return Shortfall("no node may hold a slice: " + "; ".join(
                f"{e.node_id}: {e.reason}" for e in self.excluded), None, 0, 0)
        if self.root_coordinates:
            need = self.need(0, SliceCounts(), ROLE_COORDINATOR)
            if self.budget(0) < need.total:
                return Shortfall(advice.coordinator_text(self.caps[0].node_id, self.budget(0), need),
                                 self.caps[0].node_id, need.total, self.budget(0))
        return None

    def place(self, balanced: bool) -> Union[Tuple[List[int], List[int], List[int]], Shortfall]:
        """Query heads, FFN blocks and classifier blocks per member, in member order."""
        c, members, n = self.config, self.members, len(self.members)
        # Costs come from the accounting itself: it is linear in FFN and classifier blocks, and
        # attention steps with the KV heads a head range reads.
        fixed = [self.need(i, SliceCounts()).total for i in members]
        ffn_block = self.need(members[0], SliceCounts(n_ffn_rows=ROW_BLOCK)).total - fixed[0]
        vocab_block = self.need(members[0], SliceCounts(n_vocab_rows=ROW_BLOCK)).total - fixed[0]
        attn_cost: Dict[Tuple[int, int, int], int] = {}

        def attention(j: int, heads: int, kv_heads: int) -> int:
            """Bytes of `heads` query heads reading `kv_heads` KV heads on member j."""
            if (j, heads, kv_heads) not in attn_cost:
                need = self.need(members[j], SliceCounts(heads, kv_heads))
                attn_cost[(j, heads, kv_heads)] = need.total - fixed[j]
            return attn_cost[(j, heads, kv_heads)]

        w = [self.weights[i] for i in members]
        room = [math.inf] * n if balanced else [self.budget(i) - f for i, f in zip(members, fixed)]
        attn = place_attention(self.layout, w, room, attention)
        if attn is None:
            return self.cluster_shortfall("attention heads")
        for j, q in enumerate(ranges_from_counts(attn, 1, c.n_heads)):
            kv = kv_range(q, c.kv_group)
            room[j] -= attention(j, q[1] - q[0], kv[1] - kv[0])
        ffn = apportion(-(-c.hidden_dim // ROW_BLOCK), w, lambda j, k: (k + 1) * ffn_block <= room[j])
        if ffn is None:
            return self.cluster_shortfall("FFN rows")
        room = [r - k * ffn_block for r, k in zip(room, ffn)]
        vocab = apportion(-(-c.vocab_size // ROW_BLOCK), w, lambda j, k: (k + 1) * vocab_block <= room[j])
        if vocab is None:
            return self.cluster_shortfall("classifier rows")
        return attn, ffn, vocab

    def draft(self, attn: List[int], ffn: List[int], vocab: List[int],
              balanced: bool) -> Union[Draft, Shortfall]:
        """Ranges from the counts, and each node's bytes met with its memory."""
        c = self.config
        keep = [j for j, i in enumerate(self.members) if i == 0 or attn[j] + ffn[j] + vocab[j] > 0]
        total_weight = sum(self.weights[i] for i in self.members)
        for j, i in enumerate(self.members):
            if j not in keep:
                self.excluded.append(ExcludedNode(self.caps[i].node_id, (
                    f"its weight {self.weights[i]:g} of {total_weight:g} rounds to no unit of any kind")))
        members = [self.members[j] for j in keep]
        q_ranges = ranges_from_counts([attn[j] for j in keep], 1, c.n_heads)
        ffn_ranges = ranges_from_counts([ffn[j] for j in keep], ROW_BLOCK, c.hidden_dim)
        vocab_ranges = ranges_from_counts([vocab[j] for j in keep], ROW_BLOCK, c.vocab_size)
        n = len(members)
        nodes: List[NodeSlice] = []
        if self.root_coordinates:
            nodes.append(self.slice(0, 0, ROLE_COORDINATOR, (0, 0), (0, 0), (0, 0), (0, 0),
                                    self.need(0, SliceCounts(), ROLE_COORDINATOR, n)))
        for i, q, ffn_rows, vocab_rows in zip(members, q_ranges, ffn_ranges, vocab_ranges):
            kv = kv_range(q, c.kv_group)
            counts = SliceCounts(q[1] - q[0], kv[1] - kv[0], ffn_rows[1] - ffn_rows[0],
                                 vocab_rows[1] - vocab_rows[0])
            nodes.append(self.slice(i, len(nodes), ROLE_ROOT if i == 0 else ROLE_WORKER, q, kv, ffn_rows,
                                    vocab_rows, self.need(i, counts, n_slice_nodes=n)))
        for node in nodes:
            m = node.memory
            if m.headroom < 0:
                if not balanced:
                    raise AssertionError(f"planner bug: node {node.node_id} over by {-m.headroom} bytes")
                return Shortfall(f"node {node.node_id}'s share needs {advice.needs(m.total)}",
                                 node.node_id, m.total, m.available + m.swap_allowed)
            self.warnings.extend(advice.node_warnings(node))
        return Draft(tuple(nodes), tuple(self.excluded), tuple(self.warnings))

    def slice(self, i: int, index: int, role: str, q: Range, kv: Range, ffn: Range, vocab: Range,
              need: MemoryNeed) -> NodeSlice:
        cap = self.caps[i]
        memory = settle(need, available=cap.available_ram_bytes, free_swap=cap.free_swap_bytes,
                        allow_swap=self.use_swap, memlock_limit=cap.memlock_limit_bytes)
        weight = 0.0 if role == ROLE_COORDINATOR else self.weights[i]
        return NodeSlice(cap.node_id, index, role, weight, SliceSpec(q, kv, ffn, vocab), memory)

    def cluster_shortfall(self, kind: str) -> Shortfall:
        """The least the whole model needs on these nodes (no KV head twice) against their sum."""
        c = self.config
        everything = SliceCounts(c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size)
        whole = self.need(-1, everything, ROLE_WORKER)
        empty = self.need(-1, SliceCounts(), ROLE_WORKER)
        fixed = [self.need(i, SliceCounts()) for i in self.members]
        need_total = whole.total - empty.total + sum(f.total for f in fixed)
        weights = whole.weights - empty.weights + sum(f.weights for f in fixed)
        text = advice.cluster_text(kind, [(self.caps[i].node_id, self.budget(i)) for i in self.members],
                                   self.seq_len, need_total, weights, whole.kv_cache)
        return Shortfall(text, self.caps[min(self.members, key=self.budget)].node_id, need_total,
                         sum(self.budget(i) for i in self.members))


def place_attention(layout: ModelLayout, weights: Sequence[float], room: Sequence[float],
                    cost: Callable[[int, int, int], int]) -> Optional[List[int]]:
    """Query heads per node (multiples of layout.heads_per_unit, summing to n_heads), or None.

    cost(j, n_heads, n_kv_heads): bytes node j needs for that many query and KV heads; room[j]:
    what node j has for them. Tried in order: the split in proportion to weight, if it fits as
    cut; else whole KV groups, unit by unit (no KV head held twice); else head units, each node
    counted with the most KV heads its range could read (where it starts is not known yet)."""
    c = layout.config
    unit, group = layout.heads_per_unit, c.kv_group

    def fits(heads: List[int]) -> bool:
        for j, q in enumerate(ranges_from_counts(heads, 1, c.n_heads)):
            kv = kv_range(q, group)
            if cost(j, q[1] - q[0], kv[1] - kv[0]) > room[j]:
                return False
        return True

    counts = apportion(c.n_heads // unit, weights, lambda j, k: True)
    assert counts is not None
    if fits([k * unit for k in counts]):
        return [k * unit for k in counts]
    whole = unit * group // math.gcd(unit, group)      # heads in a whole number of units and groups
    counts = apportion(c.n_heads // whole, weights,
                       lambda j, k: cost(j, (k + 1) * whole, (k + 1) * whole // group) <= room[j])
    if counts is not None:
        return [k * whole for k in counts]
    counts = apportion(c.n_heads // unit, weights, lambda j, k: cost(
        j, (k + 1) * unit, max_kv_heads((k + 1) * unit, group, c.n_kv_heads)) <= room[j])
    return None if counts is None else [k * unit for k in counts]
