"""How far the nodes are through loading their slices: what `dllama-ctl status --wait`, and
`chat` or `generate` asked before the cluster serves, draw as one progress bar per node.

Every node keeps a LoadProgress of its own slice, tagged with the load id the root put in
the assignment. While a plan loads, the root records its own slice and the slices it
streams, and asks each member for its own record (op "progress"); merge_loading, a pure
function, decides what each row shows:

    a member's own record for this load id   -> wins (it knows whether it reads its own
                                                file, its slice cache or a stream)
    else the root's record of streaming to it -> that
    else                                      -> "assigned", nothing done yet

Phases, in order: assigned, streaming, reading, locking, loaded (or kept: an unchanged
slice stays loaded), failed. Byte counts are Python ints (64-bit and beyond).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

PHASES = ("assigned", "streaming", "reading", "locking", "loaded", "kept", "failed")
FINISHED = ("loaded", "kept", "failed")


@dataclass(frozen=True)
class NodeLoad:
    """One node's slice load: phase, bytes done of total, seconds since it began; once
    loaded, the bytes it locked in RAM (None: not known, or locking is off)."""

    node_id: str
    load_id: str
    phase: str
    done: int
    total: int
    elapsed_s: float = 0.0
    detail: str = ""
    locked_bytes: Optional[int] = None

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def to_dict(self) -> dict:
        return {"node_id": self.node_id, "load_id": self.load_id, "phase": self.phase,
                "done": int(self.done), "total": int(self.total),
                "elapsed_s": round(float(self.elapsed_s), 3), "detail": self.detail,
                "locked_bytes": self.locked_bytes}

    @classmethod
    def from_dict(cls, d: Mapping) -> Optional["NodeLoad"]:
        """None for a record that is not one (a peer of another version, garbage)."""
        try:
            phase = str(d["phase"])
            done, total = int(d["done"]), int(d["total"])
        except (KeyError, TypeError, ValueError):
            return None
        if phase not in PHASES or done < 0 or total < 0:
            return None
        locked = d.get("locked_bytes")
        return cls(str(d.get("node_id", "")), str(d.get("load_id", "")), phase,
                   min(done, total) if total else done, total,
                   float(d.get("elapsed_s") or 0.0), str(d.get("detail") or ""),
                   locked if type(locked) is int and locked >= 0 else None)


class LoadProgress:
    """Thread-safe records of slice loads on this node, by node id (its own, and on the
    root those of the workers it streams to). Loads run in worker threads; the control
    loop reads snapshots."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._loads: Dict[str, NodeLoad] = {}
        self._started: Dict[str, float] = {}

    def begin(self, node_id: str, load_id: str, total: int, phase: str = "assigned") -> None:
        with self._lock:
            self._started[node_id] = self._clock()
            self._loads[node_id] = NodeLoad(node_id, load_id, phase, 0, int(total))

    def update(self, node_id: str, phase: str, done: int, total: Optional[int] = None,
               detail: str = "") -> None:
        """Bytes done of this phase; a node not begun is ignored (nothing to attach to)."""
        with self._lock:
            old = self._loads.get(node_id)
            if old is None:
                return
            t = int(total) if total is not None else old.total
            self._loads[node_id] = NodeLoad(node_id, old.load_id, phase, int(done), t,
                                            self._clock() - self._started[node_id],
                                            detail or (old.detail if phase == old.phase else ""))

    def finish(self, node_id: str, phase: str = "loaded", detail: str = "",
               locked_bytes: Optional[int] = None) -> None:
        with self._lock:
            old = self._loads.get(node_id)
            if old is None:
                return
            done = old.done if phase == "failed" else old.total
            self._loads[node_id] = NodeLoad(node_id, old.load_id, phase, done, old.total,
                                            self._clock() - self._started[node_id], detail,
                                            locked_bytes)

    def get(self, node_id: str) -> Optional[NodeLoad]:
        with self._lock:
            load = self._loads.get(node_id)
        if load is not None and not load.finished:     # elapsed grows while it runs
            load = NodeLoad(load.node_id, load.load_id, load.phase, load.done, load.total,
                            self._clock() - self._started[node_id], load.detail)
        return load

    def clear(self) -> None:
        with self._lock:
            self._loads.clear()
            self._started.clear()


def merge_loading(load_id: str, planned: Mapping[str, int], root_view: Mapping[str, NodeLoad],
                  reports: Mapping[str, Optional[NodeLoad]]) -> Dict[str, NodeLoad]:
    """Each planned node's row for load `load_id`. planned: node id -> its slice's weight
    bytes from the plan (the bar's length until the node says otherwise); root_view: the
    root's own records; reports: what each member said of itself (None: no answer)."""
    rows: Dict[str, NodeLoad] = {}
    for node_id, weights in planned.items():
        own = reports.get(node_id)
        seen = root_view.get(node_id)
        if own is not None and own.load_id == load_id:
            if own.total == 0 and not own.finished:     # begun, size not known there yet
                own = NodeLoad(own.node_id, own.load_id, own.phase, own.done, int(weights),
                               own.elapsed_s, own.detail)
            rows[node_id] = own
        elif seen is not None and seen.load_id == load_id:
            rows[node_id] = seen
        else:
            rows[node_id] = NodeLoad(node_id, load_id, "assigned", 0, int(weights))
    return rows


def loading_done(rows: Mapping[str, NodeLoad]) -> bool:
    return bool(rows) and all(r.finished for r in rows.values())
