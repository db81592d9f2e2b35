"""Discovery over real sockets: loopback in this namespace (interfaces=["127.0.0.1"], no
root needed), and three network namespaces on a bridge with real multicast (root).

Timings asserted are the brief's: everyone sees everyone within a few seconds, a cleanly
stopped node is dropped at once (goodbye), a SIGKILLed one within timeout_s + 1 s."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from dllama_node.common.errors import ClusterError, UsageError
from dllama_node.discovery import Discovery, DiscoveryConfig, NodeAdvert
from dllama_node.discovery.heartbeat import BEAT, HELLO, decode_datagram, encode_datagram
from dllama_node.discovery.mdns import MdnsDiscovery
from tests.netns import NetnsBridge, require_netns

REPO = Path(__file__).resolve().parent.parent
NODE_SCRIPT = REPO / "tests" / "discovery_node.py"
OLD_ZEROCONF = Path(os.environ.get("DLLAMA_OLD_ZEROCONF", REPO / ".cache" / "python3-zeroconf"
                                   / "usr" / "lib" / "python3" / "dist-packages"))
TAG = f"{os.getpid() % 100000}"       # node ids unique to this run: loopback mDNS is shared


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(pred: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll pred every 20 ms; return the seconds it took, or fail naming `what`."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def ids(d: Discovery) -> List[str]:
    return [a.node_id for a in d.peers()]


# --- loopback, in one process ---------------------------------------------------------------------

def test_loopback_mdns_three_nodes_join_change_leave_without_leaks():
    threads_before = set(threading.enumerate())

    async def main():
        cfg = DiscoveryConfig(interfaces=["127.0.0.1"], bind_host="127.0.0.1")
        names = [f"lo{TAG}-{i}" for i in range(3)]
        nodes = [Discovery(NodeAdvert(n, f"c{TAG}", 7000 + i, free_udp_port(),
                                      address="127.0.0.1", available_ram_bytes=(i + 1) << 30,
                                      models=(f"model-{i}",)), cfg)
                 for i, n in enumerate(names)]
        t0 = time.monotonic()
        starting = asyncio.gather(*(d.start() for d in nodes))
        await asyncio.sleep(0.3)                            # mDNS is probing its name now
        nodes[1].update_advert(speed=3.5)
        await starting
        await until(lambda: nodes[1].mdns.published == nodes[1].advert, 1.0,
                    "a change made while registering is published")
        await until(lambda: all(len(d.peers()) == 2 for d in nodes), 5.0, "all see all")
        for i, d in enumerate(nodes):
            assert ids(d) == [n for n in names if n != names[i]]
            for a in d.peers():
                j = names.index(a.node_id)
                assert (a.available_ram_bytes, a.models, a.port) == ((j + 1) << 30,
                                                                   (f"model-{j}",), 7000 + j)
                assert a.speed == (3.5 if j == 1 else 1.0)
        took = time.monotonic() - t0
        nodes[0].update_advert(term=4, root_id=names[0])
        await until(lambda: all(d.table.entry(names[0]).advert.term == 4 for d in nodes[1:]),
                    2.0, "term change travels")
        t_stop = time.monotonic()
        await nodes[2].stop()
        await until(lambda: all(names[2] not in ids(d) for d in nodes[:2]), 1.0,
                    "clean stop seen")
        gone_after = time.monotonic() - t_stop
        await asyncio.gather(*(d.stop() for d in nodes[:2]))
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == [], f"tasks left after stop: {others}"
        return took, gone_after

    took, gone_after = asyncio.run(main())
    leaked = [t for t in threading.enumerate() if t not in threads_before]
    assert leaked == [], f"threads left after stop: {leaked}"
    print(f"loopback mDNS: started and all joined after {took:.2f} s; a stopped node is gone "
          f"{gone_after:.3f} s after its stop() began")


def test_loopback_mdns_txt_update_and_goodbye():
    """MdnsDiscovery alone (no heartbeat): the TXT is browsed, updated and withdrawn."""
    async def main():
        seen: List[NodeAdvert] = []
        goodbyes: List[str] = []
        a = NodeAdvert(f"txt{TAG}-a", f"c{TAG}", 7000, 7001, instance="aa", models=("m1",))
        b = NodeAdvert(f"txt{TAG}-b", f"c{TAG}", 7100, 7101, instance="bb")
        ma = MdnsDiscovery(a, lambda adv, complete: None, lambda n: None,
                           interfaces=["127.0.0.1"])
        mb = MdnsDiscovery(b, lambda adv, complete: seen.append(adv), goodbyes.append,
                           interfaces=["127.0.0.1"])
        await asyncio.gather(ma.start(), mb.start())
        await until(lambda: any(s.node_id == a.node_id for s in seen), 5.0, "b finds a")
        first = [s for s in seen if s.node_id == a.node_id][-1]
        assert first == a.replace(address="127.0.0.1")
        await ma.update(a.replace(revision=1, term=9, root_id=b.node_id, models=("m1", "m2")))
        await until(lambda: any(s.revision == 1 for s in seen if s.node_id == a.node_id), 3.0,
                    "TXT update browsed")
        latest = [s for s in seen if s.node_id == a.node_id][-1]
        assert (latest.term, latest.root_id, latest.models) == (9, b.node_id, ("m1", "m2"))
        t_stop = time.monotonic()
        await ma.stop()
        await until(lambda: a.node_id in goodbyes, 2.0, "mDNS goodbye")
        took = time.monotonic() - t_stop
        await mb.stop()
        return took

    took = asyncio.run(main())
    print(f"mDNS goodbye seen after {took:.3f} s")


def test_loopback_static_peers_gossip_crash_and_return():
    """No mDNS: node 0 lists nobody, nodes 1 and 2 list only node 0 (gossip does the
    rest); a node that stops beating without a goodbye is gone within timeout + a tick, and
    is back when it beats again as a new instance."""
    interval_s, timeout_s = 0.2, 0.6

    async def main():
        cfg0 = DiscoveryConfig(interval_s=interval_s, timeout_s=timeout_s, mdns=False,
                               bind_host="127.0.0.1")
        ports = [free_udp_port() for _ in range(3)]
        cfg = DiscoveryConfig(interval_s=interval_s, timeout_s=timeout_s, mdns=False,
                              bind_host="127.0.0.1", static_peers=[("127.0.0.1", ports[0])])
        def make(i):
            return Discovery(NodeAdvert(f"st{i}", "c", 7000, ports[i]), cfg0 if i == 0 else cfg)
        nodes = [make(i) for i in range(3)]
        leaves: Dict[str, List[str]] = {}
        nodes[0].table.on_leave.append(lambda a, r: leaves.setdefault(a.node_id, []).append(r))
        for d in nodes:
            await d.start()
        await until(lambda: all(len(d.peers()) == 2 for d in nodes), 3.0, "gossip converges")
        assert nodes[1].table.entry("st2").advert.address == "127.0.0.1"
        # crash node 2: no goodbye, its socket simply goes silent
        hb = nodes[2].heartbeat
        hb._task.cancel()
        hb._transport.abort()
        hb._transport = None
        t_crash = time.monotonic()
        await until(lambda: "st2" not in ids(nodes[0]) and "st2" not in ids(nodes[1]),
                    timeout_s + 1.0, "crashed node marked gone")
        detected = time.monotonic() - t_crash
        assert detected > timeout_s - interval_s
        assert leaves["st2"][0].startswith("no heartbeat for")
        await nodes[2].stop()
        nodes[2] = make(2)                                  # restarted: a new instance
        await nodes[2].start()
        await until(lambda: all(len(d.peers()) == 2 for d in nodes), 2.0, "restarted node back")
        await asyncio.gather(*(d.stop() for d in nodes))
        return detected

    detected = asyncio.run(main())
    print(f"silent node marked gone after {detected:.2f} s (timeout {timeout_s} s)")


# --- processes ------------------------------------------------------------------------------------

class NodeProc:
    """A tests/discovery_node.py process and the JSON events it printed."""

    def __init__(self, popen: subprocess.Popen, name: str) -> None:
        self.p = popen
        self.name = name
        self.events: List[dict] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cv:
                self.events.append(event)
                self._cv.notify_all()

    def wait_for(self, pred: Callable[[dict], bool], timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{self.name}: {what} not within {timeout_s} s; "
                                         f"events: {self.events}; stderr: {self.stderr()}")
                self._cv.wait(min(left, 0.1))

    def live_peers(self) -> set:
        live = set()
        with self._cv:
            for e in self.events:
                if e["event"] == "join":
                    live.add(e["advert"]["node_id"])
                elif e["event"] == "leave":
                    live.discard(e["node_id"])
        return live

    def wait_peers(self, expected: set, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.live_peers() != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: peers {sorted(self.live_peers())}, expected "
                                     f"{sorted(expected)} within {timeout_s} s; "
                                     f"events: {self.events}")
            time.sleep(0.02)

    def stderr(self) -> str:
        if self.p.poll() is None or self.p.stderr is None:
            return "(running)"
        return self.p.stderr.read()[-2000:]


def node_argv(name: str, *extra: str) -> List[str]:
    return [sys.executable, str(NODE_SCRIPT), "--node-id", name, *extra]


def spawn(start: Callable[..., subprocess.Popen], name: str, argv: List[str],
          env: Optional[dict] = None) -> NodeProc:
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    return NodeProc(start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=str(REPO), env=env), name)


def stop_all(procs: List[NodeProc]) -> None:
    for n in procs:
        if n.p.poll() is None:
            n.p.terminate()
    for n in procs:
        try:
            n.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            n.p.kill()
            n.p.wait()


def test_loopback_sigkilled_process_marked_gone_by_heartbeat():
    ports = [free_udp_port() for _ in range(2)]
    procs = [spawn(subprocess.Popen, f"kill{TAG}-{i}",
                   node_argv(f"kill{TAG}-{i}", "--hb-port", str(ports[i]), "--no-mdns",
                             "--bind", "127.0.0.1", "--address", "127.0.0.1",
                             "--static-peer", f"127.0.0.1:{ports[1 - i]}"))
             for i in range(2)]
    try:
        procs[0].wait_peers({f"kill{TAG}-1"}, 5.0)
        t_kill = time.monotonic()
        procs[1].p.send_signal(signal.SIGKILL)
        leave = procs[0].wait_for(lambda e: e["event"] == "leave", 3.0 + 1.0, "leave")
        assert leave["reason"].startswith("no heartbeat for")
        assert 2.0 < leave["t"] - t_kill <= 4.0
    finally:
        stop_all(procs)


def test_zeroconf_047_and_current_interoperate():
    """Debian bookworm's python3-zeroconf 0.47.3 (what the .deb runs on) on one node, the
    venv's zeroconf on the other: each finds the other over loopback mDNS."""
    if not (OLD_ZEROCONF / "zeroconf" / "__init__.py").exists():
        pytest.skip(f"no zeroconf 0.47 at {OLD_ZEROCONF}: `apt-get download python3-zeroconf && "
                    "dpkg-deb -x python3-zeroconf_0.47.3-1_all.deb .cache/python3-zeroconf` "
                    "(or set DLLAMA_OLD_ZEROCONF to its dist-packages folder)")
    old_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(OLD_ZEROCONF)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    version = subprocess.run([sys.executable, "-c", "import zeroconf; print(zeroconf.__version__)"],
                             env=old_env, capture_output=True, text=True, check=True).stdout
    assert version.strip() == "0.47.3"
    names = [f"old{TAG}", f"new{TAG}"]
    common = ["--cluster", f"z{TAG}", "--interface", "127.0.0.1", "--bind", "127.0.0.1",
              "--address", "127.0.0.1"]
    procs = [spawn(subprocess.Popen, names[0], node_argv(names[0], "--hb-port",
                                                          str(free_udp_port()), *common), old_env),
             spawn(subprocess.Popen, names[1], node_argv(names[1], "--hb-port",
                                                          str(free_udp_port()), *common))]
    try:
        for i, n in enumerate(procs):
            other = names[1 - i]
            n.wait_for(lambda e: e["event"] == "mdns_found" and e["node_id"] == other, 8.0,
                       f"{other} found by mDNS")
            n.wait_peers({other}, 3.0)
        procs[0].p.send_signal(signal.SIGUSR1)             # the old one changes its TXT
        procs[1].wait_for(lambda e: e["event"] == "mdns_found" and e["advert"]["term"] == 1,
                          5.0, "updated TXT of the 0.47 node")
        procs[0].p.terminate()
        stopped = procs[0].wait_for(lambda e: e["event"] == "stopped", 5.0, "stopped")
        assert (stopped["threads"], stopped["tasks"]) == (1, 0)
        procs[1].wait_for(lambda e: e["event"] == "leave", 2.0, "leave of the 0.47 node")
    finally:
        stop_all(procs)


