"""The HTTP server at the byte level: errors, authentication, the queue, cancellation."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from dllama_node.api.backend import EngineBackend
from dllama_node.api.server import ApiConfig, ApiServer, needs_auth, serve_in_thread
from dllama_node.common.errors import UsageError
from dllama_node.cluster.runners import SingleRunner
from dllama_node.engine.node import LocalNode
from dllama_node.model.generate import PRESETS, write_random_model

KEY = bytes(range(32))
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0}


class SlowRunner:
    """A real runner whose tokens come delay_s apart; counts what the engine produced."""

    def __init__(self, runner, delay_s: float):
        self._runner, self.delay_s = runner, delay_s
        self.produced = 0          # tokens the engine made, over all generations
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def generate(self, *args, **kw):
        self.calls += 1
        gen = self._runner.generate(*args, **kw)
        try:
            for token in gen:
                self.produced += 1
                time.sleep(self.delay_s)
                yield token
        finally:
            gen.close()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "tiny.gguf")
    write_random_model(path, PRESETS["tiny"], weight_type="q4_0", seed=5)
    return path


@pytest.fixture(scope="module")
def runner(model_path):
    node = LocalNode.open(model_path, threads=1)
    yield SingleRunner(node)
    node.close()


@pytest.fixture(scope="module")
def server(runner):
    with serve_in_thread(EngineBackend(runner, "tiny"), ApiConfig(port=0)) as srv:
        yield srv


def request(srv, method, path, body=None, headers=None, raw=None):
    """(status, headers dict, body bytes) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


def raw_socket(srv, body: dict, path="/v1/chat/completions") -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def wait_for(predicate, timeout_s=10.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# ---- errors ---------------------------------------------------------------------------------
def test_bad_json_and_missing_fields(server):
    status, _, body = request(server, "POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in error_of(body)["message"]
    status, _, body = request(server, "POST", "/v1/chat/completions", body={"model": "x"})
    assert status == 400 and error_of(body)["param"] == "messages"
    status, _, body = request(server, "POST", "/v1/completions", body={"max_tokens": 3})
    assert status == 400 and error_of(body)["param"] == "prompt"
    status, _, body = request(server, "POST", "/v1/chat/completions", body=[1, 2])
    assert status == 400 and "JSON object" in error_of(body)["message"]


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", "hot"),
                                         ("top_p", 1.01), ("max_tokens", -5),
                                         ("max_tokens", 10 ** 9), ("max_tokens", 2.5),
                                         ("stop", ["a", "b", "c", "d", "e"]),
                                         ("frequency_penalty", 0.5), ("stream", "yes")])
def test_out_of_range_values_name_field_and_value(server, field, value):
    status, _, body = request(server, "POST", "/v1/chat/completions", body={**CHAT, field: value})
    err = error_of(body)
    assert status == 400 and err["param"] == field, err
    assert field in err["message"] and err["type"] == "invalid_request_error"


def test_unknown_path_404_wrong_method_405(server):
    status, _, body = request(server, "GET", "/v2/everything")
    assert status == 404 and "/v2/everything" in error_of(body)["message"]
    status, headers, _ = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "POST"
    status, headers, _ = request(server, "POST", "/health", body={})
    assert status == 405 and headers["allow"] == "GET"


