"""Out of memory: what the kernel logged, warnings before it acts, and why a node died.

(a) kernel_oom_kills(): the OOM killer's records from /dev/kmsg ("Memory cgroup out of
    memory: Killed process 4235 (python3) total-vm:221380kB, anon-rss:65280kB, ..." and the
    global "Out of memory: Killed process ..."), parsed by pure functions.
(b) MemoryWatch: polls available memory (MemAvailable bounded by the cgroup) and memory
    pressure (PSI, /proc/pressure/memory) and warns -- a callback and a journal event --
    while there is still time to act.
(c) diagnose_exit(): pure; from a pid, its exit status, the kernel's records, the last
    memory report and the plan -> one Diagnosis naming the node, the time, the phase, the
    numbers and what to change.
(d) RunRecord: each start writes state_dir/last-run.json and each clean exit marks it; a
    start that finds an unclean record looks for an OOM kill of the old pid and reports it.

Times are wall-clock seconds (time.time()); kernel records carry microseconds since boot,
converted with the current boot's offset. Bytes are Python ints.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from dllama_node.common import errors
from dllama_node.common.memory import current_rss_bytes, read_memory
from dllama_node.common.units import MiB
from dllama_node.plan.advice import have, needs
from dllama_node.plan.seq_len import longest_fitting, shorter_lengths

from .journal import log_event

log = logging.getLogger(__name__)

KMSG_PATH = "/dev/kmsg"
PSI_MEMORY_PATH = "/proc/pressure/memory"
RUN_RECORD_FILE = "last-run.json"


class KernelLogUnavailable(errors.DllamaError):
    """The kernel log cannot be read here (permissions, or no /dev/kmsg)."""


# ---------------------------------------------------------------- (a) the kernel's records

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
        restrict = _read_text("/proc/sys/kernel/dmesg_restrict").strip() or "?"
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


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


# ---------------------------------------------------------------- (b) the watch

@dataclass(frozen=True)
class Pressure:
    """Memory PSI: % of time some / all tasks stalled on memory, over 10, 60, 300 s."""
    some_avg10: float = 0.0
    some_avg60: float = 0.0
    some_avg300: float = 0.0
    full_avg10: float = 0.0
    full_avg60: float = 0.0
    full_avg300: float = 0.0


def parse_psi(text: str) -> Optional[Pressure]:
    """'/proc/pressure/memory' text -> Pressure; None when there is no 'some' line."""
    values = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind not in ("some", "full"):
            continue
        for pair in rest.split():
            name, _, value = pair.partition("=")
            if name in ("avg10", "avg60", "avg300"):
                values[f"{kind}_{name}"] = float(value)
    return Pressure(**values) if "some_avg10" in values else None


@dataclass(frozen=True)
class MemorySample:
    time: float
    available_bytes: int            # MemAvailable bounded by the cgroup's headroom
    rss_bytes: int                  # of this process
    cgroup_limit_bytes: Optional[int]
    pressure: Optional[Pressure]


def sample_memory(psi_path: str = PSI_MEMORY_PATH) -> MemorySample:
    mem = read_memory()
    return MemorySample(time.time(), mem.available_bytes, current_rss_bytes(), mem.cgroup_limit_bytes,
                        parse_psi(_read_text(psi_path)))


@dataclass(frozen=True)
class WatchThresholds:
    min_available_bytes: int = 64 * MiB   # warn below this much memory left
    psi_some_avg10: float = 20.0          # warn when tasks stall on memory this % of the time
    psi_full_avg10: float = 5.0           # ... or all of them do


def assess(sample: MemorySample, thresholds: WatchThresholds) -> List[str]:
    """The reasons this sample is dangerous (empty: fine). Pure."""
    reasons = []
    if sample.available_bytes < thresholds.min_available_bytes:
        reasons.append(f"{have(sample.available_bytes)} available, below {needs(thresholds.min_available_bytes)}")
    p = sample.pressure
    if p is not None and p.full_avg10 >= thresholds.psi_full_avg10:
        reasons.append(f"all tasks stalled on memory {p.full_avg10:.1f}% of the last 10 s")
    elif p is not None and p.some_avg10 >= thresholds.psi_some_avg10:
        reasons.append(f"tasks stalled on memory {p.some_avg10:.1f}% of the last 10 s")
    return reasons


@dataclass(frozen=True)
class MemoryWarning:
    node_id: str
    phase: str
    reasons: Tuple[str, ...]
    sample: MemorySample

    @property
    def message(self) -> str:
        return (f"node {self.node_id} is running out of memory while {self.phase or 'running'}: "
                f"{'; '.join(self.reasons)} (rss {have(self.sample.rss_bytes)}): the OOM killer may act")


class MemoryWatch:
    """Warns once each time memory turns dangerous (again after it recovers).

    Drive it with check() from a loop that runs anyway, or start() a thread polling every
    interval_s. `phase` (loading, serving ...) goes into the warning; last_sample is what the
    node reports to the root and records for a later diagnosis.
    """

    def __init__(self, node_id: str, thresholds: WatchThresholds = WatchThresholds(),
                 on_warning: Optional[Callable[[MemoryWarning], None]] = None, interval_s: float = 1.0,
                 sampler: Callable[[], MemorySample] = sample_memory):
        self.node_id = node_id
        self.thresholds = thresholds
        self.on_warning = on_warning
        self.interval_s = interval_s
        self.sampler = sampler
        self.phase = ""
        self.last_sample: Optional[MemorySample] = None
        self._warned = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def check(self) -> Optional[MemoryWarning]:
        sample = self.sampler()
        self.last_sample = sample
        reasons = assess(sample, self.thresholds)
        if not reasons:
            self._warned = False
            return None
        if self._warned:
            return None
        self._warned = True
        warning = MemoryWarning(self.node_id, self.phase, tuple(reasons), sample)
        p = sample.pressure
        log_event("memory_pressure", warning.message, logger=log, phase=self.phase or None,
                  available_bytes=sample.available_bytes, rss_bytes=sample.rss_bytes,
                  psi_some_avg10=p.some_avg10 if p else None, psi_full_avg10=p.full_avg10 if p else None)
        if self.on_warning is not None:
            self.on_warning(warning)
        return warning

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:           # a broken reader must not kill the node
                log.exception("memory watch: check failed")
            self._stop.wait(self.interval_s)

    def start(self) -> "MemoryWatch":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "MemoryWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- (c) diagnosis

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
    from dataclasses import replace as _replace
    memory = memory if memory is not None else MemoryFacts()
    d = _diagnose_exit(node_id, pid, returncode, kills, memory, phase=phase, fixes=fixes,
                       kernel_log_error=kernel_log_error)
    return _replace(d, phase=phase, memory=memory)


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


# ---------------------------------------------------------------- (d) the previous run

def boot_id() -> str:
    return _read_text("/proc/sys/kernel/random/boot_id").strip()


@dataclass
class RunRecord:
    """What a node writes about its run, for the next start to judge how it ended."""

    node_id: str
    pid: int
    boot_id: str
    started_at: float
    phase: str = "starting"
    planned_bytes: Optional[int] = None          # the fields of MemoryFacts, flat for the JSON
    available_bytes: Optional[int] = None
    last_available_bytes: Optional[int] = None
    last_rss_bytes: Optional[int] = None
    max_seq_len: Optional[int] = None
    kv_bytes_per_token: Optional[int] = None
    clean_exit: bool = False
    ended_at: Optional[float] = None
    exit_status: Optional[int] = None
    path: str = field(default="", repr=False, compare=False)

    @classmethod
    def load(cls, path: str) -> Optional["RunRecord"]:
        try:
            with open(path) as f:
                data = json.load(f)
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "path"}
            return cls(**known, path=path)
        except (OSError, ValueError, TypeError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("ignoring the unreadable run record %s: %s", path, e)
            return None

    def save(self) -> None:
        """Atomically (write, fsync, rename): a record is whole or absent after a crash."""
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        tmp = f"{self.path}.tmp"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @property
    def memory(self) -> MemoryFacts:
        return MemoryFacts(**{name: getattr(self, name) for name in MemoryFacts.__dataclass_fields__})

    def update(self, *, phase: Optional[str] = None, sample: Optional[MemorySample] = None,
               **plan: Optional[int]) -> None:
        """Record a new phase, the last memory sample, and plan numbers (planned_bytes,
        available_bytes the plan counted on, max_seq_len, kv_bytes_per_token); written at once."""
        if phase is not None:
            self.phase = phase
        if sample is not None:
            self.last_available_bytes, self.last_rss_bytes = sample.available_bytes, sample.rss_bytes
        for name, value in plan.items():
            if name not in ("planned_bytes", "available_bytes", "max_seq_len", "kv_bytes_per_token"):
                raise TypeError(f"RunRecord.update: unknown field {name}")
            setattr(self, name, value)
        self.save()

    def finish(self, exit_status: int = 0) -> None:
        """Mark the run as ended on purpose (call on a clean shutdown)."""
        self.clean_exit, self.ended_at, self.exit_status = True, time.time(), exit_status
        self.save()


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


def start_run(state_dir: str, node_id: str,
              read_kills: Callable[[float], List[OomKill]] = kernel_oom_kills
              ) -> Tuple[RunRecord, Optional[Diagnosis]]:
    """At start: judge the previous run (logging a previous_exit / oom_diagnosis event when it
    ended badly) and write this run's record. Returns (this run's record, the diagnosis)."""
    path = os.path.join(state_dir, RUN_RECORD_FILE)
    current_boot = boot_id()
    diagnosis = judge_previous_run(RunRecord.load(path), current_boot, read_kills)
    if diagnosis is not None:
        kind = "oom_diagnosis" if diagnosis.kind == "oom_killed" else "previous_exit"
        log_event(kind, f"previous run: {diagnosis.message}", logger=log, **diagnosis.fields())
    record = RunRecord(node_id, os.getpid(), current_boot, time.time(), path=path)
    record.save()
    return record, diagnosis
