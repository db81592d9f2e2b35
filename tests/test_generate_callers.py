"""One request, three callers of engine/generate_text.py: dllama-ctl generate on this
machine, the daemon's generate op and the HTTP API the daemon serves give the same text,
tokens and finish reason for the demo model at temperature 0."""
from __future__ import annotations

import json
import os
import urllib.request

import pytest
from click.testing import CliRunner

from dllama_node.ctl.cli import cli

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo",
                    "stories.gguf")
PROMPT = "Once upon a time"
# (max_tokens, stop strings, the finish reason every caller must give)
REQUESTS = [(24, [], "length"), (64, [" tree"], "stop"), (200, [], "stop")]


def local_generate(max_tokens, stop):
    args = ["generate", "--model", DEMO, "--threads", "1", "--temperature", "0", "--json",
            "--prompt", PROMPT, "--max-tokens", str(max_tokens)]
    for s in stop:
        args += ["--stop", s]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def api_completion(port, max_tokens, stop):
    body = json.dumps({"model": "stories", "prompt": PROMPT, "temperature": 0,
                       "max_tokens": max_tokens, "stop": stop}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from dllama_node.cluster.auth import generate_key, write_key
    from tests.test_daemon_service import _free_port, _wait_status, start_solo_node

    tmp = tmp_path_factory.mktemp("solo")
    key = str(tmp / "cluster.key")
    write_key(key, generate_key())
    ctl = str(tmp / "ctl.sock")
    port = _free_port()
    proc = start_solo_node(tmp, DEMO, key, ctl, "--http-listen", f"127.0.0.1:{port}")
    try:
        _wait_status(ctl, lambda s: isinstance(s, dict) and s["state"] == "serving")
        yield ctl, port
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize("max_tokens, stop, reason", REQUESTS)
def test_three_callers_give_the_same_text_and_finish_reason(daemon, max_tokens, stop, reason):
    from dllama_node.daemon.control import request

    ctl, port = daemon
    local = local_generate(max_tokens, stop)
    lines = list(request(ctl, {"op": "generate", "prompt": PROMPT, "temperature": 0,
                               "max_tokens": max_tokens, "stop": stop}))
    op = lines[-1]
    assert "".join(line.get("text") or "" for line in lines[:-1]) == op["text"]
    api = api_completion(port, max_tokens, stop)
    choice = api["choices"][0]

    assert local["text"] == op["text"] == choice["text"] and local["text"]
    assert local["finish_reason"] == op["finish_reason"] == choice["finish_reason"] == reason
    assert local["tokens"] == op["tokens"]
    assert len(local["tokens"]) == api["usage"]["completion_tokens"]
    assert local["limit"] == op["limit"] == ("max_tokens" if reason == "length" else None)
    if stop:
        assert stop[0] not in local["text"]
