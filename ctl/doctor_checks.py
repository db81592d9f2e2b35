"""What `dllama-ctl doctor` judges, as pure functions over facts gathered elsewhere
(ctl/doctor.py reads /proc, the control socket, the journal and the kernel log).

Each check returns a Check: OK, WARN or FAIL, one line of what was found with its
numbers, and the fix when it is not OK. A FAIL carries the exit code of its kind
(EXIT_MEMORY for memory, EXIT_CLUSTER for the cluster, EXIT_TOKENIZER ...).

The OOM history merges two sources: the service's own journal events (oom_diagnosis,
previous_exit, peer_vanished, memory_pressure, plan_rejected, memlock_refused,
plan_table; daemon/journal.py EVENTS) and the kernel's OOM-kill records
(daemon/kernel_log.py's parser). A kill counts as current (FAIL) when no plan has been made
since it; older ones are a WARN.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from dllama_node.common import errors
from dllama_node.common.process_limits import UNLIMITED, lockable_limit
from dllama_node.common.units import format_bytes
from dllama_node.daemon.journal import EVENTS

OK, WARN, FAIL = "OK", "WARN", "FAIL"
LEVEL_ORDER = {OK: 0, WARN: 1, FAIL: 2}
UNIT = "dllama-node"
MEMORY_FIX = ("a smaller max_seq_len (max_seq_len = 1024 in /etc/dllama-node/dllama-node.conf, "
              "or --max-seq-len), another node, or a smaller quantization (q4_0)")
# The service's events the history shows, by journal MESSAGE_ID.
HISTORY_EVENTS = ("oom_diagnosis", "previous_exit", "peer_vanished", "memory_pressure",
                  "plan_rejected", "memlock_refused", "plan_table")
MAX_OTHER_KILLS = 5
KIND_BY_MESSAGE_ID = {EVENTS[k].message_id: k for k in HISTORY_EVENTS}


@dataclass(frozen=True)
class Check:
    name: str
    level: str                  # OK, WARN or FAIL
    summary: str                # what was found, with the numbers
    fix: str = ""               # what to do about it (empty when OK)
    exit_code: int = 0          # for a FAIL: the named exit code of its kind
    details: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "level": self.level, "summary": self.summary,
                "fix": self.fix, "exit_code": self.exit_code, "details": list(self.details)}


def exit_code_of(checks: Sequence[Check]) -> int:
    """0 without a FAIL; else the exit code of the first FAIL."""
    return next((c.exit_code or errors.EXIT_FAILURE for c in checks if c.level == FAIL), 0)


# ---- the process whose limits count ------------------------------------------------------
@dataclass(frozen=True)
class ProcessFacts:
    """The service's process when it runs (its limits and capabilities are what count),
    else this shell's, which may differ from the unit's."""

    who: str                    # "the service (pid 812)" or "this shell (service not running)"
    uid: int
    memlock_limit_bytes: int    # RLIMIT_MEMLOCK soft, -1 unlimited
    cap_ipc_lock: bool
    cap_sys_nice: bool
    nice: int


def parse_limits_memlock(limits_text: str) -> Optional[int]:
    """/proc/PID/limits -> the soft 'Max locked memory' in bytes, -1 for unlimited."""
    for line in limits_text.splitlines():
        if line.startswith("Max locked memory"):
            soft = line[len("Max locked memory"):].split()[0]
            return -1 if soft == "unlimited" else int(soft)
    return None


def parse_stat_nice(stat_text: str) -> int:
    """/proc/PID/stat -> its nice value (field 19; the command may hold spaces)."""
    return int(stat_text[stat_text.rindex(")") + 2:].split()[16])


def check_memlock(p: ProcessFacts, needed_bytes: Optional[int]) -> Check:
    name = "locked memory"
    limit = "unlimited" if p.memlock_limit_bytes < 0 else format_bytes(p.memlock_limit_bytes)
    need = f"; this node's slice needs {format_bytes(needed_bytes)}" if needed_bytes else ""
    if lockable_limit(p.memlock_limit_bytes, p.cap_ipc_lock) == UNLIMITED:
        how = "unlimited" if p.memlock_limit_bytes < 0 else f"{limit}, lifted by CAP_IPC_LOCK"
        return Check(name, OK, f"{p.who}: RLIMIT_MEMLOCK {how}{need}")
    fix = ("LimitMEMLOCK=infinity in the unit (systemctl edit dllama-node), or "
           "AmbientCapabilities=CAP_IPC_LOCK; then systemctl restart dllama-node")
    if needed_bytes is not None and needed_bytes <= p.memlock_limit_bytes:
        return Check(name, OK, f"{p.who}: RLIMIT_MEMLOCK {limit}{need}: it fits")
    if needed_bytes is None:
        return Check(name, WARN, f"{p.who}: RLIMIT_MEMLOCK {limit} without CAP_IPC_LOCK: a "
                     "slice bigger than that stays swappable (no plan yet to compare)", fix)
    return Check(name, WARN, f"{p.who}: RLIMIT_MEMLOCK {limit} without CAP_IPC_LOCK{need}: "
                 "the slice is not locked and can be swapped out", fix)


def check_priority(p: ProcessFacts, wanted_nice: int) -> Check:
    name = "priority"
    if p.nice <= wanted_nice:
        return Check(name, OK, f"{p.who}: nice {p.nice} (wanted {wanted_nice})")
    if p.uid == 0 or p.cap_sys_nice:
        return Check(name, OK, f"{p.who}: nice {p.nice}, can be raised to {wanted_nice} "
                     f"({'root' if p.uid == 0 else 'CAP_SYS_NICE'})")
    return Check(name, WARN, f"{p.who}: nice {p.nice}, cannot be raised to {wanted_nice} "
                 f"(uid {p.uid} without CAP_SYS_NICE): other work slows every token",
                 "Nice=-10 or AmbientCapabilities=CAP_SYS_NICE in the unit "
                 "(systemctl edit dllama-node)")


def check_swap(swap_total_bytes: int, swap_free_bytes: int, allow_swap: bool) -> Check:
    name = "swap"
    have = (f"{format_bytes(swap_free_bytes)} free of {format_bytes(swap_total_bytes)}"
            if swap_total_bytes else "no swap")
    if not allow_swap:
        return Check(name, OK, f"{have}; allow_swap = no: weights stay in RAM (and locked)")
    if not swap_total_bytes:
        return Check(name, WARN, "allow_swap = yes, but there is no swap: it changes nothing",
                     "add swap (dphys-swapfile on Raspberry Pi OS) or set allow_swap = no")
    return Check(name, WARN, f"{have}; allow_swap = yes: weights that spill there are not "
                 "locked, and every token reads them from the disk (slow)",
                 "prefer another node or a smaller max_seq_len; allow_swap only to make a "
                 "model load at all")


def check_numa(n_numa_nodes: int, description: str) -> Check:
    name = "NUMA"
    if n_numa_nodes <= 1:
        return Check(name, OK, f"{max(n_numa_nodes, 1)} NUMA node{'' if n_numa_nodes <= 1 else 's'}")
    return Check(name, OK, f"{n_numa_nodes} NUMA nodes ({description}): one copy of the "
                 "weights per process, never one per NUMA node")


def check_memory(mem_total_bytes: int, available_bytes: int, cgroup_limit_bytes: Optional[int],
                 needed_bytes: Optional[int]) -> Check:
    name = "memory"
    limit = (f", cgroup limit {format_bytes(cgroup_limit_bytes)} (MemoryMax=)"
             if cgroup_limit_bytes is not None else "")
    have = (f"{format_bytes(available_bytes)} available of {format_bytes(mem_total_bytes)}"
            f"{limit}")
    if needed_bytes is None:
        return Check(name, OK, have)
    if cgroup_limit_bytes is not None and needed_bytes > cgroup_limit_bytes:
        return Check(name, FAIL, f"{have}: the slice needs {format_bytes(needed_bytes)}, more "
                     "than the cgroup allows", "raise MemoryMax= in the unit (systemctl edit "
                     f"dllama-node), or plan for less: {MEMORY_FIX}", errors.EXIT_MEMORY)
    return Check(name, OK, f"{have}; the slice needs {format_bytes(needed_bytes)}")


def check_service(status: Optional[dict], error: str) -> Check:
    name = "service"
    if status is None:
        return Check(name, FAIL, f"not reachable: {error}",
                     "systemctl start dllama-node; journalctl -u dllama-node says why it stopped",
                     errors.EXIT_CLUSTER)
    state = status.get("state", "?")
    root = status.get("root_id") or "none"
    text = f"node {status.get('node_id')} is {state}, root {root}"
    if status.get("last_error"):
        return Check(name, WARN, f"{text}; last error: {status['last_error']}",
                     "see dllama-ctl status and dllama-ctl logs")
    return Check(name, OK, text)


def check_peers(status: Optional[dict], static_peers: Sequence[str], mdns: bool,
                browsed: Optional[Sequence[str]], browse_error: str = "") -> Check:
    """Peers the service sees (its status), or what a short mDNS browse found."""
    name = "peers"
    fix = ("multicast (mDNS, UDP 5353) may be blocked on this network: allow it on the "
           "switch/router, or list the other nodes with static_peers = HOST:PORT ... in "
           "/etc/dllama-node/dllama-node.conf")
    static = f"; static peers: {', '.join(static_peers)}" if static_peers else ""
    if status is not None:
        peers = [p.get("node_id", "?") for p in status.get("peers", ())]
        if peers:
            return Check(name, OK, f"the service sees {len(peers)} peer(s): "
                         f"{', '.join(peers)}{static}")
        return Check(name, WARN, f"the service sees no peers{static} (a one-node cluster?)",
                     fix if mdns else "check static_peers and that the nodes share the key")
    if not mdns:
        return Check(name, WARN, f"mDNS is off and the service is not running{static}",
                     "start the service: dllama-ctl status then lists the peers it reached")
    if browsed is None:
        return Check(name, WARN, f"mDNS browse {'failed: ' + browse_error if browse_error else 'skipped'}"
                     f"{static}", fix)
    if browsed:
        return Check(name, OK, f"mDNS: {len(browsed)} dllama node(s) answer: "
                     f"{', '.join(browsed)}{static}")
    return Check(name, WARN, f"mDNS: no dllama node answered the browse{static}", fix)


def check_key(key_id: Optional[str], error: str) -> Check:
    if key_id is not None:
        return Check("cluster key", OK, f"key id {key_id} (same id on every node: same key)")
    if "not readable" in error:
        return Check("cluster key", WARN, error, "run dllama-ctl doctor as root to check it")
    return Check("cluster key", FAIL, error, "sudo dllama-ctl key generate (first node) or "
                 "dllama-ctl key set (others)", errors.EXIT_CLUSTER)


def check_tokenizer(model: Optional[str], error: Optional[str], exit_code: int = 0,
                    summary: str = "") -> Check:
    name = "tokenizer"
    if not model:
        return Check(name, OK, "no model configured on this node (model = PATH): nothing to check")
    if error is None:
        return Check(name, OK, f"{model}: {summary or 'matches the model'}")
    return Check(name, FAIL, f"{model}: {error}", "use the tokenizer of this very model "
                 "(tokenizer = PATH), or a model file that carries its own",
                 exit_code or errors.EXIT_TOKENIZER)


# ---- the OOM history ---------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEvent:
    """One line of the history: a service event or a kernel OOM kill."""

    time: Optional[float]       # wall-clock seconds
    kind: str                   # a HISTORY_EVENTS name, or "kernel_oom_kill"
    node: str = ""
    phase: str = ""
    pid: Optional[int] = None
    planned_bytes: Optional[int] = None
    available_bytes: Optional[int] = None
    anon_rss_bytes: Optional[int] = None
    cgroup_limit_bytes: Optional[int] = None
    message: str = ""

    @property
    def is_oom(self) -> bool:
        return self.kind == "kernel_oom_kill" or (self.kind == "oom_diagnosis")


def _field(entry: dict, name: str):
    value = entry.get(name)
    if isinstance(value, list):                   # a field repeated: the first; bytes: decode
        if value and all(isinstance(v, int) for v in value):
            value = bytes(value).decode("utf-8", "replace")
        else:
            value = value[0] if value else None
    return value


def _int(value) -> Optional[int]:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def parse_journal_json(text: str) -> List[dict]:
    """`journalctl -o json` output (one object per line) -> entries; bad lines skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def events_from_journal(entries: Iterable[dict]) -> List[MemoryEvent]:
    """The service's history events among journal entries (by MESSAGE_ID, else EVENT)."""
    events = []
    for e in entries:
        kind = KIND_BY_MESSAGE_ID.get(str(_field(e, "MESSAGE_ID") or ""))
        if kind is None and _field(e, "EVENT") in HISTORY_EVENTS:
            kind = _field(e, "EVENT")
        if kind is None:
            continue
        us = _int(_field(e, "__REALTIME_TIMESTAMP"))
        message = str(_field(e, "MESSAGE") or "")
        phase = str(_field(e, "PHASE") or "")
        if not phase and " while " in message:                 # "... OOM-killed ... while loading:"
            phase = message.split(" while ", 1)[1].split(":", 1)[0].split(",", 1)[0].strip()
        events.append(MemoryEvent(
            time=us / 1e6 if us is not None else None, kind=kind,
            node=str(_field(e, "NODE") or ""), phase=phase, pid=_int(_field(e, "PID")),
            planned_bytes=_int(_field(e, "PLANNED_BYTES")),
            available_bytes=_int(_field(e, "AVAILABLE_BYTES")),
            anon_rss_bytes=_int(_field(e, "ANON_RSS_BYTES")),
            cgroup_limit_bytes=_int(_field(e, "CGROUP_LIMIT_BYTES")), message=message))
    return sorted(events, key=lambda ev: ev.time or 0.0)


