"""`dllama-ctl doctor`: gathers the facts (the service's process, this machine's memory,
the journal, the kernel log) and hands them to the pure checks of ctl/doctor_checks.py.

The process whose limits count is the service's: its pid comes from the control socket
(SO_PEERCRED), and its RLIMIT_MEMLOCK, capabilities, nice value and memory cgroup from
/proc/PID. When the service is not running, this shell's own values are shown, marked so.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import click

from dllama_node.common.process_limits import CAP_IPC_LOCK, CAP_SYS_NICE, has_capability
from dllama_node.ctl import doctor_checks as dc
from dllama_node.daemon.journal import EVENTS

log = logging.getLogger(__name__)

JOURNAL_SINCE = "-7d"
BROWSE_S = 1.5


@dataclass(frozen=True)
class DoctorOptions:
    socket_path: Optional[str] = None
    config_path: Optional[str] = None
    journal_file: Optional[str] = None      # captured `journalctl -o json` output
    kmsg_file: Optional[str] = None         # captured /dev/kmsg records, one per line
    since: str = JOURNAL_SINCE
    browse_s: float = BROWSE_S


# ---- the service ------------------------------------------------------------------------
def query_service(path: str, timeout_s: float = 5.0) -> Tuple[Optional[dict], Optional[int], str]:
    """(status answer, the service's pid, error text) over the control socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(path)
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", cred)[0] or None
        with sock.makefile("rwb") as f:
            f.write(b'{"op": "status"}\n')
            f.flush()
            answer = json.loads(f.readline() or b"null")
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        return None, None, f"control socket {path}: {why}"
    finally:
        sock.close()
    if not isinstance(answer, dict) or answer.get("error"):
        err = answer.get("error") if isinstance(answer, dict) else "no answer"
        return None, pid, f"control socket {path}: {err}"
    return answer, pid, ""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def process_facts(pid: Optional[int]) -> dc.ProcessFacts:
    """The service's limits when its pid is known and readable, else this process's."""
    target = str(pid) if pid else "self"
    status = _read(f"/proc/{target}/status")
    limits = _read(f"/proc/{target}/limits")
    stat = _read(f"/proc/{target}/stat")
    if pid and not (status and limits and stat):
        return process_facts(None)
    uid = next((int(line.split()[1]) for line in status.splitlines()
                if line.startswith("Uid:")), os.getuid())
    memlock = dc.parse_limits_memlock(limits)
    return dc.ProcessFacts(
        who=f"the service (pid {pid})" if pid else "this shell (the service is not running)",
        uid=uid, memlock_limit_bytes=-1 if memlock is None else memlock,
        cap_ipc_lock=has_capability(CAP_IPC_LOCK, status),
        cap_sys_nice=has_capability(CAP_SYS_NICE, status),
        nice=dc.parse_stat_nice(stat) if stat else os.getpriority(os.PRIO_PROCESS, 0))


def needed_bytes(status: Optional[dict]) -> Optional[int]:
    """This node's planned bytes, from the status answer."""
    if not status:
        return None
    me = status.get("node_id")
    for n in status.get("nodes") or ():
        if n.get("node_id") == me and n.get("planned_bytes"):
            return int(n["planned_bytes"])
    for n in (status.get("plan") or {}).get("nodes", ()):
        if n.get("node_id") == me:
            return int(n.get("memory", {}).get("total") or 0) or None
    return None


# ---- mDNS, key, tokenizer ---------------------------------------------------------------
def browse_mdns(interfaces: Sequence[str], duration_s: float) -> Tuple[Optional[List[str]], str]:
    """Node ids answering a short browse of _dllama._tcp.local. (None and why on error)."""
    try:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf

        from dllama_node.discovery.mdns import SERVICE_TYPE
        zc = (Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only) if interfaces
              else Zeroconf(ip_version=IPVersion.V4Only))
    except Exception as e:                       # zeroconf raises many kinds on bad networks
        return None, str(e)
    found: List[str] = []

    def on_change(zeroconf, service_type, name, state_change):
        node = name[:-len(SERVICE_TYPE) - 1] if name.endswith(SERVICE_TYPE) else name
        if node not in found:
            found.append(node)
    try:
        ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        time.sleep(duration_s)
    finally:
        zc.close()
    return found, ""


def key_facts(path: str) -> Tuple[Optional[str], str]:
    from dllama_node.cluster import auth
    try:
        return auth.key_id(auth.read_key(path)), ""
    except auth.ClusterKeyError as e:
        return None, str(e)


def tokenizer_facts(model: Optional[str], tokenizer: Optional[str]):
    """(error or None, exit code, summary) of tokenizer/check.py on the configured model."""
    from dllama_node.common.errors import DllamaError
    if not model:
        return None, 0, ""
    try:
        from dllama_node.model import open_model
        from dllama_node.tokenizer import load_tokenizer
        with open_model(model) as m:
            tok = load_tokenizer(m.metadata, m.config.vocab_size, tokenizer)
            return None, 0, (f"{tok.kind} tokenizer, {tok.vocab_size} tokens for "
                             f"{m.config.vocab_size} rows, round trip ok")
    except DllamaError as e:
        return str(e), e.exit_code, ""


