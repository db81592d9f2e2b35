"""Logging for the node service: structured journal entries under systemd, stderr lines otherwise.

    setup_logging("b2", logging.INFO)
    log_event("oom_diagnosis", "node b2 was OOM-killed ...", phase="loading",
              planned_bytes=1395864371, available_bytes=966367641)

Under systemd (JOURNAL_STREAM set and the journal socket present) every record becomes one
journal entry with fields a person can filter on -- NODE, EVENT, PHASE, PLANNED_BYTES,
AVAILABLE_BYTES ... -- and, for each kind of event in EVENTS, a fixed MESSAGE_ID:

    journalctl -u dllama-node MESSAGE_ID=5b1e0c9e3f4a4d2f9b7c1a6e8d2f4b10

Entries go through python-systemd (`systemd.journal.send`, libsystemd's sd_journal_sendv:
Debian's python3-systemd, a Depends of the .deb), which also passes an entry too big for
one datagram as a sealed memfd. Our handler rather than python-systemd's JournalHandler,
because that one sends every attribute of the record and none of the node's fields; ours
sends the node, the code location and log_event's fields, and keeps a record on stderr when
journald refuses it. Outside systemd, or without python-systemd, the same records are
stderr lines ending in their fields: "... [EVENT=oom_diagnosis PHASE=loading]" (libsystemd
drops entries silently when journald is absent, so the journal is chosen only when its
socket is there).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, TextIO

try:
    from systemd import journal as sd_journal   # python3-systemd / systemd-python
except ImportError:
    sd_journal = None

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "dllama-node"
FIELDS_ATTR = "dllama_fields"     # the LogRecord attribute carrying journal fields


@dataclass(frozen=True)
class EventKind:
    message_id: str     # 128-bit id, 32 lower-case hex digits (journalctl MESSAGE_ID=...)
    level: int          # the default logging level of the event
    meaning: str


# One table: every kind of event a person will look for, with its fixed MESSAGE_ID.
# Never change an id once released: users put them in their filters.
EVENTS: Dict[str, EventKind] = {
    "plan_table": EventKind("55d0ae1843524aa6b0fbb8c1f220e7a2", logging.INFO,
                            "the shard plan as a per-node table, before anything loads"),
    "plan_rejected": EventKind("a1684b6cd9fe47bda181584932b93d94", logging.ERROR,
                               "a node rejected its part of the plan, or no plan fits"),
    "peer_vanished": EventKind("c3d94e5abfae461cb1badb21bb164efb", logging.WARNING,
                               "a peer stopped answering or closed its connection"),
    "oom_diagnosis": EventKind("0dd6bd8bafd0431b999310c376f22659", logging.ERROR,
                               "why a node died, when it ran out of memory"),
    "memlock_refused": EventKind("8c1a46322dcd44e691204aa10f81fb5b", logging.WARNING,
                                 "mlock failed: memory stays swappable; the fix in the unit"),
    "priority_refused": EventKind("a31704332d41420b93eff767fa1a7a66", logging.WARNING,
                                  "raising the scheduling priority was refused; the fix"),
    "memory_pressure": EventKind("faf31d5a1588476dba009e4b92081a9b", logging.WARNING,
                                 "memory is running out: the OOM killer may act soon"),
    "previous_exit": EventKind("fc4a8f63dc8f4c7c852feed46133ef68", logging.WARNING,
                               "the previous run of this node did not end cleanly"),
    "capacity": EventKind("7edf83635f5e48c2b70da0b8e2c33371", logging.INFO,
                          "what this node offers: RAM, swap, memlock limit, cores, speed"),
}

_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
             (logging.INFO, 6), (logging.DEBUG, 7))

_NAME_BAD = re.compile(r"[^A-Z0-9_]")

log = logging.getLogger(__name__)


def field_name(name: str) -> str:
    """A journal field name: upper-case letters, digits and '_', not leading '_' or a digit,
    at most 64 characters ('planned_bytes' -> 'PLANNED_BYTES')."""
    out = _NAME_BAD.sub("_", name.upper()).lstrip("_0123456789")[:64]
    if not out:
        raise ValueError(f"journal field name {name!r} has no letters left after cleaning")
    return out


def syslog_priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


# ---------------------------------------------------------------- handlers

class JournalHandler(logging.Handler):
    """Each record -> one journal entry: MESSAGE, PRIORITY, NODE, the code location and
    the record's structured fields (log_event's)."""

    def __init__(self, node_id: str, send: Optional[Callable[..., None]] = None,
                 level: int = logging.NOTSET):
        super().__init__(level)
        self.node_id = node_id
        self.send = send if send is not None else sd_journal.send    # fields as keywords
        self._failed = False

    def entry(self, record: logging.LogRecord) -> Dict[str, object]:
        fields: Dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": syslog_priority(record.levelno),
            "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
            "NODE": self.node_id,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
            "THREAD_NAME": record.threadName,
        }
        if record.exc_info:
            fields["EXCEPTION_TEXT"] = logging.Formatter().formatException(record.exc_info)
        for name, value in (getattr(record, FIELDS_ATTR, None) or {}).items():
            if value is not None:
                fields[name] = value
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(**self.entry(record))
        except OSError as e:
            # journald is gone (shutdown, restart): keep the message on stderr.
            if not self._failed:
                sys.stderr.write(f"dllama-node: journal unavailable ({e}); logging to stderr\n")
                self._failed = True
            sys.stderr.write(StderrFormatter(self.node_id, timestamps=False).format(record) + "\n")
        except Exception:
            self.handleError(record)


class StderrFormatter(logging.Formatter):
    """'2024-05-01 12:03:04 WARNING node b2 dllama_node.daemon.memory_watch: text [EVENT=...]'."""

    def __init__(self, node_id: str, timestamps: bool = True):
        fmt = "%(levelname)s node " + node_id.replace("%", "%%") + " %(name)s: %(message)s"
        super().__init__(("%(asctime)s " + fmt) if timestamps else fmt, datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, FIELDS_ATTR, None) or {}
        message = record.getMessage()     # fields the message already spells out are not repeated
        shown = " ".join(f"{k}={v}" for k, v in fields.items()
                         if k != "MESSAGE_ID" and v is not None and not (len(str(v)) > 16 and str(v) in message))
        return f"{text} [{shown}]" if shown else text


def under_journal(environ: Optional[Mapping[str, str]] = None,
                  socket_path: str = JOURNAL_SOCKET) -> bool:
    """True under systemd with journald listening: JOURNAL_STREAM set and its socket present."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM")) and os.path.exists(socket_path)