def is_service_kill(kill, known_pids: Iterable[int]) -> bool:
    """An OOM kill (daemon/kernel_log.OomKill) of the service: its pid, command or cgroup."""
    cgroups = f"{kill.memcg or ''} {kill.task_memcg or ''}"
    return (kill.pid in set(known_pids) or kill.comm.startswith("dllama")
            or UNIT in cgroups)


def events_from_kills(kills: Iterable, node_id: str, known_pids: Iterable[int]) -> Tuple[
        List[MemoryEvent], List[str]]:
    """(events for the service's kills, one line per other process killed)."""
    known = set(known_pids)
    events, others = [], []
    for k in kills:
        if is_service_kill(k, known):
            events.append(MemoryEvent(
                time=k.time, kind="kernel_oom_kill", node=node_id, pid=k.pid,
                anon_rss_bytes=k.anon_rss_bytes, cgroup_limit_bytes=k.cgroup_limit_bytes,
                message=k.text))
        else:
            limit = (f", cgroup {k.memcg} limit {format_bytes(k.cgroup_limit_bytes)}"
                     if k.cgroup_limit_bytes is not None else "")
            others.append(f"{_when(k.time)} kernel OOM-killed pid {k.pid} ({k.comm}), "
                          f"anon-rss {format_bytes(k.anon_rss_bytes)}{limit}")
    return events, others


