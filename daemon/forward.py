"""Control requests between nodes: `dllama-ctl chat` on any board reaches the root.

Every daemon listens on its control port (the cluster port + 1 unless configured; it is
advertised in the TXT record as `cp`). A node that is not the root forwards the requests
that need the root (generate, plan, models, the cluster's status) there. The connection
is authenticated with the cluster key by the same challenge-response as the data plane
(cluster/auth.py); then it carries the control socket's JSON lines (daemon/control.py):

    client -> {"hello": {node_id, cluster, nonce}}
    server -> {"welcome": {node_id, cluster, nonce, proof}}
    client -> {"auth": {proof}, "request": {"op": ...}}
    server -> the answer lines, the last with "done": true

A peer without the key gets one error line and the connection is closed; the refusal is
logged with the peer's address. Closing the connection cancels a running generation.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable, Dict, Optional

from dllama_node.cluster.auth import INITIATOR, RESPONDER, Handshake
from dllama_node.common.errors import ClusterError, DllamaError, ProtocolError
from dllama_node.daemon.control import answer_request

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20
HANDSHAKE_TIMEOUT_S = 5.0
Handler = Callable[[dict, Callable[[dict], Awaitable[None]]], Awaitable[dict]]


async def _read_json(reader: asyncio.StreamReader, what: str, timeout_s: float) -> dict:
    line = await asyncio.wait_for(reader.readline(), timeout_s)
    if not line:
        raise ConnectionError(f"closed before {what}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise ProtocolError(f"{what}: not JSON ({line[:40]!r})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a JSON object")
    return obj


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


class ForwardServer:
    """Accepts authenticated control requests from the other nodes of the cluster."""

    def __init__(self, host: str, port: int, key: bytes, cluster: str, node_id: str,
                 handlers: Dict[str, Handler]):
        self.host, self.port = host, port
        self.key, self.cluster, self.node_id = key, cluster, node_id
        self.handlers = handlers
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> int:
        """Listen; returns the port (the one chosen when 0 was asked)."""
        self.server = await asyncio.start_server(self._client, self.host, self.port,
                                                 limit=MAX_LINE_BYTES)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"

        async def emit(obj: dict) -> None:
            writer.write(_line(obj))
            await writer.drain()

        try:
            hs = Handshake(self.key, RESPONDER, self.cluster, self.node_id)
            try:
                hello = await _read_json(reader, "hello", HANDSHAKE_TIMEOUT_S)
                await emit({"welcome": hs.answer(hello.get("hello"), where)})
                auth = await _read_json(reader, "auth", HANDSHAKE_TIMEOUT_S)
                hs.finish(auth.get("auth"))
            except (DllamaError, asyncio.TimeoutError) as e:
                why = str(e) or "no answer within the handshake timeout"
                log.warning("refused a control connection from %s: %s", where, why)
                await emit({"done": True, "error": f"refused by node {self.node_id}: {why}",
                            "exit_code": 6})
                return
            request = auth.get("request")
            handler = self.handlers.get(request.get("op")) if isinstance(request, dict) else None
            if handler is None:
                await emit({"done": True, "exit_code": 2, "error":
                            f"bad forwarded request: expected op in {sorted(self.handlers)}"})
                return
            await answer_request(handler, request, emit)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("control connection from %s went away", where)
        finally:
            writer.close()


async def forward(host: str, port: int, key: bytes, cluster: str, node_id: str, request: dict,
                  emit: Callable[[dict], Awaitable[None]], timeout_s: float = 600.0,
                  who: str = "the root") -> dict:
    """Send `request` to the node at host:port; stream its lines through emit; return the
    last one (with "done"). Raises ClusterError when the node cannot be reached or refuses;
    `who` names the node in it ("the root", "node n3")."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=MAX_LINE_BYTES), HANDSHAKE_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as e:
        raise ClusterError(f"cannot reach the control port of {who} at {host}:{port}: "
                           f"{getattr(e, 'strerror', None) or e or 'timed out'}") from None
    try:
        hs = Handshake(key, INITIATOR, cluster, node_id)
        writer.write(_line({"hello": hs.offer()}))
        await writer.drain()
        welcome = await _read_json(reader, "welcome", HANDSHAKE_TIMEOUT_S)
        if "welcome" not in welcome:
            raise ClusterError(welcome.get("error") or f"{host}:{port} answered no welcome")
        writer.write(_line({"auth": hs.confirm(welcome["welcome"], f"{host}:{port}"),
                            "request": request}))
        await writer.drain()
        while True:
            line = await _read_json(reader, "answer", timeout_s)
            if line.get("done"):
                return line
            await emit(line)
    except (ConnectionError, asyncio.IncompleteReadError):
        raise ClusterError(f"{who} at {host}:{port} closed the connection before it "
                           "answered") from None
    except asyncio.TimeoutError:
        raise ClusterError(f"{who} at {host}:{port} sent nothing for {timeout_s:.0f} s") from None
    finally:
        writer.close()
