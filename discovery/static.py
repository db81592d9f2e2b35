"""Static peers (`--static-peer HOST:PORT`), for networks where multicast is blocked.

A static peer is a heartbeat endpoint (HOST, the peer's heartbeat UDP PORT) that this node
asks for an advert with a HELLO datagram (see heartbeat.py) until a live peer answers from
it; the answer lands in the same PeerTable as mDNS and heartbeat adverts. Heartbeats also
carry the endpoints of the sender's live peers ("gossip"): an endpoint learnt that way is
probed like a static one, and forgotten after learned_ttl_s without an answer, so listing
one seed on every board is enough for all of them to find each other.

Names are resolved (IPv4) at most every resolve_every_s, so a peer whose DHCP address
changes is followed.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from dllama_node.common.errors import UsageError

log = logging.getLogger(__name__)

Endpoint = Tuple[str, int]      # (IPv4 address or host name, UDP port)

DEFAULT_LEARNED_TTL_S = 600.0
DEFAULT_RESOLVE_EVERY_S = 30.0


def parse_static_peer(text: str) -> Endpoint:
    """"HOST:PORT" -> (host, port). Raises UsageError naming what is wrong."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text:
        raise UsageError(f"static peer {text!r}: expected HOST:PORT (the peer's heartbeat port)")
    if host.startswith("[") or ":" in host:
        raise UsageError(f"static peer {text!r}: IPv6 addresses are not supported; use an IPv4 "
                         "address or a host name")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"static peer {text!r}: port {port_text!r} is not in [1, 65535]")
    if any(c.isspace() for c in host) or len(host) > 253:
        raise UsageError(f"static peer {text!r}: {host!r} is not a host name or IPv4 address")
    return host, int(port_text)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


class StaticPeers:
    """The endpoints to probe with HELLO: the static list plus endpoints learnt by gossip."""

    def __init__(self, endpoints: Sequence[Endpoint] = (),
                 learned_ttl_s: float = DEFAULT_LEARNED_TTL_S,
                 resolve_every_s: float = DEFAULT_RESOLVE_EVERY_S) -> None:
        self.static: List[Endpoint] = list(dict.fromkeys(endpoints))
        self.learned_ttl_s = float(learned_ttl_s)
        self.resolve_every_s = float(resolve_every_s)
        self._learned: Dict[Endpoint, float] = {}            # endpoint -> learnt or last heard
        self._resolved: Dict[str, Tuple[Optional[str], float]] = {}   # name -> (ip, when)
        self._own: Set[Endpoint] = set()                       # endpoints that reach this node

    def learn(self, endpoints: Iterable[Endpoint], now_s: float, known: Set[Endpoint]) -> None:
        """Remember gossiped endpoints that are neither static nor a known peer's."""
        static = set(self.static)
        for ep in endpoints:
            if (ep not in known and ep not in static and ep not in self._learned
                    and ep not in self._own):
                log.debug("learnt peer endpoint %s:%d from a heartbeat", *ep)
                self._learned[ep] = now_s

    def answered(self, endpoint: Endpoint, now_s: float) -> None:
        """A peer answered from `endpoint`: keep it (if learnt) for another learned_ttl_s."""
        if endpoint in self._learned:
            self._learned[endpoint] = now_s

    def is_own(self, endpoint: Endpoint) -> None:
        """`endpoint` reached this node itself (a list shared by every board names it too):
        never probe it again."""
        if endpoint not in self._own:
            log.debug("endpoint %s:%d is this node", *endpoint)
            self._own.add(endpoint)
            self._learned.pop(endpoint, None)

    async def targets(self, now_s: float, skip: Set[Endpoint],
                      loop: Optional[asyncio.AbstractEventLoop] = None) -> List[Endpoint]:
        """Resolved endpoints to send HELLO to this round (those in `skip` -- endpoints of
        live peers -- left out); forgets learnt endpoints silent for learned_ttl_s."""
        for ep, since in list(self._learned.items()):
            if now_s - since > self.learned_ttl_s:
                log.debug("forgetting learnt endpoint %s:%d (no answer for %.0f s)", ep[0], ep[1],
                          now_s - since)
                del self._learned[ep]
        out: List[Endpoint] = []
        for host, port in self.static + list(self._learned):
            ip = host if is_ip_literal(host) else await self._resolve(host, now_s, loop)
            ep = (ip, port)
            if ip is not None and ep not in skip and ep not in self._own and ep not in out:
                out.append(ep)
        return out

    async def _resolve(self, name: str, now_s: float,
                       loop: Optional[asyncio.AbstractEventLoop]) -> Optional[str]:
        cached = self._resolved.get(name)
        if cached is not None and now_s - cached[1] < self.resolve_every_s:
            return cached[0]
        loop = loop or asyncio.get_running_loop()
        ip: Optional[str] = None
        try:
            infos = await loop.getaddrinfo(name, None, family=socket.AF_INET,
                                           type=socket.SOCK_DGRAM)
            ip = infos[0][4][0] if infos else None
        except OSError as e:
            log.warning("static peer %s: cannot resolve the name (%s); retrying", name, e)
        self._resolved[name] = (ip, now_s)
        return ip
