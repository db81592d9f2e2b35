"""The mesh's compiled socket step (cluster/_mesh_exchange.pyx, cluster/mesh_exchange.h) on
its own: two nodes swap frames over a socket pair; a closed peer and bad arguments are
reported. tests/test_sync_mesh.py runs whole all-reduces with it and with the Python step."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from dllama_node.cluster._mesh_exchange import mesh_exchange


def test_mesh_exchange_swaps_frames_and_reports_a_closed_peer():
    a, b = socket.socketpair()
    size = 16 + 3 * 34
    frames = [np.zeros((2, size + 8), np.uint8) for _ in range(2)]
    for node, f in enumerate(frames):
        f[node, :16] = 7                                  # the same header on both sides
        f[node, 16:size] = np.random.default_rng(node).integers(0, 256, size - 16)
    fds = [np.array([s.fileno()], np.int32) for s in (a, b)]
    results = [None, None]

    def node(i):
        results[i] = mesh_exchange(fds[i], np.array([1 - i], np.int32), frames[i], i, size, 2000)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(0, -1, 0, 0), (0, -1, 0, 0)]
    np.testing.assert_array_equal(frames[0][1, :size], frames[1][1, :size])
    np.testing.assert_array_equal(frames[1][0, :size], frames[0][0, :size])
    assert not frames[0][1, size:].any()                  # nothing past the frame
    b.close()
    status, link, err, got = mesh_exchange(fds[0], np.array([1], np.int32), frames[0], 0, size, 2000)
    assert (status, link, got) in ((1, 0, 0), (2, 0, 0), (3, 0, 0))   # closed, reset, EPIPE
    a.close()
    with pytest.raises(ValueError, match="distinct rows of frames"):
        mesh_exchange(fds[0], np.array([0], np.int32), frames[0], 0, size, 10)
    with pytest.raises(ValueError, match="contiguous int32 vector"):
        mesh_exchange(fds[0].astype(np.int64), np.array([1], np.int32), frames[0], 0, size, 10)