def test_malformed_http_and_oversized_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"HELLO\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        for _ in range(3):
            conn.request("POST", "/v1/completions",
                         body=json.dumps({"prompt": "ab", "max_tokens": 2, "temperature": 0}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] <= 2
    finally:
        conn.close()


# ---- authentication ---------------------------------------------------------------------------
def test_needs_auth_off_loopback_only():
    assert not needs_auth("127.0.0.1") and not needs_auth("::1") and not needs_auth("localhost")
    assert not needs_auth("127.3.2.1")
    assert needs_auth("0.0.0.0") and needs_auth("10.213.7.1") and needs_auth("::")
    assert needs_auth("board1.local")
    with pytest.raises(UsageError, match="key"):
        ApiServer(EngineBackend(lambda: None, "m"), ApiConfig(host="0.0.0.0", port=0))


def test_bearer_token_required_when_auth_is_on(runner):
    config = ApiConfig(port=0, key=KEY, require_auth=True)
    with serve_in_thread(EngineBackend(runner, "tiny"), config) as srv:
        status, headers, body = request(srv, "GET", "/health")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert error_of(body)["code"] == "invalid_api_key"
        wrong = KEY[:-1] + b"\x00"
        bad = {"Authorization": f"Bearer {wrong.hex()}"}
        assert request(srv, "GET", "/health", headers=bad)[0] == 401
        assert request(srv, "GET", "/nowhere")[0] == 401          # before routing
        good = {"Authorization": f"Bearer {KEY.hex()}"}
        assert request(srv, "GET", "/health", headers=good)[0] == 200
        upper = {"Authorization": f"bearer {KEY.hex().upper()}"}
        status, _, body = request(srv, "POST", "/v1/completions", headers=upper,
                                  body={"prompt": "hi", "max_tokens": 2})
        assert status == 200 and json.loads(body)["object"] == "text_completion"


# ---- not serving, health, metrics -----------------------------------------------------------
def test_health_and_completions_while_not_serving():
    backend = EngineBackend(lambda: None, "m", state=lambda: "planning")
    with serve_in_thread(backend, ApiConfig(port=0)) as srv:
        status, _, body = request(srv, "GET", "/health")
        assert status == 503 and json.loads(body) == {"status": "planning"}
        status, headers, body = request(srv, "POST", "/v1/chat/completions", body=CHAT)
        assert status == 503 and headers["retry-after"].isdigit()
        assert error_of(body)["code"] == "not_serving" and "planning" in error_of(body)["message"]
        assert request(srv, "GET", "/v1/models")[0] == 200
        assert request(srv, "GET", "/metrics")[0] == 200


SAMPLE = re.compile(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+|NaN)$')


def parse_metrics(text: str) -> dict:
    """Prometheus text format, strictly: every line a comment or a sample; types declared."""
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        assert m.group(1) in typed, f"{m.group(1)} sampled before its TYPE"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_metrics_text_format_and_counters(server):
    before = parse_metrics(request(server, "GET", "/metrics")[2].decode())
    status, _, body = request(server, "POST", "/v1/completions",
                              body={"prompt": "Once", "max_tokens": 5, "temperature": 0})
    usage = json.loads(body)["usage"]
    status, headers, body = request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    after = parse_metrics(body.decode())
    key = 'dllama_requests_total{endpoint="/v1/completions",code="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert (after["dllama_completion_tokens_total"] - before["dllama_completion_tokens_total"]
            == usage["completion_tokens"])
    assert after['dllama_memory_bytes{node="local",kind="weights"}'] > 1e6
    assert after['dllama_memory_bytes{node="local",kind="kv_cache"}'] > 0
    assert after["dllama_tokens_per_second"] > 0
    assert 'dllama_sync_ms{node="local"}' in after


# ---- the queue and cancellation ------------------------------------------------------------
def test_disconnect_while_generating_stops_the_engine(runner):
    slow = SlowRunner(runner, delay_s=0.01)
    backend = EngineBackend(slow, "tiny")
    with serve_in_thread(backend, ApiConfig(port=0)) as srv:
        for stream in (False, True):
            start = slow.produced
            s = raw_socket(srv, {**CHAT, "max_tokens": 400, "stream": stream})
            wait_for(lambda: slow.produced - start >= 5, what="tokens")
            if stream:
                assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            s.close()
            wait_for(lambda: not srv.queue.generating, timeout_s=2, what="the engine to stop")
            stopped_at = slow.produced
            assert stopped_at - start < 100       # 400 would take 4 s
            t0 = time.monotonic()
            status, _, body = request(srv, "POST", "/v1/completions",
                                      body={"prompt": "x", "max_tokens": 3, "temperature": 0})
            assert status == 200 and time.monotonic() - t0 < 1.0
            produced_next = json.loads(body)["usage"]["completion_tokens"]
            time.sleep(0.1)
            assert slow.produced == stopped_at + produced_next   # nothing more for the dead one
        assert srv.counters.cancelled == 2


