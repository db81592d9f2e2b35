"""Heartbeats over UDP: how peers know who is alive, and how static peers are asked for
their advert.

mDNS keeps a SIGKILLed node listed for 1125 s or more, so liveness is ours: every
interval_s each node sends its complete advert to every peer it knows, and a peer not heard
for timeout_s is marked gone by the PeerTable (it is live again when heard).

One datagram, from and to each node's heartbeat port:

    magic    4 bytes   b"DLHB"
    version  1 byte    HEARTBEAT_VERSION
    kind     1 byte    b"H" HELLO (answer with a BEAT), b"B" BEAT, b"G" GOODBYE
    body     UTF-8 JSON {"advert": NodeAdvert.to_dict(), "peers": [[host, port], ...]}

HELLO goes to endpoints that are not (yet) live peers: static peers, learnt endpoints,
mDNS candidates and gone peers; BEAT to live peers; GOODBYE to live peers on stop. "peers"
lists the sender's live peers' heartbeat endpoints (gossip, see static.py). A datagram that
is not ours, of another version or of another cluster is dropped (logged once a minute per
sender), never answered.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from dllama_node.common.errors import ClusterError, ProtocolError
from dllama_node.common.tasks import cancel_and_wait

from .peers import LIVE, PeerTable
from .static import Endpoint, StaticPeers
from .txt import NodeAdvert

log = logging.getLogger(__name__)

MAGIC = b"DLHB"
HEARTBEAT_VERSION = 1
HELLO, BEAT, GOODBYE = b"H", b"B", b"G"
KINDS = (HELLO, BEAT, GOODBYE)
MAX_DATAGRAM_BYTES = 60_000
MAX_GOSSIP_PEERS = 64

DEFAULT_INTERVAL_S = 1.0
WARN_EVERY_S = 60.0


def encode_datagram(kind: bytes, advert: NodeAdvert, peers: Sequence[Endpoint] = ()) -> bytes:
    """One heartbeat datagram (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"heartbeat kind {kind!r}: expected one of {KINDS}")
    body = json.dumps({"advert": advert.to_dict(),
                       "peers": [[h, p] for h, p in peers[:MAX_GOSSIP_PEERS]]},
                      separators=(",", ":")).encode()
    data = MAGIC + bytes((HEARTBEAT_VERSION,)) + kind + body
    if len(data) > MAX_DATAGRAM_BYTES:
        raise ValueError(f"heartbeat of node {advert.node_id}: {len(data)} bytes, at most "
                         f"{MAX_DATAGRAM_BYTES} (too many models listed?)")
    return data


def decode_datagram(data: bytes) -> Tuple[bytes, NodeAdvert, List[Endpoint]]:
    """-> (kind, advert, gossiped endpoints). Raises ProtocolError naming the problem."""
    if len(data) < 6 or data[:4] != MAGIC:
        raise ProtocolError(f"heartbeat: {len(data)} bytes starting {data[:6]!r}, expected "
                            f"magic {MAGIC!r}")
    if data[4] != HEARTBEAT_VERSION:
        raise ProtocolError(f"heartbeat version {data[4]}, this node speaks "
                            f"{HEARTBEAT_VERSION}: upgrade the older node")
    kind = data[5:6]
    if kind not in KINDS:
        raise ProtocolError(f"heartbeat kind {kind!r}: expected one of {KINDS}")
    try:
        body = json.loads(data[6:].decode("utf-8"))
    except RecursionError:
        raise ProtocolError("heartbeat body is not UTF-8 JSON: nested too deep") from None
    except ValueError as e:          # UnicodeDecodeError, JSONDecodeError, too many digits
        raise ProtocolError(f"heartbeat body is not UTF-8 JSON: {str(e)[:120]}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"heartbeat body: expected a JSON object, found "
                            f"{type(body).__name__}")
    advert = NodeAdvert.from_dict(body.get("advert"))
    peers: List[Endpoint] = []
    raw_peers = body.get("peers", [])
    if not isinstance(raw_peers, list):
        raise ProtocolError("heartbeat field 'peers': expected a list of [host, port]")
    for item in raw_peers[:MAX_GOSSIP_PEERS]:
        if (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool)
                and 1 <= item[1] <= 65535 and 0 < len(item[0]) <= 253):
            peers.append((item[0], item[1]))
        else:
            raise ProtocolError(f"heartbeat field 'peers': {item!r:.60} is not [host, port]")
    return kind, advert, peers


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "localhost"


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: "Heartbeat") -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Tuple) -> None:
        try:
            self.owner._received(data, (addr[0], addr[1]))
        except Exception:       # a bug here must not silence the socket
            log.exception("heartbeat: handling a datagram from %s:%d failed", addr[0], addr[1])

    def error_received(self, exc: Exception) -> None:
        log.debug("heartbeat socket: %s", exc)


