"""Locked memory and scheduling priority for the compute process, with the fix when refused.

lock_memory() mlocks the node's buffers (numpy arrays, buffer objects or (address, length)
ranges) so weights and KV cache never page out; raise_priority() lowers the nice value of
every thread. Neither is fatal: when the kernel refuses, the result says why with the
numbers and what to put in the unit, and the node carries on unlocked / at normal priority.

What decides (Linux):
- mlock: locked pages are bounded by RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK
  (root included: root without CAP_IPC_LOCK gets the same limit; the rule is
  common.process_limits.lockable_limit). Fix: LimitMEMLOCK=infinity in the unit, or
  AmbientCapabilities=CAP_IPC_LOCK.
- nice below the current value needs CAP_SYS_NICE (or an RLIMIT_NICE allowance). Fix:
  Nice=-10 in the unit (set by systemd before it drops privileges), or
  AmbientCapabilities=CAP_SYS_NICE.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import resource
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from dllama_node.common.process_limits import (CAP_IPC_LOCK, CAP_SYS_NICE, has_capability,
                                                memlock_limit_bytes)
from dllama_node.common.units import format_bytes

from .journal import log_event

log = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE

Region = Union[np.ndarray, Tuple[int, int], object]   # array, (address, length), or a buffer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


# ---------------------------------------------------------------- locked memory

def region_span(region: Region) -> Tuple[int, int]:
    """A region -> (address, length) of the bytes it covers; a strided view covers its extent."""
    if isinstance(region, tuple):
        address, length = region
        return int(address), int(length)
    arr = region if isinstance(region, np.ndarray) else np.frombuffer(memoryview(region), np.uint8)
    if arr.size == 0:
        return arr.__array_interface__["data"][0], 0
    low = high = arr.__array_interface__["data"][0]
    for extent, stride in zip(arr.shape, arr.strides):
        step = (extent - 1) * stride
        if step < 0:
            low += step
        else:
            high += step
    return low, high - low + arr.itemsize


def page_ranges(spans: Iterable[Tuple[int, int]], page_bytes: int = PAGE_BYTES) -> List[Tuple[int, int]]:
    """Spans -> sorted, merged, page-aligned half-open ranges [start, stop) (what mlock counts)."""
    ranges = []
    for address, length in spans:
        if length <= 0:
            continue
        start = address // page_bytes * page_bytes
        stop = -(-(address + length) // page_bytes) * page_bytes
        ranges.append((start, stop))
    ranges.sort()
    merged: List[Tuple[int, int]] = []
    for start, stop in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


@dataclass(frozen=True)
class LockResult:
    """What lock_memory did. All or nothing: locked_bytes is requested_bytes or 0."""

    requested_bytes: int            # page-rounded bytes of the regions
    locked_bytes: int
    limit_bytes: int                # RLIMIT_MEMLOCK; -1 unlimited
    has_cap_ipc_lock: bool
    errno: int = 0                  # from the refused mlock; 0 when locked
    reason: str = ""                # why it was refused, with the numbers
    fix: str = ""                   # what to change in the unit
    ranges: Tuple[Tuple[int, int], ...] = field(default=(), repr=False)   # locked [start, stop)

    @property
    def ok(self) -> bool:
        return self.locked_bytes == self.requested_bytes

    def to_dict(self) -> dict:
        return {"ok": self.ok, "requested_bytes": self.requested_bytes,
                "locked_bytes": self.locked_bytes, "limit_bytes": self.limit_bytes,
                "has_cap_ipc_lock": self.has_cap_ipc_lock, "errno": self.errno,
                "errno_name": errno.errorcode.get(self.errno, ""), "reason": self.reason, "fix": self.fix}


def _memlock_refusal(err: int, needed: int, limit: int, has_cap: bool) -> Tuple[str, str]:
    lim = "unlimited" if limit < 0 else format_bytes(limit)
    if not has_cap and (err == errno.EPERM or (limit >= 0 and needed > limit)):
        return (f"locking {format_bytes(needed)} ({needed} bytes) was refused "
                f"({errno.errorcode.get(err, err)}): RLIMIT_MEMLOCK is {lim} ({limit} bytes) and the "
                f"process lacks CAP_IPC_LOCK",
                "set LimitMEMLOCK=infinity in the unit, or grant CAP_IPC_LOCK "
                "(AmbientCapabilities=CAP_IPC_LOCK)")
    return (f"locking {format_bytes(needed)} ({needed} bytes) was refused "
            f"({errno.errorcode.get(err, err)}: {os.strerror(err)}) with RLIMIT_MEMLOCK {lim}"
            + (" and CAP_IPC_LOCK" if has_cap else "") + ": the machine has too little free RAM to "
            "pin it", "shrink this node's slice (a shorter --max-seq-len, or one more node)")


def lock_memory(regions: Sequence[Region], *, node_id: str = "") -> LockResult:
    """mlock every region, or none of them.

    regions: numpy arrays, objects with the buffer protocol (mmap, bytearray), or
    (address, length) tuples. On refusal (ENOMEM over the limit, EPERM, EAGAIN) whatever was
    locked is unlocked again, the reason and the fix are logged (event memlock_refused), and
    the result says so; the caller carries on unlocked.
    """
    ranges = page_ranges(region_span(r) for r in regions)
    needed = sum(stop - start for start, stop in ranges)
    limit = memlock_limit_bytes()
    has_cap = has_capability(CAP_IPC_LOCK)
    done: List[Tuple[int, int]] = []
    for start, stop in ranges:
        if _libc.mlock(ctypes.c_void_p(start), ctypes.c_size_t(stop - start)) != 0:
            err = ctypes.get_errno()
            for s, e in done:
                _libc.munlock(ctypes.c_void_p(s), ctypes.c_size_t(e - s))
            reason, fix = _memlock_refusal(err, needed, limit, has_cap)
            log_event("memlock_refused", f"node {node_id or '?'}: {reason}; carrying on unlocked: {fix}",
                      logger=log, phase="lock", needed_bytes=needed, limit_bytes=limit,
                      errno=errno.errorcode.get(err, str(err)), fix=fix)
            return LockResult(needed, 0, limit, has_cap, err, reason, fix)
        done.append((start, stop))
    if needed:
        log.info("locked %s in %d ranges (RLIMIT_MEMLOCK %s%s)", format_bytes(needed), len(done),
                 "unlimited" if limit < 0 else format_bytes(limit), ", CAP_IPC_LOCK" if has_cap else "")
    return LockResult(needed, needed, limit, has_cap, ranges=tuple(done))


def unlock_memory(result: LockResult) -> None:
    """munlock what lock_memory locked (before the buffers are freed)."""
    for start, stop in result.ranges:
        _libc.munlock(ctypes.c_void_p(start), ctypes.c_size_t(stop - start))


# ---------------------------------------------------------------- priority

@dataclass(frozen=True)
class PriorityResult:
    """What raise_priority did. nice is the value the threads have now."""

    requested_nice: int
    previous_nice: int
    nice: int
    has_cap_sys_nice: bool
    errno: int = 0
    reason: str = ""
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.nice <= self.requested_nice

    def to_dict(self) -> dict:
        return {"ok": self.ok, "requested_nice": self.requested_nice,
                "previous_nice": self.previous_nice, "nice": self.nice,
                "has_cap_sys_nice": self.has_cap_sys_nice, "errno": self.errno,
                "errno_name": errno.errorcode.get(self.errno, ""), "reason": self.reason, "fix": self.fix}


def _thread_ids() -> List[int]:
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return [0]


def raise_priority(nice: int = -10, *, node_id: str = "") -> PriorityResult:
    """Set the nice value of every thread of this process to `nice` (if lower than now).

    Linux keeps nice per thread: threads started later inherit the caller's value, threads
    running now are set one by one. A refusal (EACCES/EPERM) is logged with the fix (event
    priority_refused); the process runs on at its current priority.
    """
    if not -20 <= nice <= 19:
        raise ValueError(f"raise_priority: nice {nice} is outside [-20, 19]")
    previous = os.getpriority(os.PRIO_PROCESS, 0)
    has_cap = has_capability(CAP_SYS_NICE)
    if previous <= nice:
        return PriorityResult(nice, previous, previous, has_cap)
    try:
        for tid in _thread_ids():
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except ProcessLookupError:
                continue     # the thread ended meanwhile
    except PermissionError as e:
        now = os.getpriority(os.PRIO_PROCESS, 0)
        soft_nice, _ = resource.getrlimit(resource.RLIMIT_NICE)   # allows nice >= 20 - soft_nice
        allowed = ("" if soft_nice in (0, resource.RLIM_INFINITY)
                   else f" and RLIMIT_NICE allows nice {20 - soft_nice} at the lowest")
        reason = (f"lowering nice from {previous} to {nice} was refused "
                  f"({errno.errorcode.get(e.errno, e.errno)}): the process lacks CAP_SYS_NICE{allowed}")
        fix = f"set Nice={nice} in the unit, or grant CAP_SYS_NICE (AmbientCapabilities=CAP_SYS_NICE)"
        log_event("priority_refused", f"node {node_id or '?'}: {reason}; running at nice {now}: {fix}",
                  logger=log, requested_nice=nice, nice=now, fix=fix)
        return PriorityResult(nice, previous, now, has_cap, e.errno, reason, fix)
    log.info("nice %d -> %d on %d threads", previous, nice, len(_thread_ids()))
    return PriorityResult(nice, previous, os.getpriority(os.PRIO_PROCESS, 0), has_cap)
