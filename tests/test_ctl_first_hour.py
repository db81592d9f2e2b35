"""A newcomer's first hour with dllama-ctl: each friction found by running the real
command (CliRunner over the real code, or the console script in a subprocess or a
pseudo-terminal) and checked on what a person sees: one line, a named exit code."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

from dllama_node.common import errors
from dllama_node.ctl.cli import cli
from dllama_node.model.generate import PRESETS
from tests.test_cli import (CTL, assert_one_line_error, run_ctl,  # noqa: F401 - tiny: a fixture
                            tiny)


ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")      # readline's terminal controls


def on_terminal(args, keys: bytes = b"", after: str = "", tmp_path=None, timeout_s=60.0):
    """Run the console script on a pseudo-terminal (its stdin, stdout and stderr), type
    `keys` once the terminal shows `after`; -> (exit code, what the terminal showed)."""
    env = dict(os.environ, TERM="dumb")
    if tmp_path is not None:
        env.update(HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))
    master, slave = pty.openpty()
    proc = subprocess.Popen([CTL, *args], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    shown, typed = b"", not keys
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout_s} s; the terminal "
                                     f"showed:\n{shown.decode(errors='replace')}")
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:                  # EIO: the last end of the terminal closed
                    break
                if not chunk:
                    break
                shown += chunk
            if not typed and after.encode() in shown:
                os.write(master, keys)
                typed = True
        return proc.wait(timeout=10), ESCAPES.sub("", shown.decode(errors="replace"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# ---- info: tensor types by name ---------------------------------------------------------
def test_info_json_names_the_tensor_types(tiny):
    r = CliRunner().invoke(cli, ["info", "--model", tiny, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert set(d["bytes_by_type"]) == {"F32", "Q4_0"}
    assert d["bytes_by_type"]["Q4_0"] > d["bytes_by_type"]["F32"] > 0
    assert sum(d["tensors_by_type"].values()) == d["tensors"]
    cfg = PRESETS["tiny"]
    assert d["bytes_by_type"]["F32"] == 4 * cfg.dim * (2 * cfg.n_layers + 1)   # the norms


def test_info_text_shows_an_aligned_table_of_types(tiny):
    r = CliRunner().invoke(cli, ["info", "--model", tiny])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split() == ["type", "tensors", "bytes"])
    rows = [l.split(None, 2) for l in lines[header + 1:header + 3]]
    assert [row[0] for row in rows] == ["F32", "Q4_0"]
    d = json.loads(CliRunner().invoke(cli, ["info", "--model", tiny, "--json"]).output)
    assert [int(row[1]) for row in rows] == [d["tensors_by_type"]["F32"],
                                             d["tensors_by_type"]["Q4_0"]]
    assert rows[1][2].endswith("MiB")
    ends = {len(l) for l in lines[header:header + 3]}
    assert len(ends) == 1, lines[header:header + 3]          # the byte column lines up


# ---- chat without the service: say that --model chats here -------------------------------
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_no_service_names_the_local_model_option(command, tmp_path):
    absent = str(tmp_path / "control.sock")
    r = run_ctl(command, "--socket", absent, "--wait-timeout", "0", stdin="hello")
    assert_one_line_error(r, errors.EXIT_CLUSTER, f"no control socket at {absent}",
                          f"dllama-ctl {command} --model FILE")


# ---- generate on a terminal with no prompt: a usage error, not a silent wait --------------
@pytest.mark.parametrize("where", ["service", "model"])
def test_generate_on_a_terminal_without_a_prompt_says_how_to_give_one(where, tiny, tmp_path):
    args = ["--model", tiny] if where == "model" else ["--socket", str(tmp_path / "absent")]
    code, shown = on_terminal(["generate", *args], timeout_s=30)
    lines = [line for line in shown.splitlines() if line.strip()]
    assert code == errors.EXIT_USAGE, shown
    assert len(lines) == 1, shown
    assert lines[0].startswith("dllama-ctl: error: no prompt: give it with --prompt TEXT")
    assert "as arguments" in lines[0] and "| dllama-ctl generate" in lines[0]


def test_generate_still_reads_a_piped_prompt(tiny):
    r = run_ctl("generate", "--model", tiny, "-n", "4", "--temperature", "0", "--json",
                stdin="Once upon a time")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["prompt_tokens"]) > 1


# ---- Ctrl-D at the chat prompt ends the line ---------------------------------------------
def test_ctrl_d_at_the_chat_prompt_leaves_the_terminal_on_a_new_line(tiny, tmp_path):
    code, shown = on_terminal(["chat", "--model", tiny], keys=b"\x04", after="> ",
                              tmp_path=tmp_path)
    assert code == 0, shown
    assert "Ctrl-D leaves" in shown
    assert shown.endswith("> \r\n"), repr(shown[-40:])      # the shell's prompt: a line of its own


# ---- serve: a port in use is one line; every request one access line ---------------------
def test_serve_on_a_port_in_use_says_so_in_one_line(tiny):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        r = run_ctl("serve", "--model", tiny, "--listen", address)
    assert r.stderr.count("\n") == 1, r.stderr           # before the model loads: no notes
    assert_one_line_error(r, errors.EXIT_USAGE, f"cannot listen on {address}: address "
                          "already in use", "choose another --listen")


def test_serve_logs_one_access_line_per_request(tiny):
    proc = subprocess.Popen([CTL, "serve", "--model", tiny, "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()             # http://127.0.0.1:PORT/v1
        assert url.endswith("/v1"), proc.stderr.read() if proc.poll() is not None else url
        question = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        answer = urllib.request.urlopen(urllib.request.Request(
            f"{url}/chat/completions", data=json.dumps(question).encode(),
            headers={"Content-Type": "application/json"}), timeout=60)
        assert answer.status == 200
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/nothing-here", timeout=10)
        assert missing.value.code == 404
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    access = re.compile(r'^127\.0\.0\.1:\d+ - "(\w+) (\S+) HTTP/1\.1" (\d{3}) \d+\.\d\d s$')
    lines = [m.groups() for m in map(access.match, stderr.splitlines()) if m]
    assert lines == [("POST", "/v1/chat/completions", "200"),
                     ("GET", "/v1/nothing-here", "404")], stderr


# ---- logs: no journal is an error; a journal without our entries says so -----------------
OTHER_UNIT_ENTRY = '{"MESSAGE": "sshd started", "PRIORITY": "6", "_HOSTNAME": "pi1"}'
FAKE_JOURNALCTL = {           # shell lines: what journalctl prints, filtered or not
    "no journal": ("", ""),
    "others only": ("case \" $* \" in *\" -u \"*|*MESSAGE_ID=*) exit 0;; esac; "
                    "echo '%s'" % OTHER_UNIT_ENTRY, ""),
    "not allowed": ("", "echo 'Hint: You are currently not seeing messages from other users "
                        "and the system.' >&2"),
}


def run_logs(tmp_path, journalctl, *args):
    """dllama-ctl logs with `journalctl` (a key of FAKE_JOURNALCTL, or None: not installed)
    the only journalctl on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if journalctl is not None:
        fake = bin_dir / "journalctl"
        fake.write_text("#!/bin/sh\n" + "\n".join(FAKE_JOURNALCTL[journalctl]) + "\n")
        fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:/nonexistent")
    return subprocess.run([CTL, "logs", *args], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.parametrize("journalctl, words", [
    (None, "journalctl not found"),
    ("no journal", "journalctl shows no entries at all"),
    ("not allowed", "join group systemd-journal"),
])
@pytest.mark.parametrize("follow", [[], ["-f"]])
def test_logs_without_a_journal_to_read_is_an_error(journalctl, words, follow, tmp_path):
    r = run_logs(tmp_path, journalctl, *follow)
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert_one_line_error(r, errors.EXIT_FAILURE, words)


@pytest.mark.parametrize("args, line", [
    ([], "no journal entries for dllama-node: has the service run on this machine? "
         "(systemctl status dllama-node)"),
    (["--oom", "--since", "-1d"], "no memory events in the journal since -1d"),
])
def test_logs_of_a_journal_without_our_entries_says_there_are_none(args, line, tmp_path):
    r = run_logs(tmp_path, "others only", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr == f"dllama-ctl: {line}\n"


def test_logs_of_an_empty_saved_journal_says_there_are_none(tmp_path):
    saved = tmp_path / "pi3.json"
    saved.write_text("")
    r = CliRunner().invoke(cli, ["logs", "--journal-file", str(saved)])
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr == f"dllama-ctl: no journal entries in {saved}\n"
