"""The kernel's own account of an OOM kill, read from its log (/dev/kmsg).

When the OOM killer takes a node, the only witness that names the cause is the kernel: a
record such as "Memory cgroup out of memory: Killed process 4235 (python3) total-vm:221380kB,
anon-rss:65280kB, ..." (or the global "Out of memory: Killed process ..."), with the cgroup
and its limit on the lines before. The parsers are pure functions over record text, so the
doctor can read a saved log and the tests the records real kernels wrote; read_kmsg and
kernel_oom_kills touch the device, which needs root or CAP_SYSLOG
(KernelLogUnavailable says so).

Kernel records carry microseconds since boot; boot_wall_time() turns them into wall-clock
seconds (time.time()). Bytes are Python ints.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from dllama_node.common import errors
from dllama_node.common.memory import read_text

KMSG_PATH = "/dev/kmsg"


class KernelLogUnavailable(errors.DllamaError):
    """The kernel log cannot be read here (permissions, or no /dev/kmsg)."""


@dataclass(frozen=True)
class KmsgRecord:
    level: int          # syslog level 0..7
    seq: int
    boot_us: int        # microseconds since boot
    text: str


@dataclass(frozen=True)
class OomKill:
    pid: int
    comm: str
    total_vm_bytes: int
    anon_rss_bytes: int
    file_rss_bytes: int
    shmem_rss_bytes: int
    scope: str                      # "cgroup" (a memory cgroup's limit) or "global" (the machine)
    boot_s: float                   # seconds since boot
    time: Optional[float] = None    # wall clock, when the boot offset is known
    memcg: Optional[str] = None     # the cgroup whose limit was hit (oom_memcg=)
    task_memcg: Optional[str] = None
    cgroup_usage_bytes: Optional[int] = None
    cgroup_limit_bytes: Optional[int] = None
    text: str = ""


_KILLED = re.compile(
    r"(?:(?P<scope>Memory cgroup out of memory|Out of memory)[^:]*: )?Killed process (?P<pid>\d+) "
    r"\((?P<comm>.*)\) total-vm:(?P<vm>\d+)kB, anon-rss:(?P<anon>\d+)kB, file-rss:(?P<file>\d+)kB, "
    r"shmem-rss:(?P<shmem>\d+)kB")
_MEMCG_USAGE = re.compile(r"^memory: usage (\d+)kB, limit (\d+)kB")


def parse_kmsg_record(raw: str) -> Optional[KmsgRecord]:
    """One /dev/kmsg record 'PRI,SEQ,USEC,FLAGS;text\\n KEY=value...' -> KmsgRecord."""
    head, sep, rest = raw.partition(";")
    if not sep:
        return None
    parts = head.split(",")
    try:
        prio, seq, usec = int(parts[0]), int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return None
    return KmsgRecord(prio & 7, seq, usec, rest.split("\n", 1)[0])


def parse_oom_kills(records: Iterable[KmsgRecord], boot_wall_s: Optional[float] = None) -> List[OomKill]:
    """The OOM kills among kernel records, with the cgroup and limits from the lines before.

    boot_wall_s: wall-clock time of boot (time.time() - CLOCK_MONOTONIC) to fill OomKill.time.
    """
    kills = []
    context: dict = {}      # pid -> fields of its "oom-kill:" line
    usage: Optional[Tuple[int, int]] = None
    for rec in records:
        text = rec.text
        if text.startswith("oom-kill:"):
            pairs = dict(p.split("=", 1) for p in text[len("oom-kill:"):].split(",") if "=" in p)
            if pairs.get("pid", "").isdigit():
                context[int(pairs["pid"])] = pairs
            continue
        m = _MEMCG_USAGE.match(text)
        if m:
            usage = (int(m.group(1)) * 1024, int(m.group(2)) * 1024)
            continue
        m = _KILLED.search(text)
        if not m:
            continue
        pid = int(m.group("pid"))
        ctx = context.pop(pid, {})
        scope = m.group("scope") or ""
        is_cgroup = scope.startswith("Memory cgroup") or ctx.get("constraint") == "CONSTRAINT_MEMCG"
        boot_s = rec.boot_us / 1e6
        kills.append(OomKill(
            pid=pid, comm=m.group("comm"), total_vm_bytes=int(m.group("vm")) * 1024,
            anon_rss_bytes=int(m.group("anon")) * 1024, file_rss_bytes=int(m.group("file")) * 1024,
            shmem_rss_bytes=int(m.group("shmem")) * 1024, scope="cgroup" if is_cgroup else "global",
            boot_s=boot_s, time=None if boot_wall_s is None else boot_wall_s + boot_s,
            memcg=ctx.get("oom_memcg"), task_memcg=ctx.get("task_memcg"),
            cgroup_usage_bytes=usage[0] if usage and is_cgroup else None,
            cgroup_limit_bytes=usage[1] if usage and is_cgroup else None, text=text))
        usage = None
    return kills


def read_kmsg(path: str = KMSG_PATH) -> List[KmsgRecord]:
    """Every record still in the kernel's ring buffer. Raises KernelLogUnavailable with why."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError as e:
        restrict = read_text("/proc/sys/kernel/dmesg_restrict").strip() or "?"
        raise KernelLogUnavailable(
            f"cannot read the kernel log {path}: {e.strerror} (kernel.dmesg_restrict={restrict}): "
            f"it needs root or CAP_SYSLOG (AmbientCapabilities=CAP_SYSLOG in the unit)") from e
    except OSError as e:
        raise KernelLogUnavailable(f"cannot read the kernel log {path}: {e.strerror}") from e
    records = []
    try:
        while True:
            try:
                raw = os.read(fd, 16384)        # one record per read
            except BlockingIOError:
                break
            except BrokenPipeError:             # records overwritten while we read: skip on
                continue
            if not raw:
                break
            rec = parse_kmsg_record(raw.decode("utf-8", "replace"))
            if rec is not None:
                records.append(rec)
    finally:
        os.close(fd)
    return records


def boot_wall_time() -> float:
    """Wall-clock time of boot on the clock kernel log timestamps use (CLOCK_MONOTONIC)."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def kernel_oom_kills(since: Optional[float] = None, path: str = KMSG_PATH) -> List[OomKill]:
    """OOM kills in the kernel log, oldest first; those at or after `since` (wall seconds,
    one second of slack) when given. Raises KernelLogUnavailable (root or CAP_SYSLOG only)."""
    kills = parse_oom_kills(read_kmsg(path), boot_wall_time())
    if since is not None:
        kills = [k for k in kills if k.time is not None and k.time >= since - 1.0]
    return kills
