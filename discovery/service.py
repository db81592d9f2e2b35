"""Discovery for one node: mDNS + static peers + heartbeats, feeding one PeerTable.

    async with Discovery(advert, DiscoveryConfig(static_peers=[("10.0.0.2", 7001)])) as d:
        d.table.on_join.append(...)
        d.update_advert(available_ram_bytes=...)     # heartbeat now, mDNS TXT soon after
        d.peers()                                    # live peers' adverts

Runs in the caller's asyncio loop. Every task it spawns is kept and cancelled by stop();
after stop() no zeroconf thread, socket or task of ours is left.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Set

from dllama_node.common.errors import UsageError
from dllama_node.common.tasks import cancel_and_wait

from .heartbeat import DEFAULT_INTERVAL_S, Heartbeat
from .peers import DEFAULT_FORGET_AFTER_S, DEFAULT_TIMEOUT_S, LIVE, PeerTable
from .static import Endpoint, StaticPeers
from .txt import NodeAdvert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiscoveryConfig:
    """How a node looks for peers.

    interfaces: None for every interface; ["127.0.0.1"] in a test's root namespace.
    bind_host: where the heartbeat socket listens. mdns: False where multicast is blocked
    (static_peers then do the finding). mdns_min_update_s: the TXT is republished at most
    this often (the heartbeat carries every change at once).
    """

    interval_s: float = DEFAULT_INTERVAL_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    forget_after_s: float = DEFAULT_FORGET_AFTER_S
    static_peers: Sequence[Endpoint] = ()
    mdns: bool = True
    interfaces: Optional[Sequence[str]] = None
    bind_host: str = "0.0.0.0"
    mdns_min_update_s: float = 2.0


class Discovery:
    """One node's view of its cluster; see the module docstring."""

    def __init__(self, advert: NodeAdvert, config: DiscoveryConfig = DiscoveryConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not config.timeout_s > config.interval_s:
            raise UsageError(f"discovery timeout_s = {config.timeout_s:g} must exceed interval_s = "
                             f"{config.interval_s:g}: peers would be dropped between heartbeats")
        if not advert.instance:
            advert = advert.replace(instance=secrets.token_hex(8))
        self._advert = advert
        self.config = config
        self.clock = clock
        self.table = PeerTable(advert.node_id, advert.cluster, timeout_s=config.timeout_s,
                               forget_after_s=config.forget_after_s)
        self.heartbeat = Heartbeat(self.table, advert, bind_host=config.bind_host,
                                   interval_s=config.interval_s,
                                   static=StaticPeers(config.static_peers), clock=clock)
        self.mdns = None
        if config.mdns:
            from .mdns import MdnsDiscovery     # zeroconf is imported only when used

            self.mdns = MdnsDiscovery(advert, self._found, self._goodbye,
                                      interfaces=config.interfaces)
        self._tasks: Set[asyncio.Task] = set()
        self._mdns_dirty = False
        self._mdns_updater: Optional[asyncio.Task] = None
        self._started = False

    @property
    def advert(self) -> NodeAdvert:
        return self._advert

    def peers(self) -> List[NodeAdvert]:
        """Live peers, sorted by node id."""
        return self.table.peers()

    async def start(self) -> None:
        """Heartbeat first (so mDNS finds have a socket to probe from), then mDNS."""
        await self.heartbeat.start()
        try:
            if self.mdns is not None:
                await self.mdns.start()
        except BaseException:
            await self.heartbeat.stop()
            raise
        self._started = True
        if self.mdns is not None and self.mdns.published != self._advert:
            self._request_mdns_publish()        # changed while registering

    async def stop(self) -> None:
        """Goodbyes on both channels, then every task cancelled and awaited."""
        log.debug("discovery of %s stopping", self._advert.node_id)
        await cancel_and_wait(list(self._tasks))
        self._tasks.clear()
        self._mdns_updater = None
        await self.heartbeat.stop()
        log.debug("heartbeat of %s stopped", self._advert.node_id)
        if self.mdns is not None:
            await self.mdns.stop()
        self._started = False
        log.info("discovery of %s stopped", self._advert.node_id)

    async def __aenter__(self) -> "Discovery":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def update_advert(self, **changes: Any) -> NodeAdvert:
        """Change this node's advert (revision raised): sent by heartbeat at once, by mDNS
        within mdns_min_update_s. Returns the new advert."""
        new = self._advert.replace(revision=self._advert.revision + 1, **changes)
        self._advert = new
        self.heartbeat.advert = new
        if self.heartbeat.running:
            self._spawn(self.heartbeat.beat_now())
        if self.mdns is not None:
            if self._started:
                self._request_mdns_publish()
            elif self.mdns.published is None:
                self.mdns.advert = new          # start() registers it, or republishes after
        return new

    # --- internals --------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("discovery task failed: %r", task.exception())

    def _request_mdns_publish(self) -> None:
        self._mdns_dirty = True
        if self._mdns_updater is None or self._mdns_updater.done():
            self._mdns_updater = self._spawn(self._publish_mdns())

    async def _publish_mdns(self) -> None:
        assert self.mdns is not None
        while self._mdns_dirty:
            self._mdns_dirty = False
            await self.mdns.update(self._advert)
            await asyncio.sleep(self.config.mdns_min_update_s)

    def _found(self, advert: NodeAdvert, complete: bool) -> None:
        self.table.found(advert, self.clock(), complete)
        entry = self.table.entry(advert.node_id)
        if entry is not None and entry.state != LIVE and entry.advert.address:
            self.heartbeat.probe((entry.advert.address, entry.advert.heartbeat_port))

    def _goodbye(self, node_id: str) -> None:
        self.table.goodbye(node_id, self.clock(), "said goodbye on mDNS")


__all__ = ["Discovery", "DiscoveryConfig"]
