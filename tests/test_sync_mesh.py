"""The mesh all-reduce over real loopback sockets, N nodes as threads of one process:
every node ends with the same bits, equal to the fake's arithmetic (cluster/wire.py);
frames larger than the socket buffers do not deadlock; a closed link, a peer's ERROR and
a silent peer are named with the node, the layer and the phase."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dllama_node.cluster.protocol import HEADER, MAGIC, PROTOCOL_VERSION, Connection, Kind
from dllama_node.cluster.mesh import MeshExchange
from dllama_node.cluster.sync_tcp import NodeFailure, Peer, RootMeshSync, WorkerMeshSync
from dllama_node.cluster.wire import reduce_parts


@pytest.fixture(autouse=True, params=["kernel", "python"])
def step(request, monkeypatch):
    """Every test runs the exchange kernel and the Python step."""
    monkeypatch.setattr(MeshExchange, "USE_KERNEL", request.param == "kernel")
    return request.param


def _tcp_pair(timeout_s, buffer_bytes=None):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        if buffer_bytes:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    return Connection(a, "a", timeout_s), Connection(b, "b", timeout_s)


def _mesh_links(n_nodes, timeout_s=5.0, buffer_bytes=None):
    """links[i][j]: node i's Peer for node j (None on the diagonal)."""
    links = [[None] * n_nodes for _ in range(n_nodes)]
    for i in range(n_nodes):
        for j in range(i + 1, n_nodes):
            ci, cj = _tcp_pair(timeout_s, buffer_bytes)
            links[i][j], links[j][i] = Peer(f"n{j}", ci), Peer(f"n{i}", cj)
    return links


def _close(links):
    for row in links:
        for p in row:
            if p is not None:
                p.conn.close()


@pytest.mark.parametrize("n_nodes, n, dim, batch, wire", [
    (2, 1, 2048, 4, "q8_0"),
    (3, 2, 96, 4, "q8_0"),
    (5, 1, 64, 2, "f32"),
    # 1 MiB frames each way at once over 16 KiB socket buffers: sends go out in pieces
    # while the node receives (a blocking send would deadlock both sides)
    (3, 64, 4096, 64, "f32"),
    (2, 64, 4096, 64, "q8_0"),
])
def test_every_node_gets_the_same_bits_as_the_fake(n_nodes, n, dim, batch, wire, monkeypatch,
                                                   step):
    sends = []
    real_send = MeshExchange._send
    monkeypatch.setattr(MeshExchange, "_send", lambda self, i, peer, out, sent, what:
                        sends.append(sent) or real_send(self, i, peer, out, sent, what))
    links = _mesh_links(n_nodes, buffer_bytes=16384 if n == 64 else None)
    rng = np.random.default_rng(n_nodes * dim + n)
    rounds = [[rng.normal(size=(n, dim)).astype(np.float32) for _ in range(n_nodes)]
              for _ in range(3)]
    meshes = [MeshExchange(links[i], i, dim, batch, wire) for i in range(n_nodes)]
    if wire == "q8_0":              # the frames are what the plan counts (sync_mesh)
        from dllama_node.plan.accounting import MESH_FRAME_HEADER_BYTES, wire_row_bytes
        assert all(m.frames.nbytes == n_nodes * (MESH_FRAME_HEADER_BYTES
                                                 + batch * wire_row_bytes(dim)) for m in meshes)

    def node(i):
        out = []
        for parts in rounds:
            buf = parts[i].copy()
            meshes[i].all_reduce(buf, "layer 0 ffn")
            out.append(buf)
        return out

    try:
        with ThreadPoolExecutor(n_nodes) as pool:
            results = list(pool.map(node, range(n_nodes)))
    finally:
        _close(links)
    for r, parts in enumerate(rounds):
        expected = reduce_parts(parts, wire)
        for i in range(n_nodes):
            np.testing.assert_array_equal(results[i][r], expected, err_msg=f"node {i} round {r}")
    assert np.abs(expected - sum(rounds[-1])).max() < 0.05 * np.abs(expected).max()
    if n == 64 and step == "python":     # the frames did go out in pieces
        assert sum(1 for sent in sends if sent) > 3 * n_nodes


def _frame(kind, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), len(payload)) + payload