class Heartbeat:
    """Sends and receives heartbeats for one node, feeding `table`.

    advert: this node's current advert (assign a new one to change what is sent);
    its heartbeat_port is the UDP port bound on bind_host. static: endpoints to probe.
    clock: seconds, monotonic (the table's time base).
    """

    def __init__(self, table: PeerTable, advert: NodeAdvert, *, bind_host: str = "0.0.0.0",
                 interval_s: float = DEFAULT_INTERVAL_S, static: Optional[StaticPeers] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s = {interval_s}: expected > 0")
        self.table = table
        self.advert = advert
        self.bind_host = bind_host
        self.interval_s = float(interval_s)
        self.static = static or StaticPeers()
        self.clock = clock
        self._transport: Optional[asyncio.DatagramTransport] = None
        self._task: Optional[asyncio.Task] = None
        self._warned: Dict[str, float] = {}
        self.sent = 0
        self.received = 0

    @property
    def running(self) -> bool:
        return self._task is not None

    @property
    def tick_s(self) -> float:
        """How often expiry is checked: a quarter of the shorter of interval and timeout."""
        return min(self.interval_s, self.table.timeout_s) / 4

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(self.bind_host, self.advert.heartbeat_port))
        except OSError as e:
            raise ClusterError(f"heartbeat: cannot bind UDP {self.bind_host}:"
                               f"{self.advert.heartbeat_port}: {e.strerror or e}; is another "
                               "dllama-node running, or is the port taken?") from None
        self._transport = transport
        self._task = asyncio.create_task(self._run(), name=f"heartbeat {self.advert.node_id}")
        log.info("heartbeat on %s:%d every %g s, timeout %g s", self.bind_host,
                 self.advert.heartbeat_port, self.interval_s, self.table.timeout_s)

    async def stop(self) -> None:
        """Say GOODBYE to live peers, stop the loop, close the socket."""
        await cancel_and_wait([self._task])
        self._task = None
        if self._transport is not None:
            for ep in self._live_endpoints():
                self._send(GOODBYE, ep)
            self._transport.close()
            self._transport = None

    def probe(self, endpoint: Endpoint) -> None:
        """Send a HELLO now (e.g. to a peer just found by mDNS)."""
        if self._transport is not None:
            self._send(HELLO, endpoint)

    async def beat_now(self) -> None:
        """Send this round's heartbeats now (e.g. after the advert changed)."""
        await self._round()

    # --- the loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        next_round = self.clock()
        while True:
            now = self.clock()
            try:
                if now >= next_round:
                    next_round = now + self.interval_s
                    await self._round()
                self.table.expire(self.clock())
            except Exception:   # keep beating: peers would drop this node otherwise
                log.exception("heartbeat round failed")
            await asyncio.sleep(min(self.tick_s, max(0.0, next_round - self.clock())))

    def _live_endpoints(self) -> List[Endpoint]:
        return [(a.address, a.heartbeat_port) for a in self.table.peers() if a.address]

    async def _round(self) -> None:
        now = self.clock()
        live = self._live_endpoints()
        for ep in live:
            self._send(BEAT, ep)
        probes = [(a.address, a.heartbeat_port) for a in self.table.candidates() + self.table.gone()
                  if a.address]
        probes += await self.static.targets(now, set(live) | set(probes))
        for ep in dict.fromkeys(probes):
            self._send(HELLO, ep)

    # --- datagrams --------------------------------------------------------------------------------

    def _send(self, kind: bytes, endpoint: Endpoint) -> None:
        if self._transport is None:
            return
        gossip = [ep for ep in self._live_endpoints() if ep != endpoint
                  and (_is_loopback(endpoint[0]) or not _is_loopback(ep[0]))]
        try:
            self._transport.sendto(encode_datagram(kind, self.advert, gossip), endpoint)
            self.sent += 1
        except (OSError, ValueError) as e:
            self._warn(endpoint[0], f"heartbeat to {endpoint[0]}:{endpoint[1]} failed: {e}")

    def _received(self, data: bytes, source: Endpoint) -> None:
        now = self.clock()
        try:
            kind, advert, gossip = decode_datagram(data)
        except ProtocolError as e:
            self._warn(source[0], f"dropping a datagram from {source[0]}:{source[1]}: {e}")
            return
        if advert.node_id == self.table.self_id:
            if advert.instance == self.advert.instance:
                self.static.is_own(source)
            else:
                self._warn(source[0], f"node {advert.node_id} at {source[0]}:{source[1]} has this "
                                      "node's id: give every board its own node id")
            return
        if advert.cluster != self.table.cluster:
            self._warn(source[0], f"ignoring node {advert.node_id} at {source[0]}: cluster "
                                  f"{advert.cluster!r}, this node is in {self.table.cluster!r}")
            return
        self.received += 1
        if not advert.address:
            advert = advert.replace(address=source[0])
        self.static.answered(source, now)
        if kind == GOODBYE:
            self.table.goodbye(advert.node_id, now, "stopped (heartbeat goodbye)")
            return
        self.table.heard(advert, now)
        known: Set[Endpoint] = {(e.advert.address, e.advert.heartbeat_port)
                                for e in self.table.entries() if e.state == LIVE}
        self.static.learn(gossip, now, known | {source, (advert.address, advert.heartbeat_port)})
        if kind == HELLO:
            self._send(BEAT, source)

    def _warn(self, key: str, message: str) -> None:
        now = self.clock()
        if now - self._warned.get(key, -WARN_EVERY_S - 1) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning("%s", message)
        else:
            log.debug("%s", message)
