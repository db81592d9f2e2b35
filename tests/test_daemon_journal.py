"""daemon.journal: field names, the native protocol, stderr lines, and a real journald.

The journald test starts systemd-journald in a private mount namespace (tmpfs over /run and
/var/log/journal), logs from a child process through our native sender and through the
default one (python-systemd when installed), and reads the entries back with
`journalctl -o json`.
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import uuid

import pytest

from dllama_node.daemon import journal
from dllama_node.daemon.journal import (EVENTS, JournalHandler, encode_native, field_name, log_event,
                                        send_native, setup_logging, syslog_priority)

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


def decode_native(data: bytes) -> dict:
    """An independent reader of journald's native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL)."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = nl + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            value = data[nl + 9: nl + 9 + size]
            assert data[nl + 9 + size: nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields[name.decode()] = value.decode()
    return fields


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


def test_native_encoding_round_trip():
    fields = {"MESSAGE": "two\nlines", "NODE": "b2", "PLANNED_BYTES": 1 << 40, "EMPTY": "",
              "UNICODE": "déjà vu", "BINARY": b"a\nb\x00c"}
    decoded = decode_native(encode_native(fields))
    assert decoded == {"MESSAGE": "two\nlines", "NODE": "b2", "PLANNED_BYTES": str(1 << 40), "EMPTY": "",
                       "UNICODE": "déjà vu", "BINARY": "a\nb\x00c"}


def test_native_sender_on_a_fake_journal_socket(tmp_path):
    path = str(tmp_path / "socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(5)
        send_native({"MESSAGE": "hello\nworld", "NODE": "b1"}, path)
        assert decode_native(server.recv(65536)) == {"MESSAGE": "hello\nworld", "NODE": "b1"}


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


def test_journal_handler_falls_back_to_stderr(capsys):
    def gone(fields):
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
for sender in native auto; do
  JOURNAL_STREAM=8:1 {python} {helper} journal {run}-$sender $sender > {out}/$sender.transport
done
for sender in native auto; do
  want=$(( {n_events} + 2 ))
  for i in $(seq 100); do
    n=$(journalctl -o json --all TEST_RUN={run}-$sender | wc -l)
    [ "$n" -ge "$want" ] && break; sleep 0.05
  done
  journalctl -o json --all TEST_RUN={run}-$sender > {out}/$sender.json
  journalctl -o json --all TEST_RUN={run}-$sender MESSAGE_ID={oom_id} > {out}/$sender-oom.json
  journalctl -o json --all SYSLOG_IDENTIFIER=dllama-node LOGGER=dllama_node.test > {out}/$sender-plain.json
done
"""


def _journald_available() -> str:
    if os.geteuid() != 0:
        return "needs root (a private mount namespace for journald)"
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
    return {sender: {"all": load(f"{sender}.json"), "oom": load(f"{sender}-oom.json"),
                     "plain": load(f"{sender}-plain.json"),
                     "transport": (out / f"{sender}.transport").read_text().strip()}
            for sender in ("native", "auto")}


def test_real_journald_transports(journal_entries):
    assert journal_entries["native"]["transport"] == "native"
    try:
        expected = "python-systemd" if importlib.util.find_spec("systemd.journal") else "native"
    except ModuleNotFoundError:         # no top-level systemd package at all
        expected = "native"
    assert journal_entries["auto"]["transport"] == expected


@pytest.mark.parametrize("sender", ["native", "auto"])
def test_real_journald_fields(journal_entries, sender):
    entries = journal_entries[sender]["all"]
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


@pytest.mark.parametrize("sender", ["native", "auto"])
def test_real_journald_filters(journal_entries, sender):
    oom = journal_entries[sender]["oom"]
    assert len(oom) == 1 and oom[0]["EVENT"] == "oom_diagnosis"
    plain = journal_entries[sender]["plain"]     # a plain logging call, no event: still NODE and PRIORITY
    assert plain and all(e["MESSAGE"] == "plain record" and e["NODE"] == "b2" and e["PRIORITY"] == "4"
                         for e in plain)
