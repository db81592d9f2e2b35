"""Progress while slices load, end to end: two real dllama-node processes on loopback
(static peers, no mDNS), and `dllama-ctl status --wait` started as they start, on the
worker's control socket (so the status goes through the worker to the root, and the root
asks the worker how far it is over the authenticated control port).

- In a pipe: one line per node and phase, then the status; the final rows say every
  node loaded exactly its planned weight bytes, and the worker's own record carries the
  root's load id.
- In a real terminal (tmux): the rows are drawn in place, so each node's row is on the
  screen once, at 100%.
- As root, a worker in its own mount namespace that cannot see the root's model file:
  its slice streams from the root, and its row goes through "streaming".
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from dllama_node.cluster.auth import generate_key, write_key
from dllama_node.common.units import format_bytes
from dllama_node.daemon.control import request
from dllama_node.model.generate import PRESETS, write_random_model
from tests.test_daemon_service import NODE

CTL = os.path.join(os.path.dirname(sys.executable), "dllama-ctl")
TMUX = shutil.which("tmux")


def _port_pair() -> int:
    """A free port p with p + 1 free too (the control port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports on loopback")


class Pair:
    """Two daemons: n1 holds the model (the root: it has the model file, n2 never roots),
    n2 is the worker."""

    def __init__(self, tmp_path, model: str, worker_prefix=(), worker_model=True):
        self.tmp = tmp_path
        key = str(tmp_path / "cluster.key")
        write_key(key, generate_key())
        folder = tmp_path / "s"
        folder.mkdir(exist_ok=True)
        p1, p2 = _port_pair(), _port_pair()
        while abs(p1 - p2) < 2:
            p2 = _port_pair()
        self.sock = {n: str(folder / f"{n}.sock") for n in ("n1", "n2")}
        self.procs = []
        env = dict(os.environ, DLLAMA_NICE="0")
        for node, port, peer, extra, prefix in (
                ("n1", p1, p2, ["--model", model], ()),
                ("n2", p2, p1, (["--model", model] if worker_model else []) + ["--never-root"],
                 worker_prefix)):
            argv = [*prefix, NODE, "--config", str(tmp_path / "none.conf"), "--node-id", node,
                    *extra, "--listen", f"127.0.0.1:{port}", "--no-mdns",
                    "--static-peer", f"127.0.0.1:{peer}", "--control-socket", self.sock[node],
                    "--http-listen", "off", "--state-dir", str(tmp_path / f"state-{node}"),
                    "--key-file", key]
            self.procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                               stderr=open(tmp_path / f"{node}.log", "w")))

    def wait_socket(self, node: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(self.sock[node]):
            if time.monotonic() > deadline:
                raise AssertionError(f"{node} made no control socket:\n{self.logs()}")
            time.sleep(0.05)

    def status_wait(self, node: str):
        """`dllama-ctl status --wait --json` on `node`'s socket: (the run, its status)."""
        self.wait_socket(node)
        r = subprocess.run([CTL, "status", "--wait", "--wait-timeout", "90", "--json",
                            "--socket", self.sock[node]], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr + self.logs()
        return r, json.loads(r.stdout)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + (self.tmp / f"{n}.log").read_text()[-3000:]
                         for n in ("n1", "n2") if (self.tmp / f"{n}.log").exists())

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _check_final(status: dict) -> dict:
    """Every planned node loaded exactly its planned weight bytes; returns the rows."""
    plan = status["plan"]
    assert sorted(n["node_id"] for n in plan["nodes"]) == ["n1", "n2"], plan
    loading = status["loading"]
    assert loading["done"] is True and len(loading["load_id"]) == 16
    rows = {r["node_id"]: r for r in loading["nodes"]}
    for n in plan["nodes"]:
        r = rows[n["node_id"]]
        assert r["load_id"] == loading["load_id"]
        assert r["phase"] == "loaded", r
        assert r["done"] == r["total"] == n["memory"]["weights"], (r, n["memory"])
        assert r["elapsed_s"] >= 0
    return rows


@pytest.fixture
def model(tmp_path):
    (tmp_path / "models").mkdir()
    path = str(tmp_path / "models" / "small.gguf")
    write_random_model(path, PRESETS["small"], weight_type="q8_0", seed=3)   # 89 MiB
    return path


def test_status_wait_in_a_pipe_shows_each_node_loading(tmp_path, model):
    pair = Pair(tmp_path, model)
    try:
        r, status = pair.status_wait("n2")
        assert status["root_id"] == "n1" and status["asked_root"] is True
        _check_final(status)
        lines = r.stderr.splitlines()
        assert lines[0].startswith("waiting for the cluster: "), r.stderr
        for node in ("n1", "n2"):
            done = [ln for ln in lines if ln.startswith(f"{node} ") and " loaded " in ln]
            assert len(done) == 1 and "[########################] 100%" in done[0], r.stderr
        assert {r["detail"] for r in status["loading"]["nodes"]} == {"from its model file"}
        # the worker's own record, asked directly: the root's load id reached it
        own = list(request(pair.sock["n2"], {"op": "progress"}))[-1]
        assert own["load"]["load_id"] == status["loading"]["load_id"]
        assert own["load"]["phase"] == "loaded"
        # once loaded, the status keeps the finished rows and asks no one again
        again = list(request(pair.sock["n1"], {"op": "status"}))[-1]
        assert again["loading"]["nodes"] == status["loading"]["nodes"]
    finally:
        pair.close()


def test_status_asked_on_the_worker_marks_it_and_shows_its_locked_bytes(tmp_path, model):
    pair = Pair(tmp_path, model)
    try:
        _run, status = pair.status_wait("n2")
        r = subprocess.run([CTL, "status", "--socket", pair.sock["n2"]], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr + pair.logs()
        answer = list(request(pair.sock["n2"], {"op": "status"}))[-1]
    finally:
        pair.close()
    rows = {n["node_id"]: n for n in answer["nodes"]}
    # the root's own address, which it does not know, comes from the worker's peer list
    assert rows["n1"]["address"].startswith("127.0.0.1:"), rows["n1"]
    assert rows["n2"]["address"].startswith("127.0.0.1:"), rows["n2"]
    planned = {n["node_id"]: n for n in status["plan"]["nodes"]}
    for node in ("n1", "n2"):         # each locked its slice (or said it locked none)
        locked = rows[node]["locked_bytes"]
        assert isinstance(locked, int), rows[node]
        assert locked == 0 or locked >= planned[node]["memory"]["weights"], (locked, planned[node])
    lines = r.stdout.splitlines()
    assert r.stdout.count("(this node)") == 1 and "this node  n2 (" in r.stdout, r.stdout
    row_n1 = next(ln for ln in lines if ln.startswith("n1 "))
    row_n2 = next(ln for ln in lines if ln.startswith("n2 (this node) "))
    assert rows["n1"]["address"] in row_n1
    locked_cell = "NO" if rows["n2"]["locked_bytes"] == 0 else format_bytes(rows["n2"]["locked_bytes"])
    assert locked_cell in row_n2.split("  "), row_n2
    q0, q1 = planned["n2"]["q_heads"]
    f0, f1 = planned["n2"]["ffn_rows"]
    assert f"heads [{q0},{q1}) ffn [{f0},{f1})" in row_n2                  # the plan's notation
    table_row = next(ln for ln in lines if ln.startswith("n2 ") and f"[{q0},{q1})" in ln
                     and ln is not row_n2)
    assert f"[{f0},{f1})" in table_row                                      # the plan table beside it


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_status_wait_in_a_terminal_draws_the_rows_in_place(tmp_path, model):
    pair = Pair(tmp_path, model)
    session = f"dlload{os.getpid()}"
    try:
        pair.wait_socket("n1")
        command = (f"{CTL} status --wait --wait-timeout 90 --socket {pair.sock['n1']}; "
                   "echo STATUS-EXIT=$?; sleep 60")
        subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", "200", "-y", "60",
                        "env", f"PATH={os.environ['PATH']}", "TERM=xterm", "LANG=C.UTF-8",
                        "sh", "-c", command], check=True)
        deadline, text = time.monotonic() + 100, ""
        while time.monotonic() < deadline and "STATUS-EXIT=" not in text:
            time.sleep(0.2)
            text = subprocess.run([TMUX, "capture-pane", "-p", "-J", "-S", "-300", "-t",
                                   session], capture_output=True, text=True).stdout
        assert "STATUS-EXIT=0" in text, text + pair.logs()
        screen = text.splitlines()
        for node, role in (("n1", "root"), ("n2", "worker")):
            drawn = [ln for ln in screen if ln.startswith(f"{node}    {role}") and "%" in ln]
            assert len(drawn) == 1, text           # redrawn in place, not printed again
            assert "loaded" in drawn[0] and "100%" in drawn[0], drawn
        assert "this node  n1 (serving)" in text and "slices loaded (load " in text
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], capture_output=True)
        pair.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare: the worker gets a mount namespace in "
                           "which the root's model file is hidden")
def test_a_streamed_slice_shows_streaming_then_loaded(tmp_path, model):
    hide = os.path.dirname(model)
    # the worker's own view of the file system: the model's folder covered by an empty
    # tmpfs, so it cannot read the root's file and the root streams its slice
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs dllama-hide "$0" && exec "$@"', hide]
    state = tmp_path / "state-n2"
    pair = Pair(tmp_path, model, worker_prefix=wrapper, worker_model=False)
    try:
        r, status = pair.status_wait("n2")
        rows = _check_final(status)
        assert rows["n2"]["phase"] == "loaded"
        seen = [ln.split()[2] for ln in r.stderr.splitlines() if ln.startswith("n2 ")]
        assert seen[-1] == "loaded", r.stderr
        assert rows["n2"]["detail"] == "streamed from the root", rows["n2"]
        assert rows["n1"]["detail"] == "from its model file", rows["n1"]
        # it really streamed: the slice is in the worker's slice cache
        cached = list((state / "slices").glob("*")) if (state / "slices").exists() else []
        assert cached, pair.logs()
    finally:
        pair.close()