_setup_lock = threading.Lock()


def setup_logging(node_id: str, level: int = logging.INFO, *, target: str = "auto",
                  socket_path: str = JOURNAL_SOCKET,
                  environ: Optional[Mapping[str, str]] = None,
                  stream: Optional[TextIO] = None) -> logging.Handler:
    """Install one handler on the root logger (replacing the one a previous call installed).

    target: "auto" (the journal when under_journal(), else stderr), "journal" or "stderr";
    without python-systemd both "auto" and "journal" are stderr.
    Returns the handler. Timestamps are left out of stderr lines when stderr is the journal.
    """
    if target not in ("auto", "journal", "stderr"):
        raise ValueError(f"setup_logging: target {target!r} is not one of auto, journal, stderr")
    env = os.environ if environ is None else environ
    use_journal = sd_journal is not None and (
        target == "journal" or (target == "auto" and under_journal(env, socket_path)))
    handler: logging.Handler
    if use_journal:
        handler = JournalHandler(node_id)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(StderrFormatter(node_id, timestamps=not env.get("JOURNAL_STREAM")))
    handler._dllama_installed = True    # type: ignore[attr-defined]
    root = logging.getLogger()
    with _setup_lock:
        for old in [h for h in root.handlers if getattr(h, "_dllama_installed", False)]:
            root.removeHandler(old)
            old.close()
        root.addHandler(handler)
        root.setLevel(level)
    return handler


def log_event(kind: str, message: str, *, logger: Optional[logging.Logger] = None,
              level: Optional[int] = None, exc_info: object = None, **fields: object) -> None:
    """Log one event of a kind in EVENTS with its MESSAGE_ID and structured fields.

    Field names are keyword names (phase="loading" -> PHASE=loading); None values are left
    out; byte counts should be ints in bytes (PLANNED_BYTES=1395864371).
    """
    if kind not in EVENTS:
        raise ValueError(f"log_event: unknown event kind {kind!r}; known: {', '.join(EVENTS)}")
    event = EVENTS[kind]
    extra: Dict[str, object] = {"MESSAGE_ID": event.message_id, "EVENT": kind}
    for name, value in fields.items():
        extra[field_name(name)] = value
    (logger or log).log(event.level if level is None else level, message,
                        exc_info=exc_info, extra={FIELDS_ATTR: extra}, stacklevel=2)
