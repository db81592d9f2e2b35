"""The plan as people read it: one row per node, byte columns in MiB, then the totals, the
chosen max_seq_len with its reason, the excluded nodes and the warnings.

Ranges print half-open, [start,stop); amounts a node needs round up, amounts it has round down.
"""
from __future__ import annotations

import math
from typing import List, Sequence

from dllama_node.common.units import MiB

from .data import NodeSlice, ShardPlan

HEADERS = ("node", "role", "q heads", "kv heads", "ffn rows", "vocab rows", "weights", "KV cache",
           "buffers", "reserve", "total", "available", "swap", "headroom", "locked")
NEED_COLUMNS = ("weights", "kv_cache", "buffers", "reserve", "total", "swap_used")
HAVE_COLUMNS = ("available", "headroom")


def _mib(n: int, up: bool) -> str:
    return str(math.ceil(n / MiB) if up else math.floor(n / MiB))


def _range(r) -> str:
    return "-" if r[1] <= r[0] else f"[{r[0]},{r[1]})"


def _row(node: NodeSlice) -> List[str]:
    m = node.memory
    cells = [node.node_id, node.role, _range(node.q_heads), _range(node.kv_heads),
             _range(node.ffn_rows), _range(node.vocab_rows)]
    cells += [_mib(getattr(m, name), up=True) for name in NEED_COLUMNS[:-1]]
    cells += [_mib(m.available, up=False), _mib(m.swap_used, up=True), _mib(m.headroom, up=False),
              _mib(m.total, up=True) if m.lock else "no"]
    return cells


def _align(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_plan(plan: ShardPlan) -> str:
    """A per-node table of the plan (MiB), its totals and its notes, as one string."""
    rows = [list(HEADERS)] + [_row(n) for n in plan.nodes]
    t = plan.totals()
    nodes = plan.nodes
    rows.append(["total", f"{plan.n_nodes} nodes",
                 str(sum(n.n_q_heads for n in nodes)), str(sum(n.n_kv_heads for n in nodes)),
                 str(sum(n.n_ffn_rows for n in nodes)), str(sum(n.n_vocab_rows for n in nodes))]
                + [_mib(t[name], up=True) for name in NEED_COLUMNS[:-1]]
                + [_mib(t["available"], up=False), _mib(t["swap_used"], up=True),
                   _mib(t["headroom"], up=False),
                   _mib(sum(n.memory.total for n in nodes if n.memory.lock), up=True)])
    lines = _align(rows)
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines.append("(MiB; locked: what the node mlocks, or no; q/kv heads, ffn and vocab rows are half-open "
                 "ranges; kv heads held by two nodes count twice)")
    lines.append(plan.seq_len_reason)
    lines += [f"excluded {e.node_id}: {e.reason}" for e in plan.excluded]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
