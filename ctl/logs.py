"""`dllama-ctl logs`: the service's journal, one line per entry with the diagnosis fields
(node, phase, planned and available bytes ...) spelled out.

It runs `journalctl -u dllama-node -o json --output-fields=...` and formats each entry:

    2024-05-01 12:03:04 b2 ERR node b2 was OOM-killed ... [EVENT=oom_diagnosis PHASE=loading
        PLANNED=1.3 GiB AVAILABLE=921.0 MiB]

--oom selects the memory events by their MESSAGE_IDs (daemon/journal.py EVENTS) instead of
the unit, so entries from an earlier unit name or a foreground run are found too.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Iterable, List, Optional

import click

from dllama_node.common.errors import DllamaError, UsageError
from dllama_node.common.units import format_bytes
from dllama_node.daemon.journal import EVENTS

UNIT = "dllama-node"
# The structured fields log_event writes (field_name of its keyword names).
DIAGNOSIS_FIELDS = ("NODE", "EVENT", "PHASE", "PLANNED_BYTES", "AVAILABLE_BYTES",
                    "ANON_RSS_BYTES", "CGROUP_LIMIT_BYTES", "EXIT_KIND", "PID", "OOM_SCOPE",
                    "OOM_MEMCG", "SIZE")
OUTPUT_FIELDS = ("MESSAGE", "PRIORITY", "MESSAGE_ID", "SYSLOG_IDENTIFIER") + DIAGNOSIS_FIELDS
OOM_EVENTS = ("oom_diagnosis", "previous_exit", "memory_pressure", "peer_vanished",
              "plan_rejected", "memlock_refused")
PRIORITY_NAMES = ("EMERG", "ALERT", "CRIT", "ERR", "WARNING", "NOTICE", "INFO", "DEBUG")


def journalctl_args(follow: bool, lines: Optional[int], oom: bool, since: Optional[str],
                    unit: str = UNIT) -> List[str]:
    """The journalctl arguments (without the program) for these options."""
    args = ["-o", "json", "--no-pager", f"--output-fields={','.join(OUTPUT_FIELDS)}"]
    if oom:
        args += [f"MESSAGE_ID={EVENTS[k].message_id}" for k in OOM_EVENTS]
    else:
        args += ["-u", unit]
    if lines is not None:
        args += ["-n", str(lines)]
    if since:
        args.append(f"--since={since}")
    if follow:
        args.append("-f")
    return args


def _value(entry: dict, name: str):
    v = entry.get(name)
    if isinstance(v, list):
        if v and all(isinstance(x, int) for x in v):
            return bytes(v).decode("utf-8", "replace")
        return v[0] if v else None
    return v


def format_entry(entry: dict) -> str:
    """One journal entry (a -o json object) as one line (a multi-line message keeps its
    first line; the fields follow in brackets, byte counts in KiB/MiB/GiB)."""
    us = entry.get("__REALTIME_TIMESTAMP")
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(us) / 1e6))
    except (TypeError, ValueError):
        when = "-"
    try:
        level = PRIORITY_NAMES[int(_value(entry, "PRIORITY"))]
    except (TypeError, ValueError, IndexError):
        level = "-"
    node = _value(entry, "NODE") or _value(entry, "_HOSTNAME") or "-"
    message = str(_value(entry, "MESSAGE") or "")
    first, _, rest = message.partition("\n")
    if rest:
        first += f" (+{rest.count(chr(10)) + 1} lines)"
    shown = []
    for name in DIAGNOSIS_FIELDS:
        if name == "NODE":
            continue
        v = _value(entry, name)
        if v in (None, ""):
            continue
        if name.endswith("_BYTES"):
            try:
                v = format_bytes(int(v))
            except (TypeError, ValueError):
                pass
            name = name[:-len("_BYTES")]
        shown.append(f"{name}={v}")
    tail = f" [{' '.join(shown)}]" if shown else ""
    return f"{when} {node} {level} {first}{tail}"


def format_lines(lines: Iterable[str]) -> Iterable[str]:
    """Formatted entries of journalctl -o json output lines (others passed through)."""
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            yield line
            continue
        yield format_entry(entry) if isinstance(entry, dict) else line


CANNOT_READ = ("this user cannot read the service's journal: run as root or join group "
               "systemd-journal")


def _cannot_read(journalctl_stderr: str) -> bool:
    """journalctl's words for a journal this user may not read (in part or at all)."""
    return ("insufficient permissions" in journalctl_stderr
            or "not seeing messages" in journalctl_stderr)


def _echo_all(lines: Iterable[str]) -> int:
    """Print each line; how many there were."""
    count = 0
    for line in lines:
        click.echo(line)
        count += 1
    return count


def _none_of_ours(oom: bool, since: Optional[str]) -> str:
    """The line for a journal that holds entries, none of them those the options select."""
    when = f" since {since}" if since else ""
    if oom:
        return f"no memory events in the journal{when}"
    return (f"no journal entries for {UNIT}{when}: has the service run on this machine? "
            f"(systemctl status {UNIT})")


def check_journal_has_entries(exe: str) -> None:
    """DllamaError unless journalctl shows at least one entry of any unit: without one there
    is no journal here, or none this user may read."""
    probe = subprocess.run([exe, "-o", "json", "-n", "1", "--no-pager"], capture_output=True,
                           text=True, errors="replace", timeout=60)
    if probe.stdout.strip():
        return
    if _cannot_read(probe.stderr):
        raise DllamaError(CANNOT_READ)
    raise DllamaError("journalctl shows no entries at all: no journal on this machine, or "
                      "none this user may read (is systemd-journald running? without systemd, "
                      "dllama-node logs to its standard error; --journal-file PATH formats a "
                      "saved journal)")


def logs(follow: bool, lines: Optional[int], oom: bool, since: Optional[str],
         journal_file: Optional[str] = None) -> None:
    """Run journalctl (or read a captured -o json file) and print the formatted lines. When
    nothing could be read: DllamaError; a journal without entries of ours: a line saying so."""
    if lines is not None and lines < 0:
        raise UsageError(f"-n {lines}: expected 0 or more lines")
    if journal_file:
        with open(journal_file, encoding="utf-8", errors="replace") as f:
            if not _echo_all(format_lines(f)):
                click.echo(f"dllama-ctl: no journal entries in {journal_file}", err=True)
        return
    exe = shutil.which("journalctl")
    if exe is None:
        raise DllamaError("journalctl not found: without systemd the service logs to its "
                          "standard error (--journal-file PATH formats a saved journal)")
    if follow:
        check_journal_has_entries(exe)      # else -f would wait in silence for ever
    cmd = [exe] + journalctl_args(follow, lines, oom, since)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    shown = 0
    try:
        shown = _echo_all(format_lines(proc.stdout))
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.terminate()
        _, err = proc.communicate()
    unreadable = _cannot_read(err)
    if unreadable and not shown:
        raise DllamaError(CANNOT_READ)
    if unreadable:
        click.echo(f"dllama-ctl: warning: {CANNOT_READ}", err=True)
    elif proc.returncode not in (0, -15) and err.strip():
        raise DllamaError(f"journalctl exited {proc.returncode}: {err.strip().splitlines()[-1]}")
    if not shown and lines != 0 and not follow:
        check_journal_has_entries(exe)
        click.echo(f"dllama-ctl: {_none_of_ours(oom, since)}", err=True)
