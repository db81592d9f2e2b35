"""Why a node died, in one sentence a person can act on.

Pure functions from facts to a Diagnosis: the process's exit status, the kernel's OOM
records (daemon/kernel_log.py) and what was known of its memory (MemoryFacts: its plan, its
last report) -> which node, when, in which phase, the numbers, and what to change (a shorter
--max-seq-len by plan/seq_len.py's rule, the planner's own fixes, another node). The root
uses diagnose_exit for a process it watched die; a node's next start uses
judge_previous_run on the record its last run left (daemon/run_record.py). The facts come
in as arguments (judge_previous_run's kernel-log reader too), so every wording is tested
without killing anything.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

from dllama_node.common import errors
from dllama_node.plan.advice import have, needs
from dllama_node.plan.seq_len import longest_fitting, shorter_lengths

from .kernel_log import KernelLogUnavailable, OomKill, kernel_oom_kills

if TYPE_CHECKING:
    from .run_record import RunRecord


@dataclass(frozen=True)
class Diagnosis:
    node_id: str
    kind: str               # "oom_killed", "killed", "crashed", "exited", "clean", "unknown"
    message: str
    fixes: Tuple[str, ...] = ()
    oom: Optional[OomKill] = None
    phase: str = ""
    memory: Optional["MemoryFacts"] = None

    def fields(self) -> dict:
        """Journal fields for log_event (PHASE, PLANNED_BYTES, AVAILABLE_BYTES when known)."""
        out = {"exit_kind": self.kind}
        if self.phase:
            out["phase"] = self.phase
        if self.memory is not None:
            out.update(planned_bytes=self.memory.planned_bytes,
                       available_bytes=self.memory.available_bytes)
        if self.oom is not None:
            out.update(pid=self.oom.pid, anon_rss_bytes=self.oom.anon_rss_bytes, oom_scope=self.oom.scope,
                       oom_memcg=self.oom.memcg, cgroup_limit_bytes=self.oom.cgroup_limit_bytes)
        return out


def shorter_seq_len(planned_bytes: int, available_bytes: int, max_seq_len: int,
                    kv_bytes_per_token: int) -> Optional[int]:
    """The longest of the plan's shorter lengths (plan/seq_len.py: a multiple of 256, or
    128, 64, 32, 16) whose smaller KV cache brings planned_bytes within available_bytes;
    None when even 16 does not."""
    shortfall = planned_bytes - available_bytes
    lengths = shorter_lengths(max_seq_len)
    if shortfall <= 0 or kv_bytes_per_token <= 0 or not lengths:
        return None
    seq, fits = longest_fitting(                      # integers: exact for any size
        lengths, lambda s: (max_seq_len - s) * kv_bytes_per_token >= shortfall)
    return seq if fits else None


def _clock(t: Optional[float]) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t is not None else "an unknown time"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


_EXIT_NAMES = {errors.EXIT_USAGE: "a usage error", errors.EXIT_MODEL: "a model file error",
               errors.EXIT_TOKENIZER: "a tokenizer error", errors.EXIT_MEMORY: "a memory plan error",
               errors.EXIT_CLUSTER: "a cluster error"}


@dataclass(frozen=True)
class MemoryFacts:
    """What was known about a node's memory when it died (None: not known)."""

    planned_bytes: Optional[int] = None         # its plan's total
    available_bytes: Optional[int] = None       # what the plan counted on (its report at planning)
    last_available_bytes: Optional[int] = None  # its last report before it died
    last_rss_bytes: Optional[int] = None
    max_seq_len: Optional[int] = None           # of the plan
    kv_bytes_per_token: Optional[int] = None    # its KV cache's bytes per position

    def plan_text(self) -> str:
        """'its plan needed 1.3 GiB with 921 MiB available, 18 MiB left at its last report'."""
        parts = []
        if self.planned_bytes is not None:
            plan = f"its plan needed {needs(self.planned_bytes)}"
            if self.available_bytes is not None:
                plan += f" with {have(self.available_bytes)} available"
            parts.append(plan)
        if self.last_available_bytes is not None:
            rss = f", rss {have(self.last_rss_bytes)}" if self.last_rss_bytes is not None else ""
            parts.append(f"{have(self.last_available_bytes)} left at its last report{rss}")
        return ", ".join(parts)


def diagnose_exit(node_id: str, pid: int, returncode: Optional[int], kills: Sequence[OomKill],
                  memory: "MemoryFacts" = None, *, phase: str = "", fixes: Sequence[str] = (),
                  kernel_log_error: Optional[str] = None) -> Diagnosis:
    """Why process `pid` of node `node_id` ended (see _diagnose_exit), with the phase and
    the memory facts kept for the journal's fields. Pure."""
    memory = memory if memory is not None else MemoryFacts()
    d = _diagnose_exit(node_id, pid, returncode, kills, memory, phase=phase, fixes=fixes,
                       kernel_log_error=kernel_log_error)
    return replace(d, phase=phase, memory=memory)


