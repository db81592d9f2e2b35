"""daemon/forward.py's errors name the node asked, and the address."""
from __future__ import annotations

import asyncio
import socket

import pytest

from dllama_node.common.errors import ClusterError
from dllama_node.daemon.forward import forward


async def _ignore(line):
    pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_node_is_named_with_its_address():
    port = _closed_port()
    with pytest.raises(ClusterError, match=rf"cannot reach the control port of node n9 at "
                                           rf"127\.0\.0\.1:{port}: "):
        asyncio.run(forward("127.0.0.1", port, b"k" * 32, "default", "n1", {"op": "ping"},
                            _ignore, timeout_s=2, who="node n9"))
    with pytest.raises(ClusterError, match=r"cannot reach the control port of the root at"):
        asyncio.run(forward("127.0.0.1", port, b"k" * 32, "default", "n1", {"op": "ping"},
                            _ignore, timeout_s=2))


def test_a_node_that_hangs_up_is_named():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    async def run():
        loop = asyncio.get_running_loop()

        def hang_up():
            conn, _ = server.accept()
            conn.close()
        accepting = loop.run_in_executor(None, hang_up)
        try:
            await forward("127.0.0.1", port, b"k" * 32, "default", "n1", {"op": "progress"},
                          _ignore, timeout_s=2, who="node n2")
        finally:
            await accepting
    try:
        with pytest.raises(ClusterError, match=r"node n2 at 127\.0\.0\.1:\d+ closed the "
                                               r"connection before it answered"):
            asyncio.run(run())
    finally:
        server.close()
