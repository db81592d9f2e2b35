"""A host without the cluster key sends frames to a real worker process before any
authentication: JSON nested 50000 deep (under the handshake's 64 KiB), an integer of 5000 digits, a HELLO announcing
16 MiB. Each is refused with a reason in the log, no buffer of the announced size is
made, and the worker goes on: a well-formed HELLO right after still gets its WELCOME.
(Before, the first two ended the worker: RecursionError and ValueError escaped.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dllama_node.cluster.auth import INITIATOR, Handshake, generate_key, write_key
from dllama_node.cluster.protocol import (HEADER, MAGIC, PRE_AUTH_MAX_BYTES, PROTOCOL_VERSION,
                                          Kind)

HOSTILE_HELLOS = {
    "deep nesting": b"[" * 50_000,
    "a 5000-digit integer": b'{"version": ' + b"9" * 5000 + b"}",
    "not JSON": b"\xff\xfe not json",
}


@pytest.fixture
def worker(tmp_path):
    key = generate_key()
    key_file = tmp_path / "cluster.key"
    write_key(key_file, key)
    proc = subprocess.Popen([sys.executable, "-m", "dllama_node.cluster.worker", "--listen",
                             "127.0.0.1:0", "--node-id", "w1", "--key-file", str(key_file),
                             "--state-dir", str(tmp_path / "state"), "--timeout", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening "), line + proc.stderr.read()
    host, port = line.split()[1].rsplit(":", 1)
    yield proc, (host, int(port)), key
    proc.kill()
    proc.wait(10)


def frame(kind: Kind, payload: bytes, length=None) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, len(payload) if length is None else length) + payload


def send_and_close(address, data: bytes) -> bytes:
    """Send, then read what comes back until the worker closes (at most 10 s); a worker
    that refuses at the header may close before all was sent."""
    got = b""
    with socket.create_connection(address, timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return got
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            return got


def welcome_for_a_good_hello(address, key) -> dict:
    hs = Handshake(key, INITIATOR, "default", "r1")
    hello = json.dumps({"version": PROTOCOL_VERSION, **hs.offer()}).encode()
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(frame(Kind.HELLO, hello))
        header = s.recv(HEADER.size, socket.MSG_WAITALL)
        magic, _, kind, length = HEADER.unpack(header)
        assert (magic, kind) == (MAGIC, Kind.WELCOME)
        return json.loads(s.recv(length, socket.MSG_WAITALL))


@pytest.mark.parametrize("name", sorted(HOSTILE_HELLOS))
def test_a_hostile_hello_is_refused_and_the_worker_goes_on(worker, name):
    proc, address, key = worker
    send_and_close(address, frame(Kind.HELLO, HOSTILE_HELLOS[name]))
    welcome = welcome_for_a_good_hello(address, key)
    assert welcome["node_id"] == "w1" and proc.poll() is None


def test_a_large_announced_hello_is_refused_before_reading_it(worker):
    proc, address, key = worker
    t0 = time.monotonic()
    # 16 MiB announced, nothing sent after the header: refused at once, not read for 5 s
    send_and_close(address, frame(Kind.HELLO, b"", length=16 << 20))
    assert time.monotonic() - t0 < 4
    assert welcome_for_a_good_hello(address, key)["node_id"] == "w1"
    proc.kill()
    log = proc.communicate(timeout=10)[1]
    assert f"limit {PRE_AUTH_MAX_BYTES}" in log, log
    assert "not valid JSON" in log or "refused peer" in log


def test_the_refusals_are_logged_with_their_reason(worker):
    proc, address, key = worker
    for payload in HOSTILE_HELLOS.values():
        send_and_close(address, frame(Kind.HELLO, payload))
    welcome_for_a_good_hello(address, key)
    proc.kill()
    log = proc.communicate(timeout=10)[1]
    assert log.count("refused peer 127.0.0.1:") >= 3, log
    assert "nested too deep" in log and "not valid JSON" in log, log


def test_an_unexpected_error_in_one_session_ends_only_that_session(tmp_path, caplog):
    """In process: the first session raises what no handler expects; the loop logs it
    and the next connection is served."""
    import threading

    from dllama_node.cluster.worker import Worker

    key = generate_key()
    w = Worker("127.0.0.1", 0, "w1", key, state_dir=str(tmp_path), timeout_s=5)
    real_session, calls = w.session, []

    def session(conn):
        calls.append(conn.peer)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real_session(conn)
    w.session = session
    threading.Thread(target=w.serve_forever, daemon=True).start()
    host, port = w.address.rsplit(":", 1)
    send_and_close((host, int(port)), b"x")
    assert welcome_for_a_good_hello((host, int(port)), key)["node_id"] == "w1"
    assert len(calls) == 2
    assert any("ended by an unexpected error" in r.getMessage() for r in caplog.records)