def _diagnose_exit(node_id: str, pid: int, returncode: Optional[int], kills: Sequence[OomKill],
                  memory: MemoryFacts = MemoryFacts(), *, phase: str = "", fixes: Sequence[str] = (),
                  kernel_log_error: Optional[str] = None) -> Diagnosis:
    """Why process `pid` of node `node_id` ended. Pure.

    returncode: as subprocess reports it (negative: killed by that signal; None: unknown).
    kills: the kernel's OOM records (kernel_oom_kills()); the one with this pid is the cause.
    fixes: what the planner says would fit (PlanError.fixes); without them, a shorter
    --max-seq-len is worked out from the KV cache's bytes per token; "add a node" always.
    """
    during = f" while {phase}" if phase else ""
    m = memory
    oom = next((k for k in reversed(kills) if k.pid == pid), None)
    if oom is not None:
        parts = [f"anon-rss {have(oom.anon_rss_bytes)}"]
        if oom.scope == "cgroup" and oom.cgroup_limit_bytes is not None:
            cgroup = f"its memory cgroup {oom.memcg}" if oom.memcg else "its memory cgroup"
            parts.append(f"{cgroup} is limited to {have(oom.cgroup_limit_bytes)}")
        if m.plan_text():
            parts.append(m.plan_text())
        todo = list(fixes)
        if not todo and None not in (m.planned_bytes, m.available_bytes, m.max_seq_len, m.kv_bytes_per_token):
            seq = shorter_seq_len(m.planned_bytes, m.available_bytes, m.max_seq_len, m.kv_bytes_per_token)
            if seq is not None:
                todo.append(f"use --max-seq-len {seq}")
        if None not in (m.planned_bytes, m.available_bytes) and m.planned_bytes <= m.available_bytes:
            todo.insert(0, f"the plan fit, so something else took the memory (another process, or "
                           f"this node used more than planned: rss {have(oom.anon_rss_bytes)})")
        todo.append("add a node")
        where = "by the kernel" if oom.scope == "global" else "by the kernel (memory cgroup limit)"
        message = (f"node {node_id} was OOM-killed {where} at {_clock(oom.time)}{during}: "
                   f"{', '.join(parts)}: {', or '.join(todo)}")
        return Diagnosis(node_id, "oom_killed", message, tuple(todo), oom)

    mem = f"; {m.plan_text()}" if m.plan_text() else ""
    if returncode is None:
        why = (f"the kernel log is unreadable ({kernel_log_error})" if kernel_log_error
               else f"the kernel log has no OOM kill of pid {pid}")
        return Diagnosis(node_id, "unknown", f"node {node_id} (pid {pid}) ended{during} without a clean "
                         f"exit; {why}{mem}", tuple(fixes))
    if returncode == 0:
        return Diagnosis(node_id, "clean", f"node {node_id} (pid {pid}) exited cleanly{during}")
    if returncode > 0:
        what = _EXIT_NAMES.get(returncode, "an error")
        return Diagnosis(node_id, "exited", f"node {node_id} (pid {pid}) exited with status "
                         f"{returncode} ({what}){during}: see its log", tuple(fixes))
    sig = -returncode
    if sig == signal.SIGKILL:
        if kernel_log_error:
            why = (f"the kernel log is unreadable ({kernel_log_error}), so an OOM kill cannot be "
                   f"confirmed{mem}")
        else:
            why = (f"not by the OOM killer (the kernel log has no OOM kill of pid {pid}): by a person, "
                   f"a supervisor or a stop timeout{mem}")
        return Diagnosis(node_id, "killed", f"node {node_id} (pid {pid}) was killed by SIGKILL{during}, "
                         f"{why}", tuple(fixes))
    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        return Diagnosis(node_id, "killed", f"node {node_id} (pid {pid}) was stopped by "
                         f"{_signal_name(sig)}{during}")
    return Diagnosis(node_id, "crashed", f"node {node_id} (pid {pid}) crashed with {_signal_name(sig)}"
                     f"{during}{mem}", tuple(fixes))


def judge_previous_run(previous: Optional[RunRecord], current_boot_id: str,
                       read_kills: Callable[[float], List[OomKill]] = kernel_oom_kills) -> Optional[Diagnosis]:
    """How the previous run ended, when it did not end cleanly; None when it did (or none ran)."""
    if previous is None or previous.clean_exit:
        return None
    prev = previous
    if prev.boot_id != current_boot_id:
        mem = f"; {prev.memory.plan_text()}" if prev.memory.plan_text() else ""
        return Diagnosis(prev.node_id, "unknown",
                         f"node {prev.node_id}'s previous run (pid {prev.pid}, started "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(prev.started_at))}) ended "
                         f"with the machine while {prev.phase} (reboot or power loss){mem}; with a "
                         f"persistent journal `journalctl -k -b -1 -g 'out of memory'` shows OOM kills")
    kills: List[OomKill] = []
    error = None
    try:
        kills = read_kills(prev.started_at)
    except KernelLogUnavailable as e:
        error = str(e)
    return diagnose_exit(prev.node_id, prev.pid, None, kills, prev.memory, phase=prev.phase,
                         kernel_log_error=error)
