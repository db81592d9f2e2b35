"""A real dllama-node process on loopback: it reports to a real notify socket, elects
itself, plans, serves generate and status on its control socket, and stops cleanly on
SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


from dllama_node.cluster.auth import generate_key, write_key
from dllama_node.daemon.control import request
from dllama_node.engine.forward import Transformer
from dllama_node.engine.generate import Session
from dllama_node.engine.load import load_weights
from dllama_node.engine.sampler import Sampler, SamplerSettings
from dllama_node.model import open_model
from dllama_node.model.generate import PRESETS, write_random_model

NODE = os.path.join(os.path.dirname(sys.executable), "dllama-node")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_status(sock_path, pred, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = list(request(sock_path, {"op": "status"}, timeout_s=5))[-1]
            if pred(last):
                return last
        except Exception as e:   # not listening yet
            last = repr(e)
        time.sleep(0.2)
    raise AssertionError(f"status never matched; last: {last}")


def start_solo_node(tmp_path, model, key, ctl, *args, env=None) -> subprocess.Popen:
    """A one-node cluster: dllama-node with `model` on loopback, its control socket at
    `ctl`, its log in tmp_path/node.log; f32 on the wire unless env says otherwise."""
    return subprocess.Popen([NODE, "--config", str(tmp_path / "none.conf"), "--node-id", "solo",
                             "--model", model, "--listen", f"127.0.0.1:{_free_port()}",
                             "--interface", "127.0.0.1", "--control-socket", ctl,
                             "--state-dir", str(tmp_path / "state"), "--key-file", key, *args],
                            env=dict(os.environ, DLLAMA_WIRE="f32", **(env or {})),
                            stderr=open(tmp_path / "node.log", "w"))


def test_single_daemon_serves_and_stops_cleanly(tmp_path):
    model = str(tmp_path / "tiny.gguf")
    write_random_model(model, PRESETS["tiny"], weight_type="q8_0", seed=4)
    key = str(tmp_path / "cluster.key")
    write_key(key, generate_key())
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = str(tmp_path / "notify")
    notify.bind(notify_path)
    notify.settimeout(0.2)
    messages = []
    import threading
    done = threading.Event()

    def drain():                      # a manager reads its notify socket all the time
        while not done.is_set():
            try:
                messages.append(notify.recv(4096).decode())
            except socket.timeout:
                pass
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    ctl = str(tmp_path / "ctl.sock")
    http_port = _free_port()
    proc = start_solo_node(tmp_path, model, key, ctl, "--http-listen", f"127.0.0.1:{http_port}",
                           env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "2000000",
                                "WATCHDOG_PID": ""})
    try:
        status = _wait_status(ctl, lambda s: isinstance(s, dict) and s["state"] == "serving")
        assert status["root_id"] == "solo" and status["term"] >= 1
        assert status["plan"]["nodes"][0]["node_id"] == "solo"
        answer = list(request(ctl, {"op": "generate", "prompt_tokens": [1, 5, 9, 200],
                                    "max_tokens": 12, "temperature": 0}))
        final = answer[-1]
        assert final["done"] and len(final["tokens"]) == 12
        assert [a["token"] for a in answer[:-1]] == final["tokens"]      # streamed one by one
        with open_model(model) as m:
            s = Session(Transformer(load_weights(m), 512, 1, 64))
            expected = list(s.generate([1, 5, 9, 200], 12, Sampler(SamplerSettings(temperature=0))))
        assert final["tokens"] == expected
        # the OpenAI-compatible API on the daemon, with the openai package as the client
        import openai
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        done_text = client.completions.create(model="tiny", prompt=final["text"][:0] or "a",
                                              max_tokens=5, temperature=0)
        assert done_text.usage.completion_tokens == 5
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
            temperature=0, stream=True)]
        plain = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                               "content": "hi"}], max_tokens=6, temperature=0)
        assert "".join(pieces) == plain.choices[0].message.content
        bad = list(request(ctl, {"op": "nonsense"}))[-1]
        assert bad["exit_code"] == 2 and "bad request" in bad["error"]
        bad = list(request(ctl, {"op": "generate", "prompt_tokens": [1, 5],
                                 "temperature": "hot"}))[-1]
        assert bad["exit_code"] == 2 and "hot" in bad["error"]
        bad = list(request(ctl, {"op": "generate", "prompt_tokens": [1, 5],
                                 "temperature": -1}))[-1]
        assert bad["exit_code"] == 2 and "temperature -1" in bad["error"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    time.sleep(0.3)
    done.set()
    reader.join()
    text = "\n".join(messages)
    assert "READY=1" in text and "STATUS=serving" in text and "WATCHDOG=1" in text
    assert "STOPPING=1" in text
    assert not os.path.exists(ctl)            # the control socket is removed on stop


def test_stopping_the_service_cancels_and_awaits_its_tasks(tmp_path, monkeypatch):
    """In process: a peer's key probe that never answers is still running when the service
    stops; stopping cancels it and waits for it, and no task of the service is left."""
    import asyncio

    from dllama_node.daemon import service as service_module
    from dllama_node.daemon.config import DaemonConfig
    from dllama_node.discovery.txt import NodeAdvert

    key = str(tmp_path / "cluster.key")
    write_key(key, generate_key())
    config = DaemonConfig(node_id="solo", listen=f"127.0.0.1:{_free_port()}",
                          control_socket=str(tmp_path / "ctl.sock"),
                          state_dir=str(tmp_path / "state"), key_file=key, mdns=False,
                          interfaces=("127.0.0.1",), http_listen="off", lock_memory=False,
                          nice=0)
    peer = NodeAdvert(node_id="silent", cluster="default", port=1, heartbeat_port=1,
                      address="127.0.0.1", control_port=1, instance="feed")
    probing = []

    async def never_answers(*args, **kw):
        probing.append(asyncio.current_task())
        await asyncio.Event().wait()

    monkeypatch.setattr(service_module, "forward", never_answers)
    monkeypatch.setattr(service_module, "SETTLE_S", 0.0)

    async def until(condition, timeout_s=30.0):
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.02)

    async def scenario():
        node = service_module.NodeService(config)
        run = asyncio.create_task(node.run())
        await until(lambda: node.discovery is not None)
        node.discovery.peers = lambda: [peer]
        await until(lambda: probing)
        assert probing[0] in node.tasks and probing[0].get_name() == "probe silent"
        node.stopping.set()
        await asyncio.wait_for(run, 30)
        assert probing[0].cancelled()
        assert node.tasks == set()
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(scenario())