def test_a_closed_link_names_the_node_position_layer_and_phase():
    links = _mesh_links(3)
    try:
        root = RootMeshSync([links[0][1], links[0][2]], 64, 2, "q8_0")
        root.start_pos = 17
        links[2][0].conn.close()                 # node 2 dies before it sends
        # node 1 sends its part, so the root waits on node 2 alone
        links[1][0].conn.sock.sendall(_frame(Kind.PART, bytes(2 * 34)))
        with pytest.raises(NodeFailure) as failure:
            root.all_reduce(np.ones((1, 64), np.float32), 5, "attention")
        f = failure.value
        assert (f.node_id, f.position, f.layer, f.phase) == ("n2", 17, 5, "attention")
        assert "node n2 failed at position 17, layer 5 (attention)" in str(f)
        assert "connection closed" in str(f)
    finally:
        _close(links)


def test_a_worker_reporting_another_workers_failure_blames_that_node():
    links = _mesh_links(3)
    try:
        root = RootMeshSync([links[0][1], links[0][2]], 64, 2, "q8_0")
        report = json.dumps({"message": "connection closed while waiting for PART",
                             "failed_node": "n2"}).encode()
        links[1][0].conn.sock.sendall(_frame(Kind.ERROR, report))
        with pytest.raises(NodeFailure) as failure:
            root.all_reduce(np.ones((1, 64), np.float32), 3, "ffn")
        assert failure.value.node_id == "n2" and failure.value.layer == 3
        assert "reported by node n1" in str(failure.value)
    finally:
        _close(links)


def test_a_silent_peer_times_out_with_its_name():
    links = _mesh_links(2, timeout_s=0.3)
    try:
        worker = WorkerMeshSync(links[1], 1, 64, 2, "f32")
        worker.start_pos = 4
        t0 = time.monotonic()
        with pytest.raises(NodeFailure, match=r"node n0 failed at position 4, layer 1 "
                                              r"\(ffn\): no answer in 0.3 s") as failure:
            worker.all_reduce(np.ones((1, 64), np.float32), 1, "ffn")
        assert time.monotonic() - t0 < 2.0
        assert failure.value.node_id == "n0"
    finally:
        _close(links)


def test_a_part_of_the_wrong_size_is_a_protocol_error():
    links = _mesh_links(2)
    try:
        worker = WorkerMeshSync(links[1], 1, 64, 2, "q8_0")
        links[0][1].conn.sock.sendall(_frame(Kind.PART, bytes(3 * 34)))   # 3 rows, not 1
        with pytest.raises(NodeFailure, match=r"expected PART of layer 0 attention \(68 "
                                              r"bytes\), got PART \(102 bytes\)"):
            worker.all_reduce(np.ones((1, 64), np.float32), 0, "attention")
    finally:
        _close(links)


def test_the_stats_count_every_frame_with_its_header():
    links = _mesh_links(2)
    try:
        root = RootMeshSync([links[0][1]], 64, 2, "q8_0")
        worker = WorkerMeshSync(links[1], 1, 64, 2, "q8_0")
        t = threading.Thread(target=worker.all_reduce,
                             args=(np.ones((2, 64), np.float32), 0, "ffn"))
        t.start()
        root.all_reduce(np.ones((2, 64), np.float32), 0, "ffn")
        t.join()
        frame = HEADER.size + 2 * 2 * 34
        assert root.stats.bytes_sent == root.stats.bytes_received == frame
        assert worker.stats.bytes_sent == worker.stats.bytes_received == frame
    finally:
        _close(links)


def test_a_node_stops_spinning_when_its_waits_are_long():
    links = _mesh_links(2)
    try:
        early = MeshExchange(links[0], 0, 64, 1, "f32", spin_us=1000)
        late = MeshExchange(links[1], 1, 64, 1, "f32", spin_us=1000)

        def late_node():
            for _ in range(30):
                time.sleep(0.004)              # always 4 ms behind
                late.all_reduce(np.ones((1, 64), np.float32), "layer 0 ffn")

        t = threading.Thread(target=late_node)
        t.start()
        for _ in range(30):
            early.all_reduce(np.ones((1, 64), np.float32), "layer 0 ffn")
        t.join()
        assert early.short_steps < 0.5 and early.spin_s == 0.0    # it sleeps at once now
        assert late.short_steps > 0.5 and late.spin_s > 0.0       # its parts are there
    finally:
        _close(links)


def test_a_root_without_workers_sums_its_own_part_as_it_would_cross_the_wire():
    root = RootMeshSync([], 64, 2, "q8_0", spin_us=150)
    x = np.random.default_rng(3).normal(size=(2, 64)).astype(np.float32)
    buf = x.copy()
    root.all_reduce(buf, 0, "attention")
    np.testing.assert_array_equal(buf, reduce_parts([x], "q8_0"))
    assert root.stats.bytes_sent == root.stats.bytes_received == 0
