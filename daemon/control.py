"""The daemon's control socket: how dllama-ctl (and tests) talk to a running node.

A Unix stream socket (mode 0660, the service's group) carrying JSON lines. A request is
one line; the answer is one or more lines, the last with "done": true (or "error").

    {"op": "status"}
        -> {"done": true, "node_id", "state", "root_id", "term", "peers": [...], "plan": ...}
    {"op": "generate", "prompt": "...", "max_tokens": 64, "temperature": 0, "seed": null,
     "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.0, "chat": false}
        -> {"token": id, "text": "..."} per token, then
           {"done": true, "prompt_tokens": [...], "tokens": [...], "text": "..."}
    An error: {"done": true, "error": "one line", "exit_code": n}
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Awaitable, Callable, Dict, Iterator, Optional

from dllama_node.common.errors import ClusterError, DllamaError

log = logging.getLogger(__name__)

Handler = Callable[[dict, Callable[[dict], Awaitable[None]]], Awaitable[dict]]
MAX_REQUEST_BYTES = 1 << 20


class ControlServer:
    """Serves JSON-line requests; `handlers[op](request, emit)` returns the final answer
    and may call `await emit(line)` for streamed lines before it."""

    def __init__(self, path: str, handlers: Dict[str, Handler]):
        self.path = path
        self.handlers = handlers
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(self._client, path=self.path,
                                                      limit=MAX_REQUEST_BYTES)
        os.chmod(self.path, 0o660)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def emit(obj: dict) -> None:
            writer.write((json.dumps(obj) + "\n").encode())
            await writer.drain()

        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                handler = self.handlers[request["op"]]
            except (json.JSONDecodeError, KeyError, TypeError):
                await emit({"done": True, "error": f"bad request {line[:80]!r}: expected a JSON "
                                                   f"object with op in {sorted(self.handlers)}",
                            "exit_code": 2})
                return
            await answer_request(handler, request, emit)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("control client went away")
        finally:
            writer.close()


async def answer_request(handler: Handler, request: dict,
                         emit: Callable[[dict], Awaitable[None]]) -> None:
    """Run one handler and emit its final line ("done"; an error as one line with its exit
    code). Shared by the Unix socket and the forwarded TCP requests (daemon/forward.py)."""
    try:
        answer = await handler(request, emit)
    except DllamaError as e:
        answer = {"error": str(e), "exit_code": e.exit_code}
    except (ValueError, TypeError, KeyError) as e:
        answer = {"error": f"bad request {request.get('op')!r}: {e}", "exit_code": 2}
    answer["done"] = True
    await emit(answer)


def request(path: str, obj: dict, timeout_s: float = 600.0) -> Iterator[dict]:
    """Client: send one request, yield each answer line (the last has "done")."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(path)
    except OSError as e:
        raise ClusterError(f"no dllama-node answers at {path} ({e.strerror}): is the service "
                           "running? (systemctl status dllama-node)") from None
    with sock, sock.makefile("rwb") as f:
        f.write((json.dumps(obj) + "\n").encode())
        f.flush()
        for line in f:
            answer = json.loads(line)
            yield answer
            if answer.get("done"):
                return
    raise ClusterError(f"dllama-node at {path} closed the connection before answering",)