# --- three network namespaces ---------------------------------------------------------------------

def start_namespace_nodes(net: NetnsBridge, extra: Callable[[int], List[str]]) -> List[NodeProc]:
    return [spawn(lambda argv, **kw: net.popen(i, argv, **kw), f"n{i}",
                  node_argv(f"n{i}", "--port", "7000", "--hb-port", "7001",
                            "--ram", str((i + 1) << 30), "--model", f"model-{i}", *extra(i)))
            for i in range(net.n)]


def test_netns_mdns_three_nodes_then_clean_stop_and_sigkill():
    require_netns()
    with NetnsBridge(n=3, subnet="10.213.7") as net:
        t0 = time.monotonic()
        procs = start_namespace_nodes(net, lambda i: [])
        try:
            names = [f"n{i}" for i in range(3)]
            for i, n in enumerate(procs):
                n.wait_peers(set(names) - {names[i]}, 8.0)
            converged = time.monotonic() - t0
            published = net.run(0, [sys.executable, "-c", "from dllama_node.discovery.mdns "
                                    "import local_ipv4_addresses as f; print(f())"], check=True)
            assert published.stdout.strip() == f"['{net.ip(0)}']"     # not 127.0.0.1
            for n in procs:                                 # mDNS registration done
                n.wait_for(lambda e: e["event"] == "ready", 5.0, "ready")
            for i, n in enumerate(procs):
                for j in set(range(3)) - {i}:
                    found = n.wait_for(lambda e: e["event"] == "mdns_found"
                                       and e["node_id"] == names[j], 3.0, "found by mDNS")
                    joined = n.wait_for(lambda e: e["event"] == "join"
                                        and e["advert"]["node_id"] == names[j], 0.1, "join")
                    for a in (found["advert"], joined["advert"]):
                        assert a["address"] == net.ip(j)
                        assert a["available_ram_bytes"] == (j + 1) << 30
                        assert a["models"] == [f"model-{j}"]
                        assert (a["port"], a["heartbeat_port"]) == (7000, 7001)
                        assert a["cluster"] == "test"
            procs[0].p.send_signal(signal.SIGUSR1)
            for n in procs[1:]:
                n.wait_for(lambda e: e["event"] == "change" and e["advert"]["term"] == 1, 2.0,
                           "term change")
            t_stop = time.monotonic()
            procs[2].p.terminate()
            for n in procs[:2]:
                leave = n.wait_for(lambda e: e["event"] == "leave" and e["node_id"] == "n2", 1.0,
                                   "clean leave")
                assert "goodbye" in leave["reason"] and leave["t"] - t_stop < 1.0
                clean_s = leave["t"] - t_stop
            stopped = procs[2].wait_for(lambda e: e["event"] == "stopped", 5.0, "stopped")
            assert (stopped["threads"], stopped["tasks"]) == (1, 0)
            t_kill = time.monotonic()
            procs[1].p.send_signal(signal.SIGKILL)
            leave = procs[0].wait_for(lambda e: e["event"] == "leave" and e["node_id"] == "n1",
                                      3.0 + 1.0, "SIGKILLed node gone")
            assert leave["reason"].startswith("no heartbeat for")
            print(f"netns mDNS: converged {converged:.2f} s after spawn; clean stop seen after "
                  f"{clean_s:.3f} s; SIGKILL seen after {leave['t'] - t_kill:.2f} s")
        finally:
            stop_all(procs)