def _when(t: Optional[float]) -> str:
    import time as _time
    return _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(t)) if t else "(time unknown)"


def describe_event(ev: MemoryEvent) -> str:
    """One line: when, node, phase, needed vs available, what happened."""
    parts = [_when(ev.time), ev.kind.replace("_", " ")]
    if ev.node:
        parts.append(f"node {ev.node}")
    if ev.phase:
        parts.append(f"phase {ev.phase}")
    if ev.planned_bytes is not None:
        parts.append(f"needed {format_bytes(ev.planned_bytes)}")
    if ev.available_bytes is not None:
        parts.append(f"available {format_bytes(ev.available_bytes)}")
    if ev.anon_rss_bytes is not None:
        parts.append(f"rss {format_bytes(ev.anon_rss_bytes)}")
    if ev.cgroup_limit_bytes is not None:
        parts.append(f"cgroup limit {format_bytes(ev.cgroup_limit_bytes)}")
    head = ", ".join(parts)
    message = ev.message.strip().splitlines()[0] if ev.message.strip() else ""
    if ev.kind == "plan_table":
        message = "a plan was made and loaded"
    return f"{head}: {message}" if message else head


def _merge(journal_events: List[MemoryEvent], kill_events: List[MemoryEvent]) -> List[MemoryEvent]:
    """Kernel kills already explained by an oom_diagnosis of the same pid are dropped."""
    explained = {ev.pid for ev in journal_events if ev.kind == "oom_diagnosis" and ev.pid}
    merged = journal_events + [k for k in kill_events if k.pid not in explained]
    return sorted(merged, key=lambda ev: ev.time or 0.0)