# ---- journal and kernel log -------------------------------------------------------------
def journal_entries(opts: DoctorOptions) -> Tuple[List[dict], str, str]:
    """(entries, source read, why unavailable) for the history events."""
    if opts.journal_file:
        with open(opts.journal_file, encoding="utf-8", errors="replace") as f:
            return dc.parse_journal_json(f.read()), opts.journal_file, ""
    exe = shutil.which("journalctl")
    if exe is None:
        return [], "", "the journal: journalctl is not installed (no systemd here?)"
    cmd = [exe, "-o", "json", "--no-pager", f"--since={opts.since}"]
    cmd += [f"MESSAGE_ID={EVENTS[k].message_id}" for k in dc.HISTORY_EVENTS]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], "", f"the journal: {e}"
    if "insufficient permissions" in p.stderr or "not seeing messages" in p.stderr:
        return (dc.parse_journal_json(p.stdout), "",
                f"the journal as uid {os.getuid()}: run as root or join group systemd-journal")
    if p.returncode != 0:
        return [], "", f"the journal: journalctl exited {p.returncode}: {p.stderr.strip()[:200]}"
    return dc.parse_journal_json(p.stdout), f"journal since {opts.since}", ""


def parse_kmsg_text(text: str):
    """Records of captured /dev/kmsg text: 'PRI,SEQ,USEC,FLAGS;message' lines (continuation
    lines, which start with a space, are skipped)."""
    from dllama_node.daemon.kernel_log import parse_kmsg_record
    out = []
    for line in text.splitlines():
        if line and not line[0].isspace():
            rec = parse_kmsg_record(line)
            if rec is not None:
                out.append(rec)
    return out


def kernel_kills(opts: DoctorOptions) -> Tuple[list, str, str]:
    """(OOM kills, source read, why unavailable) from the kernel log."""
    from dllama_node.daemon.kernel_log import (KernelLogUnavailable, boot_wall_time,
                                               parse_oom_kills, read_kmsg)
    if opts.kmsg_file:
        with open(opts.kmsg_file, encoding="utf-8", errors="replace") as f:
            return parse_oom_kills(parse_kmsg_text(f.read()), boot_wall_time()), opts.kmsg_file, ""
    try:
        return parse_oom_kills(read_kmsg(), boot_wall_time()), "kernel log", ""
    except KernelLogUnavailable as e:
        return [], "", f"the kernel log (dmesg needs root): {e}"


def history_check(opts: DoctorOptions, node_id: str) -> dc.Check:
    entries, j_source, j_missing = journal_entries(opts)
    kills, k_source, k_missing = kernel_kills(opts)
    journal_events = dc.events_from_journal(entries)
    pids = {ev.pid for ev in journal_events if ev.pid}
    pids |= {int(e["_PID"]) for e in entries if str(e.get("_PID", "")).isdigit()}
    kill_events, others = dc.events_from_kills(kills, node_id, pids)
    return dc.check_oom_history(journal_events, kill_events, others,
                                [s for s in (j_source, k_source) if s],
                                [m for m in (j_missing, k_missing) if m])


# ---- all checks -------------------------------------------------------------------------
def run_checks(opts: DoctorOptions) -> List[dc.Check]:
    from dllama_node.common.memory import cgroup_memory, parse_meminfo
    from dllama_node.ctl.daemon_client import resolve_socket_path
    from dllama_node.ctl.settings import ctl_config
    from dllama_node.daemon.capacity import read_numa_topology

    config = ctl_config(opts.config_path)
    path = resolve_socket_path(opts.socket_path, opts.config_path)
    status, pid, error = query_service(path)
    proc = process_facts(pid)
    need = needed_bytes(status)
    meminfo = parse_meminfo(_read("/proc/meminfo"))
    limit, usage = cgroup_memory(proc_cgroup=f"/proc/{pid or 'self'}/cgroup")
    available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    if limit is not None:
        available = min(available, max(0, limit - (usage or 0)))
    numa = read_numa_topology()
    browsed, browse_error = None, ""
    if status is None and config.mdns and opts.browse_s > 0:
        browsed, browse_error = browse_mdns(config.interfaces, opts.browse_s)
    kid, key_error = key_facts(config.key_file)
    tok_error, tok_code, tok_summary = tokenizer_facts(config.model, config.tokenizer)
    node_id = (status or {}).get("node_id") or config.node_id
    return [
        dc.check_service(status, error),
        dc.check_memlock(proc, need),
        dc.check_priority(proc, config.nice),
        dc.check_memory(meminfo.get("MemTotal", 0), available, limit, need),
        dc.check_swap(meminfo.get("SwapTotal", 0), meminfo.get("SwapFree", 0), config.allow_swap),
        dc.check_numa(numa.n_nodes, numa.describe()),
        dc.check_peers(status, config.static_peers, config.mdns, browsed, browse_error),
        dc.check_key(kid, key_error),
        dc.check_tokenizer(config.model, tok_error, tok_code, tok_summary),
        history_check(opts, node_id),
    ]


def format_checks(checks: Sequence[dc.Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.level:4}  {c.name:{width}}  {c.summary}")
        pad = " " * (6 + width + 2)
        for d in c.details:
            lines.append(f"{pad}- {d}")
        if c.fix and c.level != dc.OK:
            lines.append(f"{pad}fix: {c.fix}")
    fails = sum(c.level == dc.FAIL for c in checks)
    warns = sum(c.level == dc.WARN for c in checks)
    lines.append(f"{fails} FAIL, {warns} WARN, {len(checks) - fails - warns} OK")
    return "\n".join(lines)


def doctor(opts: DoctorOptions, as_json: bool) -> int:
    """Print the checks; returns the exit code (0 without FAIL)."""
    checks = run_checks(opts)
    if as_json:
        click.echo(json.dumps({"checks": [c.to_dict() for c in checks],
                               "exit_code": dc.exit_code_of(checks)}))
    else:
        click.echo(format_checks(checks))
    return dc.exit_code_of(checks)

