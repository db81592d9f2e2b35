"""The peer table: every advert this node has learnt, from mDNS, static peers and heartbeats,
merged into one view -- pure logic, time passed in, so it is tested with a fake clock.

A peer is in one of three states:

    candidate   known from mDNS (or a TXT record) but not yet heard on the heartbeat channel
    live        heard on the heartbeat channel within the last timeout_s
    gone        stopped (goodbye) or not heard for timeout_s; it is live again when heard

Liveness comes only from the heartbeat: mDNS keeps a crashed node listed for 1125 s or
more, so an mDNS record alone never makes a peer live. Adverts of the same node replace each
other when newer (a new instance, or a higher revision); an equal revision replaces a TXT
summary with a complete advert. Adverts of another cluster and this node's own are ignored.

Callbacks (called in the order of events; an exception in one is logged, not raised):
    on_join(advert)            a peer became live
    on_leave(advert, reason)   a live peer stopped, timed out or restarted as a new instance
    on_change(old, new)        a live peer's advert changed
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .txt import NodeAdvert

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
LIVE = "live"
GONE = "gone"

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_FORGET_AFTER_S = 600.0

JoinCallback = Callable[[NodeAdvert], None]
LeaveCallback = Callable[[NodeAdvert, str], None]
ChangeCallback = Callable[[NodeAdvert, NodeAdvert], None]


@dataclass
class PeerEntry:
    """What the table knows of one node. Times are the caller's clock, in seconds."""

    advert: NodeAdvert
    state: str
    found_s: float                      # first learnt of (this instance)
    heard_s: Optional[float] = None     # last heartbeat; None before the first
    gone_s: Optional[float] = None      # when it became gone
    reason: str = ""                    # why it is gone
    complete: bool = False              # advert from JSON (full) rather than a TXT summary