def check_oom_history(journal_events: List[MemoryEvent], kill_events: List[MemoryEvent],
                      other_kills: Sequence[str] = (), sources: Sequence[str] = (),
                      unavailable: Sequence[str] = ()) -> Check:
    """FAIL when the service was OOM-killed and no plan was made since; WARN for older kills,
    memory pressure, vanished peers or rejected plans; OK when none."""
    name = "OOM history"
    events = _merge(journal_events, kill_events)
    shown = [ev for ev in events if ev.kind != "plan_table"]
    details = [describe_event(ev) for ev in shown]
    if len(other_kills) > MAX_OTHER_KILLS:
        details.append(f"other processes: {len(other_kills) - MAX_OTHER_KILLS} earlier OOM "
                       "kills not shown")
    details += [f"other process: {line}" for line in other_kills[-MAX_OTHER_KILLS:]]
    details += [f"not checked: {why}" for why in unavailable]
    read = f" (read: {', '.join(sources)})" if sources else ""
    ooms = [ev for ev in events if ev.is_oom]
    if ooms:
        last_oom = ooms[-1]
        plans_after = [ev for ev in events if ev.kind == "plan_table"
                       and (ev.time or 0.0) > (last_oom.time or 0.0)]
        summary = (f"{len(ooms)} OOM kill(s) of the service; the last: node "
                   f"{last_oom.node or '?'}{', phase ' + last_oom.phase if last_oom.phase else ''}"
                   f" at {_when(last_oom.time)}{read}")
        if not plans_after:
            return Check(name, FAIL, summary, MEMORY_FIX, errors.EXIT_MEMORY, tuple(details))
        return Check(name, WARN, summary + "; a plan was made since", MEMORY_FIX, 0,
                     tuple(details))
    if shown or other_kills:
        kinds = sorted({ev.kind.replace("_", " ") for ev in shown})
        if other_kills:
            kinds.append("other processes OOM-killed")
        return Check(name, WARN, f"no OOM kill of the service, but: {', '.join(kinds)}{read}",
                     "see the lines above; dllama-ctl logs --oom shows them with their fields",
                     0, tuple(details))
    if unavailable and not sources:
        return Check(name, WARN, "could not read the journal or the kernel log",
                     "run dllama-ctl doctor as root", 0, tuple(details))
    return Check(name, OK, f"no OOM kills or memory warnings{read}", "", 0, tuple(details))
