"""mDNS / DNS-SD with python-zeroconf's asyncio API: register this node as
`<node_id>._dllama._tcp.local.` with its advert in the TXT record, browse for the others,
update the TXT when the advert changes, and say goodbye on stop.

Works with Debian bookworm's python3-zeroconf 0.47.3 and current PyPI releases: it uses
only AsyncZeroconf, AsyncServiceBrowser (handlers), AsyncServiceInfo.async_request and the
raw TXT bytes (`ServiceInfo.text`), which both have. In the root namespace of a test host
pass interfaces=["127.0.0.1"] (the default, all interfaces, sends on the real network).

What is found is handed to on_found(advert, complete); what says goodbye to
on_goodbye(node_id). mDNS never makes a peer live (see peers.py): a crashed node stays in
every cache for 1125 s or more.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Callable, List, Optional, Sequence, Set

from zeroconf import IPVersion, NonUniqueNameException, ServiceInfo, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from dllama_node.common.errors import ClusterError, ProtocolError
from dllama_node.common.tasks import cancel_and_wait

from .txt import NodeAdvert, decode_txt, encode_txt, txt_models_complete

log = logging.getLogger(__name__)

SERVICE_TYPE = "_dllama._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
# A changed TXT arrives with the cache-flush bit: the old record lingers in the cache for
# 1 s (RFC 6762 section 10.2) and zeroconf 0.47 may still answer with it, so an update is
# read again once the old one has expired.
REREAD_AFTER_UPDATE_S = 1.2

FoundCallback = Callable[[NodeAdvert, bool], None]
GoodbyeCallback = Callable[[str], None]


def service_name(node_id: str) -> str:
    return f"{node_id}.{SERVICE_TYPE}"


def host_name(node_id: str) -> str:
    """Our mDNS host name: node ids are valid DNS labels of at most 55 characters."""
    return f"dllama-{node_id}.local."


def local_ipv4_addresses() -> List[str]:
    """This host's IPv4 addresses but loopback; ["127.0.0.1"] when it has no other
    (ifaddr is a zeroconf dependency)."""
    import ifaddr

    found: List[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in found:
                found.append(ip.ip)
    routable = [a for a in found if not ipaddress.IPv4Address(a).is_loopback]
    return routable or ["127.0.0.1"]


def pick_address(addresses: Sequence[str], preferred: str = "") -> str:
    """The address to reach a peer at: `preferred` if it is among its addresses, else the
    first non-loopback, non-link-local IPv4 address, else the first one ("" if none)."""
    v4 = [a for a in addresses if _is_ipv4(a)]
    if preferred and preferred in v4:
        return preferred
    for a in v4:
        ip = ipaddress.IPv4Address(a)
        if not ip.is_loopback and not ip.is_link_local:
            return a
    return v4[0] if v4 else ""


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


class MdnsDiscovery:
    """Registers `advert` and browses for peers; see the module docstring.

    interfaces: None for every interface, or a list of IPv4 addresses to use.
    addresses: the addresses to publish for this node; default: advert.address if set,
    else the given interfaces' addresses, else every local IPv4 address.
    """

    def __init__(self, advert: NodeAdvert, on_found: FoundCallback, on_goodbye: GoodbyeCallback,
                 *, interfaces: Optional[Sequence[str]] = None,
                 addresses: Optional[Sequence[str]] = None) -> None:
        self.advert = advert
        self.on_found = on_found
        self.on_goodbye = on_goodbye
        self.interfaces = list(interfaces) if interfaces is not None else None
        if addresses is None:
            if advert.address and _is_ipv4(advert.address):
                addresses = [advert.address]
            elif self.interfaces:
                addresses = [a for a in self.interfaces if _is_ipv4(a)]
            else:
                addresses = local_ipv4_addresses()
        self.addresses = list(addresses)
        self._aiozc: Optional[AsyncZeroconf] = None
        self._browser: Optional[AsyncServiceBrowser] = None
        self._info: Optional[ServiceInfo] = None
        self.published: Optional[NodeAdvert] = None     # the advert our TXT holds now
        self._tasks: Set[asyncio.Task] = set()

    def _service_info(self, advert: NodeAdvert) -> ServiceInfo:
        return ServiceInfo(SERVICE_TYPE, service_name(advert.node_id), port=advert.port,
                           properties=encode_txt(advert), server=host_name(advert.node_id),
                           parsed_addresses=self.addresses)

    async def start(self) -> None:
        """Browse, then register (probing for a name clash takes about 1-2 s).
        Raises ClusterError when another node already uses this node id."""
        if self.interfaces is None:
            self._aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        else:
            self._aiozc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_state_change])
        registering = self.advert
        info = self._service_info(registering)
        try:
            await (await self._aiozc.async_register_service(info))
        except NonUniqueNameException:
            await self.stop()
            raise ClusterError(f"node id {self.advert.node_id} is already registered on this "
                               "network by another dllama-node: give each board its own "
                               "node id") from None
        self._info = info
        self.published = registering
        log.info("mDNS: registered %s at %s port %d", service_name(self.advert.node_id),
                 ", ".join(self.addresses), self.advert.port)

    async def update(self, advert: NodeAdvert) -> None:
        """Publish a changed advert (same node id); before start() it is only remembered."""
        if advert.node_id != self.advert.node_id:
            raise ValueError(f"mDNS update for node {advert.node_id}, registered as "
                             f"{self.advert.node_id}")
        self.advert = advert
        if self._aiozc is None or self._info is None:
            return
        info = self._service_info(advert)
        await (await self._aiozc.async_update_service(info))
        self._info = info
        self.published = advert
        log.debug("mDNS: TXT of %s updated (revision %d)", advert.node_id, advert.revision)

    async def stop(self) -> None:
        """Cancel the browser and resolvers, unregister (goodbye packets), close."""
        await cancel_and_wait(list(self._tasks))
        self._tasks.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._aiozc is not None:
            if self._info is not None:
                try:
                    await (await self._aiozc.async_unregister_service(self._info))
                except Exception as e:      # the goodbye is best effort; close regardless
                    log.warning("mDNS: unregistering %s failed: %s", self.advert.node_id, e)
                self._info = None
                self.published = None
            await self._aiozc.async_close()
            self._aiozc = None

    # --- browsing ---------------------------------------------------------------------------------

    def _on_state_change(self, zeroconf: object, service_type: str, name: str,
                         state_change: ServiceStateChange) -> None:
        """Called by zeroconf in the event loop; must not block."""
        if name.lower() == service_name(self.advert.node_id).lower():
            return
        if state_change is ServiceStateChange.Removed:
            suffix = "." + service_type
            node_id = name[:-len(suffix)] if name.endswith(suffix) else name
            log.debug("mDNS: %s said goodbye", name)
            self.on_goodbye(node_id)
            return
        self._spawn(self._resolve(name))
        if state_change is ServiceStateChange.Updated:
            self._spawn(self._resolve(name, delay_s=REREAD_AFTER_UPDATE_S))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str, delay_s: float = 0.0) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        if self._aiozc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: %s did not resolve within %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        text = info.text or b""
        try:
            advert = decode_txt(text)
        except ProtocolError as e:
            log.warning("mDNS: skipping %s: %s", name, e)
            return
        if service_name(advert.node_id).lower() != name.lower():
            log.warning("mDNS: skipping %s: its TXT names node %s", name, advert.node_id)
            return
        address = pick_address(info.parsed_addresses(IPVersion.V4Only), advert.address)
        if address != advert.address and address:
            advert = advert.replace(address=address)
        self.on_found(advert, bool(txt_models_complete(text)))