def test_netns_static_peers_with_multicast_blocked():
    """The bridge drops multicast (mDNS stays on in every node and finds nothing); node 0
    lists nobody, nodes 1 and 2 list only node 0: all three still see each other."""
    require_netns()
    with NetnsBridge(n=3, subnet="10.213.8", multicast=False) as net:
        t0 = time.monotonic()
        seed = f"{net.ip(0)}:7001"
        procs = start_namespace_nodes(net, lambda i: [] if i == 0 else ["--static-peer", seed])
        try:
            names = [f"n{i}" for i in range(3)]
            for i, n in enumerate(procs):
                n.wait_peers(set(names) - {names[i]}, 8.0)
            converged = time.monotonic() - t0
            for i, n in enumerate(procs):
                for j in set(range(3)) - {i}:
                    joined = n.wait_for(lambda e: e["event"] == "join"
                                        and e["advert"]["node_id"] == names[j], 0.1, "join")
                    assert joined["advert"]["address"] == net.ip(j)
                    assert joined["advert"]["models"] == [f"model-{j}"]
            t_kill = time.monotonic()
            procs[2].p.send_signal(signal.SIGKILL)
            for n in procs[:2]:
                leave = n.wait_for(lambda e: e["event"] == "leave" and e["node_id"] == "n2",
                                   3.0 + 1.0, "SIGKILLed node gone")
                assert leave["t"] - t_kill <= 4.0
            found = [e for n in procs for e in n.events if e["event"] == "mdns_found"]
            assert found == [], "multicast was not blocked"
            print(f"netns static: converged {converged:.2f} s after spawn, no mDNS")
        finally:
            stop_all(procs)


