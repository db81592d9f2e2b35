"""daemon.systemd: a real AF_UNIX notify socket receives what a child process sends
(through python-systemd's sd_notify); the facade is inert without NOTIFY_SOCKET."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import uuid

import pytest

from dllama_node.daemon import systemd

HELPER = os.path.join(os.path.dirname(__file__), "daemon_helper.py")


def test_inert_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert not systemd.enabled()
    assert systemd.ready("x") is False
    assert systemd.status("x") is False
    assert systemd.stopping() is False
    assert systemd.watchdog_ping() is False
    assert systemd.watchdog_interval_s() is None


@pytest.mark.parametrize("environ, expected", [
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}, 30.0),
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),   # not ours
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "0"}, None),
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "30000000"}, None),                                           # no socket
])
def test_watchdog_interval(environ, expected):
    assert systemd.watchdog_interval_s(environ) == expected


def test_send_failure_is_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.enabled()
    assert systemd.ready() is False           # ENOENT: logged once, the node runs on
    assert systemd.status("still running") is False


def test_without_python_systemd_is_inert(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setattr(systemd, "sd_daemon", None)
    assert systemd.ready() is False


def _receive_all(sock: socket.socket, pid_expected: int):
    """Datagrams until the sender's STOPPING=1, each checked for the sender's pid (SCM_CREDENTIALS)."""
    messages = []
    while True:
        data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        creds = [struct.unpack("3i", d[:12]) for level, kind, d in ancdata
                 if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        assert creds and creds[0][0] == pid_expected, creds
        messages.append(data.decode())
        if "STOPPING=1" in messages[-1]:
            return messages


def _run_child(address: str, environ_extra: dict, server: socket.socket):
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(NOTIFY_SOCKET=address, **environ_extra)
    child = subprocess.Popen([sys.executable, HELPER, "notify"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        messages = _receive_all(server, child.pid)
    finally:
        out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    return messages, out


def _server(address) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(30)
    return sock


def test_notifications_arrive_on_a_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with _server(path) as server:
        messages, out = _run_child(path, {"WATCHDOG_USEC": "30000000"}, server)
    assert messages[0] == "STATUS=loading slice 3 of 4"
    assert messages[1] == "READY=1\nSTATUS=serving layers 0-15 of 32"   # one line: newline replaced
    assert messages[2] == "WATCHDOG=1"
    reloading = dict(line.split("=", 1) for line in messages[3].split("\n"))
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert messages[4] == "EXTEND_TIMEOUT_USEC=90000000"
    assert messages[5] == "STOPPING=1"
    assert '"watchdog_interval_s": 30.0' in out


def test_abstract_socket_and_foreign_watchdog_pid():
    name = f"dllama-test-{uuid.uuid4().hex}"
    with _server(b"\0" + name.encode()) as server:
        # WATCHDOG_PID names another process: the child must not ping.
        messages, out = _run_child("@" + name, {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, server)
    assert "READY=1\nSTATUS=serving layers 0-15 of 32" in messages
    assert "WATCHDOG=1" not in messages
    assert messages[-1] == "STOPPING=1"
    assert '"watchdog_interval_s": null' in out
