"""The cluster with real processes over loopback TCP: equal results to one node over the
mesh (the star, bench/compare_sync.py's baseline, is tested in tests/test_bench_star.py),
and the faults -- a worker killed mid-generation, a root that vanishes, a peer that speaks
garbage or another protocol version."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dllama_node.cluster.auth import AuthenticationError, generate_key, read_key, write_key
from dllama_node.cluster.local import LocalCluster, spawn_worker
from dllama_node.cluster.planning import local_capacities
from dllama_node.cluster.protocol import HEADER, MAGIC, Kind
from dllama_node.cluster.root import ClusterRoot, WorkerAddress
from dllama_node.cluster.run_options import RunOptions
from dllama_node.cluster.sync_tcp import NodeFailure, RootMeshSync
from dllama_node.engine.forward import Transformer
from dllama_node.engine.generate import Session
from dllama_node.engine.load import load_weights
from dllama_node.engine.sampler import Sampler, SamplerSettings
from dllama_node.model import open_model
from tests import hf_models

PROMPT = [1, 17, 203, 99, 5, 42, 77, 150, 8, 260, 31]
GREEDY = Sampler(SamplerSettings(temperature=0))
SEQ = 128


def run_options(model_path: str, **changes) -> RunOptions:
    """The options of the runs here: f32 on the wire (exact sums), a SEQ context, batch 16,
    token ids only; `changes` on top."""
    return RunOptions(model_path, **{"wire": "f32", "max_seq_len": SEQ, "batch": 16,
                                     "load_tokenizer": False, **changes})


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("key") / "cluster.key")
    write_key(path, generate_key())
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    shape = hf_models.SHAPES[1]            # 6 query heads over 2 KV heads, hidden 224
    path = str(tmp_path_factory.mktemp("tcp") / "gqa.gguf")
    hf_models.write_gguf(hf_models.make_hf_llama(shape, seed=7), shape, path, "f32")
    return path


@pytest.fixture(scope="module")
def single(model_path):
    with open_model(model_path) as m:
        s = Session(Transformer(load_weights(m), SEQ, 1, 16))
        logits = s._eval_prompt(PROMPT).copy()
        tokens = list(Session(Transformer(load_weights(m), SEQ, 1, 16)).generate(PROMPT, 64, GREEDY))
    return logits, tokens


@pytest.mark.parametrize("n_nodes, split", [(2, None), (3, None), (4, None), (5, None),
                                            (3, (4, 1, 2))])
def test_n_processes_equal_one_node(model_path, single, n_nodes, split):
    ref_logits, ref_tokens = single
    with LocalCluster(run_options(model_path, nodes=n_nodes, split=split)) as root:
        root.start()
        assert len(root.reports) == n_nodes
        tokens = list(root.generate(PROMPT, 64, GREEDY))
        logits = root.session._eval_prompt(PROMPT).copy()
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()


def test_q8_0_wire_logits_within_tolerance(model_path, single):
    ref_logits, _ = single
    with LocalCluster(run_options(model_path, nodes=3, wire="q8_0")) as root:
        root.start()
        assert isinstance(root.sync, RootMeshSync)          # the default
        logits = root.session._eval_prompt(PROMPT).copy()
        st = root.sync.stats
        # 2 workers, dim 96 = 3 q8_0 blocks of 34 bytes per token per all-reduce each way
        assert st.bytes_received >= 2 * 2 * 2 * len(PROMPT) * 3 * 34
        per_node = root.node_stats()
        assert len(per_node) == 3 and all(d["steps"] == st.steps for d in per_node.values())
    assert np.abs(logits - ref_logits).max() < 0.05 * np.abs(ref_logits).max()


def test_worker_killed_mid_generation_is_named_and_the_root_recovers(model_path, single):
    _, ref_tokens = single
    with LocalCluster(run_options(model_path, nodes=3)) as root:
        root.start()
        victim = root.peers[1]
        gen = root.generate(PROMPT, 64, GREEDY)
        got = [next(gen) for _ in range(5)]
        t0 = time.monotonic()
        victim.process.send_signal(signal.SIGKILL)
        with pytest.raises(NodeFailure) as failure:
            for _ in gen:
                pass
        elapsed = time.monotonic() - t0
        message = str(failure.value)
        assert elapsed < 2.0, elapsed
        assert failure.value.node_id == victim.node_id
        assert f"node {victim.node_id}" in message and "SIGKILL" in message
        assert "position" in message and ("layer" in message or "logits" in message)
        assert got == ref_tokens[:5]
        # the root stays up: re-planned over the two nodes left, it serves again
        assert not root.ready
        root.recover()
        assert len(root.reports) == 2
        assert list(root.generate(PROMPT, 64, GREEDY)) == ref_tokens


def test_worker_survives_a_vanished_root_and_serves_the_next(model_path, single, key_file):
    _, ref_tokens = single
    key = read_key(key_file)
    proc, host, port = spawn_worker("w1", key_file, timeout_s=5)
    try:
        caps = local_capacities(2)
        address = WorkerAddress(host, port, caps[1], proc)
        first = ClusterRoot(run_options(model_path), caps[0], [address], key=key)
        first.start()
        gen = first.generate(PROMPT, 64, GREEDY)
        next(gen)
        for p in first.peers:           # the root vanishes mid-step: no BYE
            p.conn.sock.shutdown(socket.SHUT_RDWR)
            p.conn.close()
        first.model.close()
        second = ClusterRoot(run_options(model_path), caps[0], [address], key=key)
        try:
            second.start()
            assert list(second.generate(PROMPT, 64, GREEDY)) == ref_tokens
        finally:
            second.close()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def _worker_with_log(tmp_path, key_file):
    log = open(tmp_path / "worker.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "dllama_node.cluster.worker", "--listen",
                             "127.0.0.1:0", "--node-id", "w9", "--timeout", "2",
                             "--key-file", key_file],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    host, _, port = proc.stdout.readline().split()[1].rpartition(":")
    return proc, host, int(port), tmp_path / "worker.log"


def _hung_up(s: socket.socket) -> bool:
    """The worker closed the connection (a reset when our bytes were left unread)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def _wait_for(path, words, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text()
        if all(w in text for w in words):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{words} not logged; log: {path.read_text()!r}")


def test_garbage_other_versions_and_wrong_keys_are_refused(model_path, single, tmp_path,
                                                           key_file):
    _, ref_tokens = single
    proc, host, port, log = _worker_with_log(tmp_path, key_file)
    try:
        with socket.create_connection((host, port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _hung_up(s)
        _wait_for(log, ["refused peer", "does not speak the dllama protocol"])
        with socket.create_connection((host, port)) as s:
            s.sendall(HEADER.pack(MAGIC, 1, int(Kind.HELLO), 2) + b"{}")
            assert _hung_up(s)
        _wait_for(log, ["refused peer", "protocol version 1"])
        # a root without the cluster key learns nothing and is refused
        caps = local_capacities(2)
        address = WorkerAddress(host, port, caps[1], proc)
        impostor = ClusterRoot(run_options(model_path), caps[0], [address], key=generate_key())
        with pytest.raises(AuthenticationError, match="cluster key mismatch"):
            impostor.start()
        impostor.close()
        _wait_for(log, ["refused peer", "did not prove it holds this cluster's key"])
        # and the worker still serves a proper root
        root = ClusterRoot(run_options(model_path), caps[0], [address], key=read_key(key_file))
        try:
            root.start()
            assert list(root.generate(PROMPT, 16, GREEDY)) == ref_tokens[:16]
        finally:
            root.close()
    finally:
        proc.kill()
        proc.wait()


def test_cli_generate_on_three_nodes_equals_one(tmp_path):
    from dllama_node.model.generate import PRESETS, write_random_model

    path = str(tmp_path / "tiny.gguf")
    write_random_model(path, PRESETS["tiny"], weight_type="q8_0", seed=2)
    ctl = os.path.join(os.path.dirname(sys.executable), "dllama-ctl")
    args = ["generate", "--model", path, "--prompt", "Once upon a time", "--max-tokens", "16",
            "--temperature", "0", "--json", "--wire", "f32"]
    one = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=120)
    three = subprocess.run([ctl, *args, "--nodes", "3", "--split", "2,1,1"], capture_output=True,
                           text=True, timeout=120)
    assert one.returncode == 0 and three.returncode == 0, three.stderr
    import json
    a, b = json.loads(one.stdout), json.loads(three.stdout)
    assert a["prompt_tokens"] == b["prompt_tokens"] and b["nodes"] == 3
    # random weights give flat logits: compare the first tokens, where near-ties are rare
    assert a["tokens"][:4] == b["tokens"][:4]


def test_workers_without_the_file_get_their_slices_streamed_then_cached(model_path, single,
                                                                         tmp_path):
    _, ref_tokens = single
    state = str(tmp_path / "state")
    for expected_source in ("stream", "cache"):
        with LocalCluster(run_options(model_path, nodes=3, stream_weights=True),
                          state_dir=state) as root:
            seen = []
            root.start(stream_progress=lambda node, done, total: seen.append((node, done, total)))
            workers = root.reports[1:]
            assert [r.source for r in workers] == [expected_source] * 2
            if expected_source == "stream":
                assert all(r.streamed_bytes >= r.weights_bytes > 0 for r in workers)
                assert seen and seen[-1][1] == seen[-1][2]
            else:
                assert all(r.streamed_bytes == 0 for r in workers) and not seen
            assert list(root.generate(PROMPT, 64, GREEDY)) == ref_tokens
