"""Who joined, who vanished, who came back: the root's memory of its peers between ticks.

A pure bookkeeping step per tick (update), so the journal says once per event:
- a node that vanished: which node, in which phase (its advertised state), its last
  reported memory and, when it had a slice, what that slice needed;
- a node that came back (a new instance) after a bad exit: its own report of how its
  previous run ended (NodeAdvert.last_exit, filled at start from daemon/oom_diagnosis.py's
  diagnosis of the previous run), e.g. that it was OOM-killed and how much it needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

from dllama_node.common.units import format_bytes
from dllama_node.discovery.txt import NodeAdvert


@dataclass(frozen=True)
class Vanished:
    advert: NodeAdvert            # its last advert
    planned_bytes: Optional[int]  # what its slice needed, when it had one

    def message(self) -> str:
        a = self.advert
        phase = a.state or "unknown phase"
        text = (f"node {a.node_id} ({a.address or '?'}) vanished while {phase}: it last reported "
                f"{format_bytes(a.available_ram_bytes)} available, "
                f"{format_bytes(a.free_swap_bytes)} swap free")
        if self.planned_bytes is not None:
            text += f"; its slice needed {format_bytes(self.planned_bytes)}"
        return text + ("; when it restarts, its own report will say how it ended "
                       "(dllama-ctl doctor on that board)")


@dataclass(frozen=True)
class Returned:
    advert: NodeAdvert

    @property
    def oom_killed(self) -> bool:
        return self.advert.last_exit.startswith("oom_killed")

    def message(self) -> str:
        kind, _, text = self.advert.last_exit.partition(": ")
        return f"node {self.advert.node_id} is back; its previous run: {text or kind}"


@dataclass
class Changes:
    joined: List[NodeAdvert] = field(default_factory=list)
    vanished: List[Vanished] = field(default_factory=list)
    returned: List[Returned] = field(default_factory=list)


class Membership:
    """The peers seen at the last tick, by node id."""

    def __init__(self) -> None:
        self.known: Dict[str, NodeAdvert] = {}
        self.reported_instances: set = set()       # instances whose last_exit was logged

    def update(self, peers: Iterable[NodeAdvert],
               planned: Optional[Dict[str, int]] = None) -> Changes:
        """Compare with the last tick. planned: node_id -> bytes of its slice in the plan."""
        planned = planned or {}
        now = {a.node_id: a for a in peers}
        out = Changes()
        for node_id, old in self.known.items():
            if node_id not in now:
                out.vanished.append(Vanished(old, planned.get(node_id)))
        for node_id, a in now.items():
            old = self.known.get(node_id)
            if old is None or old.instance != a.instance:
                out.joined.append(a)
            if a.last_exit and a.instance not in self.reported_instances:
                self.reported_instances.add(a.instance)
                out.returned.append(Returned(a))
        self.known = now
        return out


def last_exit_text(kind: str, message: str, limit: int) -> str:
    """'oom_killed: node b2 was OOM-killed ...' cut to `limit` UTF-8 bytes (the TXT record's
    string limit), on a character boundary."""
    text = f"{kind}: {message}"
    raw = text.encode("utf-8")[:limit]
    return raw.decode("utf-8", "ignore")
