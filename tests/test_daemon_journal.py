"""daemon.journal: field names, stderr lines, and a real journald.

The journald test starts systemd-journald in a private mount namespace (tmpfs over /run and
/var/log/journal), logs from a child process through python-systemd, and reads the entries
back with `journalctl -o json`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from dllama_node.daemon import journal
from dllama_node.daemon.journal import (EVENTS, JournalHandler, field_name, log_event, setup_logging,
                                        syslog_priority)

HELPER = os.path.join(os.path.dirname(__file__), "daemon_helper.py")
JOURNALD = "/lib/systemd/systemd-journald"


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_message_ids_are_distinct_128_bit_hex():
    ids = [e.message_id for e in EVENTS.values()]
    assert len(set(ids)) == len(ids)
    for mid in ids:
        assert len(mid) == 32 and int(mid, 16) >= 0 and mid == mid.lower()
    for kind in ("plan_table", "peer_vanished", "oom_diagnosis", "memlock_refused",
                 "priority_refused", "plan_rejected"):
        assert kind in EVENTS


@pytest.mark.parametrize("name, expected", [
    ("phase", "PHASE"), ("planned_bytes", "PLANNED_BYTES"), ("psi-some.avg10", "PSI_SOME_AVG10"),
    ("_private", "PRIVATE"), ("9lives", "LIVES"), ("x" * 80, "X" * 64),
])
def test_field_names(name, expected):
    assert field_name(name) == expected


def test_field_name_without_letters():
    with pytest.raises(ValueError, match="no letters"):
        field_name("_123")


def test_priorities():
    assert [syslog_priority(level) for level in (logging.CRITICAL, logging.ERROR, logging.WARNING,
                                                 logging.INFO, logging.DEBUG, 5)] == [2, 3, 4, 6, 7, 7]


def test_unknown_event_kind():
    with pytest.raises(ValueError, match="unknown event kind 'oom'"):
        log_event("oom", "x")


def test_stderr_lines_carry_the_fields(restore_root_logger):
    out = io.StringIO()
    setup_logging("b2", logging.INFO, target="stderr", environ={}, stream=out)
    log_event("peer_vanished", "peer b3 stopped answering", peer="b3", phase="serving", skipped=None)
    logging.getLogger("dllama_node.x").debug("not shown at INFO")
    line = out.getvalue().strip()
    assert "\n" not in line
    assert line.endswith("WARNING node b2 dllama_node.daemon.journal: peer b3 stopped answering "
                         "[EVENT=peer_vanished PEER=b3 PHASE=serving]")
    assert line[:4].isdigit()            # a timestamp when stderr is not the journal


def test_setup_twice_keeps_one_handler(restore_root_logger):
    root = logging.getLogger()
    before = len(root.handlers)
    setup_logging("b1", target="stderr", environ={}, stream=io.StringIO())
    h = setup_logging("b1", target="stderr", environ={"JOURNAL_STREAM": "8:1234"}, stream=io.StringIO())
    assert len(root.handlers) == before + 1 and h in root.handlers
    assert "%(asctime)s" not in h.formatter._fmt   # stderr is the journal: no timestamps


def test_auto_without_journald_is_stderr(restore_root_logger, tmp_path):
    h = setup_logging("b1", environ={"JOURNAL_STREAM": "8:1234"}, socket_path=str(tmp_path / "none"),
                      stream=io.StringIO())
    assert isinstance(h, logging.StreamHandler)


def test_auto_without_python_systemd_is_stderr(restore_root_logger, monkeypatch, tmp_path):
    socket_path = tmp_path / "socket"
    socket_path.touch()
    monkeypatch.setattr(journal, "sd_journal", None)
    h = setup_logging("b1", environ={"JOURNAL_STREAM": "8:1234"}, socket_path=str(socket_path),
                      stream=io.StringIO())
    assert isinstance(h, logging.StreamHandler)


def test_journal_handler_sends_fields_as_keywords():
    sent = []
    handler = JournalHandler("b6", lambda **fields: sent.append(fields))
    logger = logging.getLogger("dllama_node.test.keywords")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        log_event("memory_pressure", "1 GiB left", logger=logger, available_bytes=1 << 30)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert sent[0]["MESSAGE"] == "1 GiB left" and sent[0]["NODE"] == "b6"
    assert sent[0]["AVAILABLE_BYTES"] == 1 << 30 and sent[0]["EVENT"] == "memory_pressure"


def test_journal_handler_falls_back_to_stderr(capsys):
    def gone(**fields):
        raise ConnectionRefusedError(111, "Connection refused")
    handler = JournalHandler("b4", gone)
    logger = logging.getLogger("dllama_node.test.fallback")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        log_event("plan_rejected", "no plan fits", logger=logger, phase="plan")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    err = capsys.readouterr().err
    assert "journal unavailable" in err
    assert "ERROR node b4 dllama_node.test.fallback: no plan fits [EVENT=plan_rejected PHASE=plan]" in err


def test_handler_entry_fields():
    handler = JournalHandler("b5", lambda fields: None)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("dllama_node.x", logging.ERROR, "/src/x.py", 7, "m %s", ("a",), None)
    setattr(record, journal.FIELDS_ATTR, {"MESSAGE_ID": EVENTS["plan_rejected"].message_id, "NODE_B": None})
    entry = handler.entry(record)
    assert entry["MESSAGE"] == "m a" and entry["PRIORITY"] == 3 and entry["NODE"] == "b5"
    assert entry["CODE_FILE"] == "/src/x.py" and entry["CODE_LINE"] == 7
    assert entry["MESSAGE_ID"] == EVENTS["plan_rejected"].message_id and "NODE_B" not in entry


# ---------------------------------------------------------------- a real journald

JOURNALD_SCRIPT = r"""
set -e
mount -t tmpfs tmpfs /run
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
mkdir -p /run/systemd/journal
{journald} & JPID=$!
trap 'kill $JPID; wait $JPID || true' EXIT
for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
JOURNAL_STREAM=8:1 {python} {helper} journal {run} > {out}/handler
want=$(( {n_events} + 2 ))
for i in $(seq 100); do
  n=$(journalctl -o json --all TEST_RUN={run} | wc -l)
  [ "$n" -ge "$want" ] && break; sleep 0.05
