"""What the kernel lets this process lock: RLIMIT_MEMLOCK, lifted by CAP_IPC_LOCK.

One rule, used by everything that plans or reports locked memory (the local planner, the
service's capacity report, `dllama-node --check`, `dllama-ctl doctor`):

- a process with CAP_IPC_LOCK in its effective set may lock any amount (the kernel ignores
  RLIMIT_MEMLOCK for it); root without the capability gets the limit like anyone else;
- otherwise it may lock up to the soft RLIMIT_MEMLOCK, which may itself be unlimited.

The decision (lockable_limit) and the parsing (effective_capabilities over /proc/PID/status
text) are pure; memlock_limit_bytes() and lockable_bytes() read this process.
Bytes are Python ints; -1 means no limit.
"""
from __future__ import annotations

import resource
from typing import Optional

CAP_IPC_LOCK = 14
CAP_SYS_NICE = 23
UNLIMITED = -1


def effective_capabilities(status_text: Optional[str] = None) -> int:
    """The CapEff bit mask from /proc/PID/status text (this process's when none is given);
    0 when the line is missing."""
    if status_text is None:
        with open("/proc/self/status") as f:
            status_text = f.read()
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_capability(cap: int, status_text: Optional[str] = None) -> bool:
    """Whether bit `cap` (e.g. CAP_IPC_LOCK) is in the effective set."""
    return bool(effective_capabilities(status_text) >> cap & 1)


def lockable_limit(memlock_limit_bytes: int, cap_ipc_lock: bool) -> int:
    """How many bytes a process may lock: -1 (no limit) with CAP_IPC_LOCK or an unlimited
    RLIMIT_MEMLOCK, else the limit. memlock_limit_bytes: the soft limit, -1 unlimited."""
    if memlock_limit_bytes < UNLIMITED:
        raise ValueError(f"memlock_limit_bytes is {memlock_limit_bytes}: expected -1 (unlimited) or >= 0")
    return UNLIMITED if cap_ipc_lock else memlock_limit_bytes


def memlock_limit_bytes() -> int:
    """This process's RLIMIT_MEMLOCK (soft) in bytes; -1 when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return UNLIMITED if soft == resource.RLIM_INFINITY else int(soft)


def lockable_bytes(status_text: Optional[str] = None) -> int:
    """How much this process may lock (lockable_limit over its own limit and CapEff)."""
    return lockable_limit(memlock_limit_bytes(), has_capability(CAP_IPC_LOCK, status_text))