class PeerTable:
    """Peers of node `self_id` in `cluster`; see the module docstring."""

    def __init__(self, self_id: str, cluster: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 forget_after_s: float = DEFAULT_FORGET_AFTER_S,
                 on_join: Optional[JoinCallback] = None, on_leave: Optional[LeaveCallback] = None,
                 on_change: Optional[ChangeCallback] = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s = {timeout_s}: expected > 0")
        self.self_id = self_id
        self.cluster = cluster
        self.timeout_s = float(timeout_s)
        self.forget_after_s = float(forget_after_s)
        self._entries: Dict[str, PeerEntry] = {}
        self.on_join: List[JoinCallback] = [on_join] if on_join else []
        self.on_leave: List[LeaveCallback] = [on_leave] if on_leave else []
        self.on_change: List[ChangeCallback] = [on_change] if on_change else []

    # --- queries ----------------------------------------------------------------------------------

    def peers(self) -> List[NodeAdvert]:
        """Live peers' adverts, sorted by node_id (this node excluded)."""
        return [e.advert for e in self._sorted() if e.state == LIVE]

    def candidates(self) -> List[NodeAdvert]:
        """Peers known from mDNS that have not answered a heartbeat yet."""
        return [e.advert for e in self._sorted() if e.state == CANDIDATE]

    def gone(self) -> List[NodeAdvert]:
        """Peers that stopped or timed out (kept for forget_after_s)."""
        return [e.advert for e in self._sorted() if e.state == GONE]

    def entry(self, node_id: str) -> Optional[PeerEntry]:
        return self._entries.get(node_id)

    def entries(self) -> List[PeerEntry]:
        return self._sorted()

    def _sorted(self) -> List[PeerEntry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def _accepts(self, advert: NodeAdvert) -> bool:
        if advert.node_id == self.self_id:
            return False
        if advert.cluster != self.cluster:
            log.debug("ignoring node %s of cluster %r (this is %r)", advert.node_id,
                      advert.cluster, self.cluster)
            return False
        return True

    # --- events -----------------------------------------------------------------------------------

    def found(self, advert: NodeAdvert, now_s: float, complete: bool = False) -> None:
        """A discovery hint (mDNS, TXT): remember the advert; it does not make a peer live."""
        if not self._accepts(advert):
            return
        e = self._entries.get(advert.node_id)
        if e is None:
            self._entries[advert.node_id] = PeerEntry(advert, CANDIDATE, now_s, complete=complete)
            log.debug("peer %s found at %s:%d, waiting for its heartbeat", advert.node_id,
                      advert.address, advert.heartbeat_port)
            return
        old = e.advert
        if e.state == LIVE and advert.instance != old.instance:
            return      # a new instance while the old one is live: its heartbeat decides
        if not self._replaces(e, advert, complete):
            return
        e.advert, e.complete = advert, complete
        if e.state == LIVE:
            self._emit_change(old, advert)

    def heard(self, advert: NodeAdvert, now_s: float) -> None:
        """A heartbeat (complete advert) arrived from the peer: it is live."""
        if not self._accepts(advert):
            return
        e = self._entries.get(advert.node_id)
        if e is None or e.state != LIVE:
            back = e is not None and e.state == GONE
            self._entries[advert.node_id] = PeerEntry(advert, LIVE, e.found_s if e else now_s,
                                                      heard_s=now_s, complete=True)
            log.info("peer %s %s (%s:%d)", advert.node_id, "is back" if back else "joined",
                     advert.address, advert.port)
            self._emit_join(advert)
            return
        e.heard_s = now_s
        old = e.advert
        if advert.instance != old.instance:
            reason = "restarted (new instance)"
            log.info("peer %s %s", advert.node_id, reason)
            self._entries[advert.node_id] = PeerEntry(advert, LIVE, now_s, heard_s=now_s,
                                                      complete=True)
            self._emit_leave(old, reason)
            self._emit_join(advert)
            return
        if self._replaces(e, advert, True):
            e.advert, e.complete = advert, True
            self._emit_change(old, advert)

    def goodbye(self, node_id: str, now_s: float, reason: str = "said goodbye") -> None:
        """The peer announced it is stopping (mDNS goodbye or a heartbeat BYE)."""
        e = self._entries.get(node_id)
        if e is None:
            return
        if e.state == LIVE:
            self._mark_gone(e, now_s, reason)
        elif e.state == CANDIDATE:
            del self._entries[node_id]

    def expire(self, now_s: float) -> List[NodeAdvert]:
        """Mark live peers not heard for more than timeout_s gone (returns them); forget gone
        peers and candidates older than forget_after_s."""
        left = []
        for e in self._sorted():
            if e.state == LIVE and e.heard_s is not None and now_s - e.heard_s > self.timeout_s:
                self._mark_gone(e, now_s, f"no heartbeat for {now_s - e.heard_s:.1f} s "
                                          f"(timeout {self.timeout_s:g} s)")
                left.append(e.advert)
            elif (e.state == GONE and e.gone_s is not None
                  and now_s - e.gone_s > self.forget_after_s):
                del self._entries[e.advert.node_id]
            elif e.state == CANDIDATE and now_s - e.found_s > self.forget_after_s:
                del self._entries[e.advert.node_id]
        return left

    # --- internals --------------------------------------------------------------------------------

    @staticmethod
    def _replaces(e: PeerEntry, advert: NodeAdvert, complete: bool) -> bool:
        old = e.advert
        if advert.instance != old.instance or advert.revision > old.revision:
            return True
        return advert.revision == old.revision and complete and not e.complete

    def _mark_gone(self, e: PeerEntry, now_s: float, reason: str) -> None:
        e.state, e.gone_s, e.reason = GONE, now_s, reason
        log.warning("peer %s left: %s", e.advert.node_id, reason)
        self._emit_leave(e.advert, reason)

    def _emit_join(self, advert: NodeAdvert) -> None:
        for cb in list(self.on_join):
            _call(cb, advert)

    def _emit_leave(self, advert: NodeAdvert, reason: str) -> None:
        for cb in list(self.on_leave):
            _call(cb, advert, reason)

    def _emit_change(self, old: NodeAdvert, new: NodeAdvert) -> None:
        for cb in list(self.on_change):
            _call(cb, old, new)


def _call(cb: Callable, *args: object) -> None:
    try:
        cb(*args)
    except Exception:
        log.exception("peer table callback %r failed", cb)
