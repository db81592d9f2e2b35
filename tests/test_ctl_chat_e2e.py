"""End to end: `dllama-ctl chat` in a real terminal (tmux) against a real dllama-node
started as tests/test_daemon_service.py starts it. Needs the daemon's generate op with
"messages" (the "control ops" change); skipped with that reason until the daemon has it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from dllama_node.cluster.auth import generate_key, write_key
from dllama_node.daemon.control import request
from dllama_node.model.generate import PRESETS, write_random_model
from tests.test_daemon_service import _wait_status, start_solo_node

CTL = os.path.join(os.path.dirname(sys.executable), "dllama-ctl")
TMUX = shutil.which("tmux")

pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")


def _pane(session: str) -> str:
    return subprocess.run([TMUX, "capture-pane", "-p", "-J", "-S", "-200", "-t", session],
                          capture_output=True, text=True).stdout


def _wait_pane(session: str, pred, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = _pane(session)
        if pred(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"the terminal never showed what was expected:\n{text}")


def _keys(session: str, *keys: str) -> None:
    subprocess.run([TMUX, "send-keys", "-t", session, *keys], check=True)


def test_chat_in_a_terminal_against_a_real_daemon(tmp_path):
    model = str(tmp_path / "tiny.gguf")
    write_random_model(model, PRESETS["tiny"], weight_type="q8_0", seed=4)
    key = str(tmp_path / "cluster.key")
    write_key(key, generate_key())
    folder = tmp_path / "s"
    folder.mkdir()
    ctl_sock = str(folder / "ctl.sock")
    proc = start_solo_node(tmp_path, model, key, ctl_sock)
    session = f"dlctl{os.getpid()}"
    try:
        _wait_status(ctl_sock, lambda s: isinstance(s, dict) and s["state"] == "serving")
        question = [{"role": "user", "content": "hello there"}]
        probe = list(request(ctl_sock, {"op": "generate", "messages": question,
                                        "max_tokens": 6, "temperature": 0}))[-1]
        if "finish_reason" not in probe:              # the daemon before the control ops change
            pytest.skip(f"waits for the daemon's generate op with messages: {probe}")
        expected = probe["text"]

        env = {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state-home"),
               "PATH": os.environ["PATH"], "TERM": "xterm", "LANG": "C.UTF-8"}
        # the shell traps SIGINT (a handler, not "ignore": the chat gets the default back
        # at exec) so that Ctrl-C reaches the chat without ending the shell around it
        command = (f"trap 'true' INT; {CTL} chat --socket {ctl_sock} --temperature 0 -n 6; "
                   f"echo CHAT-EXIT=$?; sleep 60")
        subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
                        "env", *[f"{k}={v}" for k, v in env.items()], "sh", "-c", command],
                       check=True)
        _wait_pane(session, lambda t: "/help lists the commands" in t)
        _keys(session, "hello there", "Enter")
        first_piece = next((w for w in expected.split() if w.isprintable()), "")
        text = _wait_pane(session, lambda t: t.count("> ") >= 2 and first_piece in t, 20)
        assert "hello there" in text

        _keys(session, "C-c")                                # at the prompt: session stays
        _wait_pane(session, lambda t: "Ctrl-D or /exit leaves" in t)
        _keys(session, "/reset", "Enter")
        _wait_pane(session, lambda t: "conversation forgotten" in t)
        _keys(session, "/exit", "Enter")
        text = _wait_pane(session, lambda t: "CHAT-EXIT=" in t)
        assert "CHAT-EXIT=0" in text
        history = tmp_path / "state-home" / "dllama-node" / "history"
        assert "hello there" in history.read_text()
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], capture_output=True)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