done
journalctl -o json --all TEST_RUN={run} > {out}/all.json
journalctl -o json --all TEST_RUN={run} MESSAGE_ID={oom_id} > {out}/oom.json
journalctl -o json --all SYSLOG_IDENTIFIER=dllama-node LOGGER=dllama_node.test > {out}/plain.json
"""


def _journald_available() -> str:
    if os.geteuid() != 0:
        return "needs root (a private mount namespace for journald)"
    if journal.sd_journal is None:
        return "needs python-systemd"
    for tool in (JOURNALD, shutil.which("unshare"), shutil.which("journalctl")):
        if not tool or not os.path.exists(tool):
            return f"needs {tool or 'unshare and journalctl'}"
    return ""


@pytest.fixture(scope="module")
def journal_entries(tmp_path_factory):
    reason = _journald_available()
    if reason:
        pytest.skip(f"real journald test {reason}")
    out = tmp_path_factory.mktemp("journal")
    run = uuid.uuid4().hex[:12]
    script = JOURNALD_SCRIPT.format(journald=JOURNALD, python=sys.executable, helper=HELPER, run=run,
                                    out=out, n_events=len(EVENTS), oom_id=EVENTS["oom_diagnosis"].message_id)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

    def load(name):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]
    return {"all": load("all.json"), "oom": load("oom.json"), "plain": load("plain.json"),
            "handler": (out / "handler").read_text().strip()}


def test_real_journald_fields(journal_entries):
    assert journal_entries["handler"] == "JournalHandler"       # not the stderr fallback
    entries = journal_entries["all"]
    by_event = {}
    for e in entries:
        by_event.setdefault(e.get("EVENT"), []).append(e)
    assert set(by_event) == set(EVENTS)
    for kind, event in EVENTS.items():
        first = by_event[kind][0]
        assert first["MESSAGE_ID"] == event.message_id
        assert first["MESSAGE"] == f"event {kind} from node b2\nsecond line"
        assert first["NODE"] == "b2" and first["PHASE"] == "loading"
        assert first["PLANNED_BYTES"] == "1395864371" and first["AVAILABLE_BYTES"] == "966367641"
        assert first["PRIORITY"] == str(syslog_priority(event.level))
        assert first["SYSLOG_IDENTIFIER"] == "dllama-node"
        assert first["CODE_FILE"] == HELPER          # the caller of log_event, not journal.py
        assert first["_TRANSPORT"] == "journal"
    big = [e for e in by_event["plan_table"] if e.get("SIZE") == "big"]
    assert len(big) == 1 and big[0]["MESSAGE"] == "x" * 300_000     # sent as a sealed memfd
    traced = [e for e in by_event["plan_rejected"] if "EXCEPTION_TEXT" in e]
    assert len(traced) == 1 and "RuntimeError: boom" in traced[0]["EXCEPTION_TEXT"]


def test_real_journald_filters(journal_entries):
    oom = journal_entries["oom"]
    assert len(oom) == 1 and oom[0]["EVENT"] == "oom_diagnosis"
    plain = journal_entries["plain"]     # a plain logging call, no event: still NODE and PRIORITY
    assert plain and all(e["MESSAGE"] == "plain record" and e["NODE"] == "b2" and e["PRIORITY"] == "4"
                         for e in plain)
