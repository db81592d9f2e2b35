"""`dllama-ctl status` as text: the nodes table, the root, the plan. Pure functions over the
status answer of the control socket (daemon/control.py):

    {"node_id", "state", "root_id", "term", "peers": [advert dicts], "plan": dict | null,
     "plan_table": str | null, "nodes": [{"node_id", "role", "address",
     "available_ram_bytes", "free_swap_bytes", "memlock_limit_bytes", "cores", "slice",
     "planned_bytes", "locked", "locked_bytes", "tok_s", "state"}], "last_error"}

"node_id" is the node that answered (asked on a worker, the root's answer carries the
worker's id): its row is the one marked "(this node)". Slices print in the plan's notation,
half-open [start,stop). The locked column shows the bytes a node locked in RAM, NO when it
locked none, - when it did not say.

A daemon that does not send "nodes" yet (an older one) still gets a table: this node and
its peers from "peers", roles and slices from "plan".
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from dllama_node.common.units import format_bytes
from dllama_node.plan.table import slice_cell

COLUMNS = ("node", "role", "address", "RAM", "swap", "slice", "locked", "tok/s", "state")
THIS_NODE = " (this node)"


def slice_text(plan_node: dict) -> str:
    """A plan node's rows in the plan's notation: half-open ranges [start,stop)."""
    if plan_node.get("role") == "coordinator":
        return "coordinator (no rows)"
    ranges = [(list(plan_node.get(key) or (0, 0)) + [0, 0])[:2]
              for key in ("q_heads", "ffn_rows", "vocab_rows")]
    return slice_cell(*ranges)


def nodes_from_status(status: dict) -> List[dict]:
    """The per-node rows: status["nodes"] when the daemon sends them, else built from this
    node, its peers and the plan (fields the daemon does not know are None)."""
    if isinstance(status.get("nodes"), list):
        return [dict(n) for n in status["nodes"]]
    plan = status.get("plan") or {}
    planned: Dict[str, dict] = {n["node_id"]: n for n in plan.get("nodes", ())}
    excluded = {x["node_id"] for x in plan.get("excluded", ())}
    ids = [status.get("node_id")] + [p.get("node_id") for p in status.get("peers", ())]
    adverts = {p.get("node_id"): p for p in status.get("peers", ())}
    rows = []
    for node_id in dict.fromkeys(i for i in ids if i):
        a = adverts.get(node_id, {})
        p = planned.get(node_id)
        if p is not None:
            role = p.get("role", "worker")
        elif node_id in excluded:
            role = "excluded"
        else:
            role = "root" if node_id == status.get("root_id") else "worker"
        memory = (p or {}).get("memory", {})
        rows.append({
            "node_id": node_id, "role": role,
            "address": f"{a['address']}:{a['port']}" if a.get("address") else "",
            "available_ram_bytes": a.get("available_ram_bytes", memory.get("available")),
            "free_swap_bytes": a.get("free_swap_bytes"),
            "memlock_limit_bytes": a.get("memlock_limit_bytes", memory.get("memlock_limit")),
            "cores": a.get("cores"),
            "slice": slice_text(p) if p else "-",
            "planned_bytes": memory.get("total"),
            "locked": memory.get("lock") if p else None,
            "tok_s": None,
            "state": a.get("state") or (status.get("state") if node_id == status.get("node_id")
                                        else ""),
        })
    return rows


def _cell_bytes(n) -> str:
    return "-" if n is None else format_bytes(n)


def _cell_locked(row: dict) -> str:
    """The bytes locked; NO for none; yes when an older daemon sends only "locked"."""
    n, v = row.get("locked_bytes"), row.get("locked")
    if isinstance(n, int):
        return format_bytes(n) if n > 0 else "NO"
    return "-" if v is None else ("yes" if v else "NO")


def _cell_tok_s(v) -> str:
    return "-" if v is None else f"{float(v):.1f}"


def nodes_table(rows: Sequence[dict], this_node: Optional[str] = None) -> str:
    """The table, one line per node; this node (the one that answered) marked "(this node)"."""
    cells = [COLUMNS]
    for r in rows:
        mark = THIS_NODE if r.get("node_id") == this_node else ""
        cells.append((f"{r.get('node_id', '?')}{mark}", str(r.get("role") or "-"),
                      str(r.get("address") or "-"), _cell_bytes(r.get("available_ram_bytes")),
                      _cell_bytes(r.get("free_swap_bytes")), str(r.get("slice") or "-"),
                      _cell_locked(r), _cell_tok_s(r.get("tok_s")),
                      str(r.get("state") or "-")))
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    right = {3, 4, 6, 7}                   # numbers line up on the right
    lines = []
    for row in cells:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def format_status(status: dict) -> str:
    """The whole `dllama-ctl status` text."""
    node_id = status.get("node_id", "?")
    root = status.get("root_id") or "none elected"
    lines = [f"this node  {node_id} ({status.get('state', '?')})",
             f"root       {root}" + (f" (term {status['term']})" if status.get("term") else "")]
    rows = nodes_from_status(status)
    lines += ["", nodes_table(rows, node_id)]
    unlocked = [r["node_id"] for r in rows if r.get("locked") is False]
    if unlocked:
        lines.append(f"not locked in RAM: {', '.join(unlocked)} (dllama-ctl doctor says why)")
    plan = status.get("plan")
    if status.get("plan_table"):
        lines += ["", status["plan_table"].rstrip()]
    elif plan:
        lines += ["", f"plan: {plan.get('model', 'model')}, max_seq_len {plan.get('max_seq_len')}"
                      f" ({plan.get('seq_len_reason', '')})"]
    else:
        lines += ["", "plan: none yet"]
    loading = status.get("loading") or {}
    if loading.get("nodes"):
        from dllama_node.ctl.load_view import load_lines
        head = "slices loaded" if loading.get("done") else "loading slices"
        lines += ["", f"{head} (load {loading.get('load_id', '?')}):"] + \
            ["  " + line for line in load_lines(status)]
    for x in (plan or {}).get("excluded", ()):
        lines.append(f"left out: {x['node_id']}: {x['reason']}")
    for w in (plan or {}).get("warnings", ()):
        lines.append(f"warning: {w}")
    if status.get("last_error"):
        lines.append(f"last error: {status['last_error']}")
    return "\n".join(lines)
