"""The plan as people read it, in two tables that fit 100 columns: the slices (which heads and
rows each node computes) and the memory (MiB per node), each with its totals; then the
chosen max_seq_len with its reason, the excluded nodes and the warnings.

Ranges print half-open, [start,stop). Amounts in MiB are whole numbers, rounded so that what
is shown adds up, across and down:
- a node's total rounds up (the plan never looks smaller than it is);
- its parts (weights, KV cache, buffers, reserve) are rounded largest-remainder style to add
  up to that total: each is its exact value rounded down or up, the units left over going to
  the largest fractions (round_to_sum);
- swap needed rounds up, RAM available and headroom round down, each on its own;
- the total row is the sum of the cells above it, so it adds up too (and may exceed the
  exact sum by less than one MiB per node).
"""
from __future__ import annotations

import math
from typing import List, Sequence

from dllama_node.common.units import MiB
from dllama_node.model.tensors import UNITS

from .data import NodeSlice, ShardPlan

SLICE_HEADERS = ("node", "role", "q heads", "kv heads", "ffn rows", "vocab rows")
MEMORY_HEADERS = ("node", "weights", "KV cache", "buffers", "reserve", "total", "available", "swap",
                  "headroom", "locked")
PARTS = ("weights", "kv_cache", "buffers", "reserve")      # they add up to total
SLICE_NOTE = "(q/kv heads, ffn and vocab rows: half-open ranges; kv heads held by two nodes count twice)"
MEMORY_NOTE = ("(MiB; a node's parts add up to its total, rounded up; available and headroom rounded\n"
               " down; locked: its weights and KV cache, which it mlocks, or no; totals: sums of the\n"
               " cells above)")


def round_to_sum(values: Sequence[int], unit: int, total_units: int) -> List[int]:
    """Byte amounts -> whole units adding up to total_units (largest remainder).

    Each value is rounded down, then the units still missing go one each to the values with
    the largest remainders (ties: the earlier value), so every value shows rounded down or
    up, never further; a total_units that would need more (or less) raises ValueError. The
    sum rounded up (or to the nearest) is always possible.
    """
    units = [v // unit for v in values]
    missing = total_units - sum(units)
    if not 0 <= missing <= sum(1 for v in values if v % unit):
        raise ValueError(f"round_to_sum: {sum(values)} bytes cannot show as {total_units} units of "
                         f"{unit} bytes in {len(values)} parts, each rounded down or up")
    by_remainder = sorted(range(len(values)), key=lambda i: (-(values[i] % unit), i))
    for i in by_remainder[:missing]:
        units[i] += 1
    return units


def range_text(r) -> str:
    """A half-open range as the plan prints it: [start,stop), or - when empty."""
    return "-" if r[1] <= r[0] else f"[{r[0]},{r[1]})"


def slice_cell(q_heads, ffn_rows, vocab_rows) -> str:
    """A node's slice in one cell, in the plan's notation, empty parts left out:
    'heads [0,16) ffn [0,2816) vocab [0,16000)'; '-' when it holds none."""
    parts = [f"{name} {range_text(r)}" for name, r in
             (("heads", q_heads), ("ffn", ffn_rows), ("vocab", vocab_rows)) if r[1] > r[0]]
    return " ".join(parts) or "-"


def _memory_cells(node: NodeSlice) -> List[int]:
    """weights, KV cache, buffers, reserve, total, available, swap, headroom, locked (MiB;
    locked: weights + KV cache, the arrays the service mlocks; -1 when the node does not lock)."""
    m = node.memory
    total = math.ceil(m.total / MiB)
    parts = round_to_sum([getattr(m, name) for name in PARTS], MiB, total)
    return parts + [total, m.available // MiB, math.ceil(m.swap_used / MiB), m.headroom // MiB,
                    parts[0] + parts[1] if m.lock else -1]


def _align(rows: Sequence[Sequence[str]], n_left: int) -> List[str]:
    """Columns two spaces apart, the first n_left aligned left (names), the others right
    (numbers); a rule under the header and above the last (total) row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < n_left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    rule = "-" * max(len(line) for line in lines)
    return [lines[0], rule] + lines[1:-1] + [rule, lines[-1]]


def slice_table(plan: ShardPlan) -> List[str]:
    """Which query heads, KV heads, FFN rows and vocabulary rows each node holds."""
    nodes = plan.nodes
    rows = [list(SLICE_HEADERS)]
    rows += [[n.node_id, n.role] + [range_text(getattr(n.spec, unit)) for unit in UNITS]
             for n in nodes]
    rows.append(["total", f"{plan.n_nodes} nodes"]
                + [str(sum(n.spec.count(unit) for n in nodes)) for unit in UNITS])
    return _align(rows, n_left=2) + [SLICE_NOTE]


def memory_table(plan: ShardPlan) -> List[str]:
    """Each node's memory in MiB: what its slice needs, what it has, whether it locks."""
    cells = [_memory_cells(n) for n in plan.nodes]
    sums = [sum(column) for column in zip(*cells)] if cells else [0] * (len(MEMORY_HEADERS) - 1)
    sums[-1] = sum(c[-1] for c in cells if c[-1] >= 0)
    rows = [list(MEMORY_HEADERS)]
    rows += [[n.node_id] + [str(v) for v in c[:-1]] + [str(c[-1]) if c[-1] >= 0 else "no"]
             for n, c in zip(plan.nodes, cells)]
    rows.append(["total"] + [str(v) for v in sums])
    return _align(rows, n_left=1) + MEMORY_NOTE.split("\n")


def format_plan(plan: ShardPlan) -> str:
    """The slice table, the memory table (MiB) and the plan's notes, as one string."""
    lines = slice_table(plan) + [""] + memory_table(plan)
    lines.append(plan.seq_len_reason)
    lines += [f"excluded {e.node_id}: {e.reason}" for e in plan.excluded]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
