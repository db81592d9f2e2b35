"""Several hosts on one machine: a bridge in its own network namespace and N node
namespaces joined to it by veth pairs (TESTING.md, "Several hosts").

    with NetnsBridge(n=3, subnet="10.213.7") as net:
        net.ip(0)                       # "10.213.7.1": node i has subnet.(i + 1)
        net.run(0, ["ip", "addr"])      # CompletedProcess, run inside node 0's namespace
        p = net.popen(1, [sys.executable, "script.py"], stdout=subprocess.PIPE)
        net.ns(2)                       # the namespace's name, for `ip netns exec`
        net.set_multicast(False)        # the bridge stops forwarding multicast

Namespace names carry the test process id and a counter, so concurrent tests do not
collide; every process started with popen() and every process left in the namespaces is
killed, and the namespaces deleted, on exit. The bridge has multicast snooping off, so mDNS
between the nodes is real multicast. Each node namespace has `lo` and `eth0` only: test
traffic never leaves them.

Needs root and iproute2: call `require_netns()` (pytest skip with the reason) first.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from typing import List, Optional, Sequence

_counter = itertools.count()


def netns_unavailable_reason() -> Optional[str]:
    """None when network namespaces can be built here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 `ip` is not installed"
    name = f"dlprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def require_netns() -> None:
    """pytest.skip with the reason when namespaces cannot be built."""
    import pytest

    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


class NetnsBridge:
    """n node namespaces on one bridge; node i has address f"{subnet}.{i + 1}"/24."""

    def __init__(self, n: int, subnet: str = "10.213.7", multicast: bool = True) -> None:
        if not 1 <= n <= 250:
            raise ValueError(f"n = {n}: expected 1..250 nodes on a /24")
        parts = subnet.split(".")
        if len(parts) != 3 or not all(p.isdigit() and int(p) < 256 for p in parts):
            raise ValueError(f"subnet {subnet!r}: expected three octets, e.g. '10.213.7'")
        self.n = n
        self.subnet = subnet
        self.multicast = multicast
        self.prefix = f"dlt{os.getpid()}x{next(_counter)}"
        self.bridge_ns = f"{self.prefix}-br"
        self._made: List[str] = []
        self._procs: List[subprocess.Popen] = []

    # --- names ------------------------------------------------------------------------------------

    def ns(self, i: int) -> str:
        self._check(i)
        return f"{self.prefix}-n{i}"

    def ip(self, i: int) -> str:
        self._check(i)
        return f"{self.subnet}.{i + 1}"

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"node {i}: expected 0..{self.n - 1}")

    # --- build and tear down ----------------------------------------------------------------------

    def __enter__(self) -> "NetnsBridge":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def _build(self) -> None:
        br = self.bridge_ns
        self._ip("netns", "add", br)
        self._made.append(br)
        self._ip("-n", br, "link", "set", "lo", "up")
        self._ip("-n", br, "link", "add", "br0", "type", "bridge")
        self._ip("-n", br, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        self._ip("-n", br, "link", "set", "br0", "up")
        for i in range(self.n):
            ns = self.ns(i)
            self._ip("netns", "add", ns)
            self._made.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                     "netns", br)
            self._ip("-n", br, "link", "set", f"p{i}", "master", "br0")
            self._ip("-n", br, "link", "set", f"p{i}", "up")
            self._ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
        if not self.multicast:
            self.set_multicast(False)

    def set_multicast(self, enabled: bool) -> None:
        """Let the bridge forward multicast (mDNS) or drop it, like a switch that blocks
        it; unicast and broadcast (ARP) are unaffected."""
        flag = "on" if enabled else "off"
        for i in range(self.n):
            self._ip("-n", self.bridge_ns, "link", "set", f"p{i}", "type", "bridge_slave",
                     "mcast_flood", flag)
        self.multicast = enabled

    def close(self) -> None:
        """Kill what runs in the namespaces (ours only), then delete them."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 3.0
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in self._made:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        self._procs.clear()

    # --- running things inside --------------------------------------------------------------------

    def argv(self, i: int, argv: Sequence[str], own_sys: bool = True) -> List[str]:
        """argv run in node i's namespace. `ip netns exec` mounts a fresh /sys for the
        namespace (no cgroup hierarchy in it); own_sys=False enters only the network
        namespace (nsenter), so /sys/fs/cgroup stays visible to what runs there."""
        if not own_sys:
            return ["nsenter", f"--net=/run/netns/{self.ns(i)}", "--", *argv]
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def run(self, i: int, argv: Sequence[str], timeout: float = 30.0,
            **kwargs: object) -> subprocess.CompletedProcess:
        """Run argv in node i's namespace; output captured as text unless told otherwise."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(i, argv), timeout=timeout, **kwargs)  # type: ignore

    def popen(self, i: int, argv: Sequence[str], own_sys: bool = True,
              **kwargs: object) -> subprocess.Popen:
        """Start argv in node i's namespace; killed on exit if still running."""
        p = subprocess.Popen(self.argv(i, argv, own_sys), **kwargs)  # type: ignore
        self._procs.append(p)
        return p