# --- the heartbeat socket from outside ------------------------------------------------------------

def test_heartbeat_answers_hello_ignores_garbage_other_clusters_and_itself():
    """A raw UDP client asks a node for its advert (the static-peer query); garbage, another
    cluster's HELLO and the node's own endpoint in its static list get no answer."""
    async def main():
        port = free_udp_port()
        d = Discovery(NodeAdvert("solo", "home", 7000, port, models=("m",)),
                      DiscoveryConfig(mdns=False, bind_host="127.0.0.1",
                                      static_peers=[("127.0.0.1", port)]))
        d.update_advert(term=2)                         # before start: sent from the start
        await d.start()
        loop = asyncio.get_running_loop()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)

        async def ask(data: bytes, timeout_s: float = 0.4) -> Optional[bytes]:
            await loop.sock_sendto(client, data, ("127.0.0.1", port))
            try:
                return await asyncio.wait_for(loop.sock_recv(client, 65536), timeout_s)
            except asyncio.TimeoutError:
                return None

        try:
            me = NodeAdvert("asker", "home", 7100, client.getsockname()[1], instance="cc")
            assert await ask(b"\x00garbage") is None
            assert await ask(encode_datagram(HELLO, me.replace(cluster="elsewhere"))) is None
            reply = await ask(encode_datagram(HELLO, me))
            assert reply is not None
            kind, advert, gossip = decode_datagram(reply)
            assert kind == BEAT and advert.node_id == "solo" and advert.term == 2
            assert advert.models == ("m",) and advert.revision == 1
            assert [a.node_id for a in d.peers()] == ["asker"]
            assert d.table.entry("asker").advert.address == "127.0.0.1"
            await asyncio.sleep(1.2)                    # a round: its own endpoint was probed
            assert ("127.0.0.1", port) in d.heartbeat.static._own
            assert await d.heartbeat.static.targets(0.0, set()) == []
            with pytest.raises(ClusterError, match=f"cannot bind UDP 127.0.0.1:{port}"):
                await Discovery(NodeAdvert("twin", "home", 7000, port),
                                DiscoveryConfig(mdns=False, bind_host="127.0.0.1")).start()
        finally:
            client.close()
            await d.stop()

    asyncio.run(main())


def test_discovery_rejects_a_timeout_not_above_the_interval():
    with pytest.raises(UsageError, match="timeout_s = 1 must exceed interval_s = 1"):
        Discovery(NodeAdvert("a", "c", 1, 2), DiscoveryConfig(interval_s=1.0, timeout_s=1.0))
