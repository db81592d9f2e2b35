"""How much memory this node really has: MemAvailable bounded by its cgroup's limit.

Parsing is pure (functions over file text); the readers at the bottom touch /proc and
/sys. cgroup v1 (memory.limit_in_bytes - memory.usage_in_bytes, as on our test
machines) and cgroup v2 (memory.max - memory.current, as on Raspberry Pi OS) are both
read. All numbers are bytes, as Python ints.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Optional

# A v1 limit at or above this is "no limit" (the kernel reports PAGE_COUNTER_MAX pages).
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryReading:
    mem_total_bytes: int
    mem_available_bytes: int       # MemAvailable from /proc/meminfo
    swap_free_bytes: int
    cgroup_limit_bytes: Optional[int]   # None when unlimited or not in a memory cgroup
    cgroup_usage_bytes: Optional[int]

    @property
    def available_bytes(self) -> int:
        """What a new allocation can use: MemAvailable, bounded by the cgroup's headroom."""
        avail = self.mem_available_bytes
        if self.cgroup_limit_bytes is not None:
            used = self.cgroup_usage_bytes or 0
            avail = min(avail, max(0, self.cgroup_limit_bytes - used))
        return avail


def parse_meminfo(text: str) -> dict:
    """'/proc/meminfo' text -> {field: bytes}."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue   # /proc/self/status also has text fields (Name:, State: ...)
        value = int(parts[0])
        if len(parts) > 1 and parts[1] == "kB":
            value *= 1024
        out[name.strip()] = value
    return out


def parse_cgroup_paths(text: str) -> dict:
    """'/proc/self/cgroup' text -> {controller: path}; cgroup v2 appears under ''."""
    out = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in (controllers.split(",") if controllers else [""]):
            out[c] = path
    return out


def parse_limit(text: str) -> Optional[int]:
    """A cgroup limit file ('max', or bytes) -> bytes, or None for no limit."""
    text = text.strip()
    if not text or text == "max":
        return None
    value = int(text)
    return None if value >= _V1_UNLIMITED else value


def read_text(path: str) -> str:
    """The text of a /proc or /sys file; "" when it is absent or unreadable (a kernel
    without that feature, a container that hides it): the parsers treat both as unknown."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cgroup_memory(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"):
    """(limit_bytes, usage_bytes) of this process's memory cgroup, (None, None) if unlimited."""
    paths = parse_cgroup_paths(read_text(proc_cgroup))
    if "memory" in paths:  # v1
        base = os.path.join(root, "memory", paths["memory"].lstrip("/"))
        limit = parse_limit(read_text(os.path.join(base, "memory.limit_in_bytes")))
        usage = read_text(os.path.join(base, "memory.usage_in_bytes"))
        return limit, (int(usage) if usage and limit is not None else None)
    if "" in paths:  # v2
        base = os.path.join(root, paths[""].lstrip("/"))
        limit = parse_limit(read_text(os.path.join(base, "memory.max")))
        usage = read_text(os.path.join(base, "memory.current"))
        return limit, (int(usage) if usage and limit is not None else None)
    return None, None


def read_memory() -> MemoryReading:
    info = parse_meminfo(read_text("/proc/meminfo"))
    limit, usage = cgroup_memory()
    return MemoryReading(
        mem_total_bytes=info.get("MemTotal", 0),
        mem_available_bytes=info.get("MemAvailable", info.get("MemFree", 0)),
        swap_free_bytes=info.get("SwapFree", 0),
        cgroup_limit_bytes=limit,
        cgroup_usage_bytes=usage,
    )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    status = parse_meminfo(read_text("/proc/self/status"))
    return status.get("VmRSS", 0)