def test_full_queue_503_and_waiting_client_that_leaves(runner):
    slow = SlowRunner(runner, delay_s=0.01)
    with serve_in_thread(EngineBackend(slow, "tiny"), ApiConfig(port=0, queue_size=1)) as srv:
        running = raw_socket(srv, {**CHAT, "max_tokens": 300})
        wait_for(lambda: srv.queue.generating, what="the first generation")
        waiting = raw_socket(srv, {**CHAT, "max_tokens": 2})
        wait_for(lambda: srv.queue.waiting == 1, what="a waiting request")
        status, headers, body = request(srv, "POST", "/v1/chat/completions", body=CHAT)
        assert status == 503 and int(headers["retry-after"]) > 0
        assert error_of(body)["code"] == "queue_full"
        waiting.close()                           # leaves before its turn
        wait_for(lambda: srv.queue.waiting == 0, timeout_s=2, what="the waiter to leave")
        calls = slow.calls
        running.close()
        wait_for(lambda: not srv.queue.generating, timeout_s=2, what="the engine to stop")
        time.sleep(0.1)
        assert slow.calls == calls == 1           # the one that left never generated
        assert srv.counters.cancelled == 2
        again = request(srv, "POST", "/v1/chat/completions", body={**CHAT, "max_tokens": 2})
        assert again[0] == 200


def test_queued_requests_are_served_in_turn(runner):
    slow = SlowRunner(runner, delay_s=0.002)
    results = []
    with serve_in_thread(EngineBackend(slow, "tiny"), ApiConfig(port=0, queue_size=8)) as srv:
        def one(i):
            status, _, body = request(srv, "POST", "/v1/completions",
                                      body={"prompt": f"p{i}", "max_tokens": 8, "temperature": 0})
            results.append((status, json.loads(body)["usage"]["completion_tokens"]))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert len(results) == 5 and all(status == 200 for status, _ in results)
    assert slow.calls == 5 and slow.produced == sum(n for _, n in results)


# ---- dllama-ctl serve ----------------------------------------------------------------------
def test_serve_command_prints_url_serves_and_stops_on_sigterm(model_path):
    code = "from dllama_node.ctl.serve_command import serve; serve()"
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", model_path, "--threads", "1",
                             "--listen", "127.0.0.1:0", "--model-id", "cli-tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url), (url, proc.stderr.read())
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "cli-tiny"
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stopping_the_server_cancels_running_and_waiting_generations(runner):
    slow = SlowRunner(runner, delay_s=0.01)
    backend = EngineBackend(slow, "tiny")
    with serve_in_thread(backend, ApiConfig(port=0)) as srv:
        running = raw_socket(srv, {**CHAT, "max_tokens": 400})
        wait_for(lambda: srv.queue.generating, what="a generation")
        waiting = raw_socket(srv, {**CHAT, "max_tokens": 400})
        wait_for(lambda: srv.queue.waiting == 1, what="a waiting request")
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 2.0
    stopped_at = slow.produced
    time.sleep(0.1)
    assert slow.produced == stopped_at < 200 and slow.calls == 1
    assert backend.lock.acquire(timeout=1)       # the engine is free
    backend.lock.release()
    running.close()
    waiting.close()


class FailingRunner(SlowRunner):
    """Fails like a cluster whose worker vanished, after `after` tokens."""

    def __init__(self, runner, after: int):
        super().__init__(runner, 0.0)
        self.after = after

    def generate(self, *args, **kw):
        from dllama_node.common.errors import ClusterError

        for i, token in enumerate(super().generate(*args, **kw)):
            if i == self.after:
                raise ClusterError("node n1 vanished at position 7, layer 2")
            yield token


def test_engine_failure_is_503_before_the_answer_and_an_error_event_in_a_stream(runner):
    with serve_in_thread(EngineBackend(FailingRunner(runner, 3), "tiny"),
                         ApiConfig(port=0)) as srv:
        status, headers, body = request(srv, "POST", "/v1/chat/completions",
                                        body={**CHAT, "max_tokens": 20})
        assert status == 503 and "retry-after" in headers
        assert error_of(body)["code"] == "generation_failed" and "n1" in error_of(body)["message"]
        status, _, body = request(srv, "POST", "/v1/chat/completions",
                                  body={**CHAT, "max_tokens": 20, "stream": True})
        events = [line[len(b"data: "):] for line in body.split(b"\n\n") if line]
        assert status == 200 and b"[DONE]" not in events
        assert json.loads(events[-1])["error"]["code"] == "generation_failed"
        assert sum("choices" in json.loads(e) for e in events) >= 2   # role + text before it
        assert request(srv, "GET", "/health")[0] == 200
