"""The OpenAI-compatible HTTP server: routes, authentication, streaming, cancellation.

    POST /v1/chat/completions   chat; "stream": true answers server-sent events
    POST /v1/completions        plain text (or token ids) in, text out; streams likewise
    GET  /v1/models             the served model; GET /v1/models/{id} one of them
    GET  /health                200 {"status": "ok"} when serving, 503 {"status": state}
    GET  /metrics               Prometheus text (api/metrics.py)

Bound to 127.0.0.1 by default. Bound to any other address, every request must carry
`Authorization: Bearer <cluster key as 64 hex digits>` (compared in constant time), or it
gets 401. A client that closes its connection, while waiting in the queue or while its
answer is generated, cancels its generation (api/engine_queue.py).

In a running event loop (the daemon):   server = ApiServer(backend, config)
                                         await server.start(); ...; await server.stop()
From blocking code (tests, tools):      with serve_in_thread(backend, config) as server: ...
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Set

from dllama_node.api import openai
from dllama_node.api.backend import Backend, NotServing
from dllama_node.api.engine_queue import (DEFAULT_QUEUE_SIZE, ClientGone, EngineQueue, Job,
                                          QueueFull, make_job)
from dllama_node.api.http import (MAX_BODY_BYTES, MAX_LINE_BYTES, ChunkedResponse, HttpError,
                                  Request, read_request, send_response)
from dllama_node.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dllama_node.api.metrics import ApiCounters, render
from dllama_node.api.openai import ApiError, error_body
from dllama_node.common.errors import DllamaError, UsageError
from dllama_node.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)
# One INFO line per request, as uvicorn writes them:
#   127.0.0.1:53422 - "POST /v1/chat/completions HTTP/1.1" 200 0.84 s
# dllama-ctl serve shows them on stderr; the daemon's go to the journal.
access_log = logging.getLogger("dllama_node.api.access")

DEFAULT_PORT = 8080
RETRY_AFTER_S = 2
DISCONNECT_POLL_S = 0.05
ROUTES = {"/v1/chat/completions": ("POST",), "/v1/completions": ("POST",),
          "/v1/models": ("GET",), "/health": ("GET",), "/metrics": ("GET",)}


@dataclass
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT            # 0: any free port (ApiServer.port says which)
    key: Optional[bytes] = None         # the cluster key (cluster/auth.py read_key)
    queue_size: int = DEFAULT_QUEUE_SIZE
    require_auth: Optional[bool] = None  # None: exactly when the host is not loopback
    max_body_bytes: int = MAX_BODY_BYTES

    @property
    def auth_required(self) -> bool:
        return needs_auth(self.host) if self.require_auth is None else self.require_auth


def needs_auth(host: str) -> bool:
    """True unless `host` is a loopback address (127.0.0.0/8, ::1) or "localhost"."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True                      # a host name: it may resolve to anything


def host_port(host: str, port: int) -> str:
    """'127.0.0.1:8080'; an IPv6 address in brackets: '[::1]:8080'."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


class ApiServer:
    def __init__(self, backend: Backend, config: Optional[ApiConfig] = None):
        self.backend = backend
        self.config = config or ApiConfig()
        if self.config.auth_required and not self.config.key:
            raise UsageError(f"listening on {self.config.host} (not loopback) needs the "
                             "cluster key for bearer tokens: give a key file")
        self._token = self.config.key.hex().encode() if self.config.key else b""
        self.queue = EngineQueue(backend, self.config.queue_size)
        self.counters = ApiCounters()
        self.created = int(time.time())
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: Set[asyncio.Task] = set()
        self.port = self.config.port

    @property
    def address(self) -> str:
        """HOST:PORT served, as in a URL: 127.0.0.1:8080, [::1]:8080."""
        return host_port(self.config.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # ---- life cycle ------------------------------------------------------------------------
    async def start(self, listener: Optional[socket.socket] = None) -> None:
        """Listen on config.host and config.port, or on `listener`, a socket bound to them
        already (dllama-ctl serve binds before it loads the model)."""
        where = {"sock": listener} if listener is not None else \
            {"host": self.config.host, "port": self.config.port}
        self._server = await asyncio.start_server(self._connection, limit=MAX_LINE_BYTES,
                                                  **where)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("HTTP API on %s (model %s, authentication %s, queue %d)", self.url,
                 self.backend.model_id, "required" if self.config.auth_required else "off",
                 self.config.queue_size)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # a running generation is cancelled with its client
        await cancel_and_wait(list(self._connections))
        if not await self.queue.idle():
            log.warning("a generation was still running when the HTTP API stopped")
        self.queue.close()

    async def serve_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # ---- one connection --------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            while True:
                try:
                    request = await read_request(reader, writer, self.config.max_body_bytes)
                except HttpError as e:
                    self.counters.request("other", e.status)
                    await send_response(writer, e.status, _json(error_body(str(e))),
                                        keep_alive=False)
                    break
                if request is None:
                    break
                if not await self._dispatch(request, reader, writer):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _dispatch(self, request: Request, reader, writer) -> bool:
        """Answer one request; False when the connection must close."""
        t0 = time.perf_counter()
        endpoint = request.path if request.path in ROUTES else (
            "/v1/models/{id}" if request.path.startswith("/v1/models/") else "other")
        keep = request.keep_alive
        status = 200
        try:
            self._authorize(request)
            methods = ROUTES.get(request.path, ("GET",) if endpoint == "/v1/models/{id}" else None)
            if methods is None:
                raise ApiError(404, f"no endpoint {request.path}: the API serves "
                                    f"{', '.join(sorted(ROUTES))}", code="not_found")
            if request.method not in methods:
                raise ApiError(405, f"{request.method} {request.path}: this endpoint answers "
                                    f"{', '.join(methods)}", code="method_not_allowed",
                               headers=[("Allow", ", ".join(methods))])
            if request.path in ("/v1/chat/completions", "/v1/completions"):
                status, keep = await self._complete(request, reader, writer,
                                                    chat=request.path == "/v1/chat/completions")
            else:
                status, body, ctype = self._read_only(request, endpoint)
                await send_response(writer, status, body, ctype, keep)
        except ApiError as e:
            status = e.status
            await send_response(writer, e.status, _json(e.body()), keep_alive=keep,
                                headers=e.headers)
        self.counters.request(endpoint, status)
        peer = writer.get_extra_info("peername")
        target = f"{request.path}?{request.query}" if request.query else request.path
        access_log.info('%s - "%s %s %s" %d %.2f s',
                        host_port(*peer[:2]) if isinstance(peer, tuple) else "-",
                        request.method, target, request.version, status,
                        time.perf_counter() - t0)
        return keep

    def _authorize(self, request: Request) -> None:
        if not self.config.auth_required:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().lower().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token):
            raise ApiError(401, "this server needs 'Authorization: Bearer <cluster key>' (the "
                                "64 hex digits of the cluster key file)",
                           code="invalid_api_key", headers=[("WWW-Authenticate", "Bearer")])

    def _read_only(self, request: Request, endpoint: str):
        if endpoint == "/health":
            state = self.backend.state()
            if state == "serving":
                answer = {"status": "ok", "model": self.backend.model_id}
                return 200, _json(answer), "application/json"
            return 503, _json({"status": state}), "application/json"
        if endpoint == "/metrics":
            text = render(self.counters, self.backend.metrics(), self.queue.waiting,
                          self.queue.generating)
            return 200, text.encode(), METRICS_CONTENT_TYPE
        if endpoint == "/v1/models":
            return 200, _json(openai.models_body(self.backend.model_id, self.created)), \
                "application/json"
        model_id = request.path[len("/v1/models/"):]
        if model_id != self.backend.model_id:
            raise ApiError(404, f"model {model_id!r} does not exist: this server serves "
                                f"{self.backend.model_id!r}", param="model",
                           code="model_not_found")
        return 200, _json(openai.model_body(model_id, self.created)), "application/json"

    # ---- completions -------------------------------------------------------------------------
    async def _complete(self, request: Request, reader, writer, chat: bool):
        """(status, keep the connection) after answering a completion request."""
        try:
            if self.backend.state() != "serving":
                raise NotServing(self.backend.state())
            try:
                body = request.json()
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON: {e}") from None
            req = openai.parse_request(body, chat, self.backend.max_seq_len)
            job = await asyncio.get_running_loop().run_in_executor(None, self._job, req)
        except NotServing as e:
            raise _unavailable(str(e), "not_serving") from None
        gone = asyncio.Event()
        poll = asyncio.ensure_future(_watch_disconnect(reader, gone))
        try:
            if req.stream:
                return await self._stream(req, job, gone, writer, request.keep_alive)
            try:
                outcome = await self.queue.run(job, gone)
            except (QueueFull, ClientGone, NotServing, DllamaError) as e:
                return self._failed(e)
            if outcome.cancelled:
                self.counters.cancel()
                return 499, False
            self.counters.tokens(len(job.prompt_ids), outcome.completion_tokens)
            answer = openai.completion_body(chat, openai.new_id(chat), self.backend.model_id,
                                            outcome.text, outcome.finish_reason,
                                            len(job.prompt_ids), outcome.completion_tokens)
            await send_response(writer, 200, _json(answer), keep_alive=request.keep_alive)
            return 200, request.keep_alive
        finally:
            await cancel_and_wait([poll])

    def _job(self, req: openai.CompletionRequest) -> Job:
        """Tokenize and size the request (in a thread: long prompts take a while)."""
        return make_job(req, self.backend.tokenizer, self.backend.max_seq_len)

    async def _stream(self, req, job: Job, gone: asyncio.Event, writer, keep_alive: bool):
        chat = req.chat
        id_, created, model = openai.new_id(chat), int(time.time()), self.backend.model_id
        out = ChunkedResponse(writer)

        async def begin() -> None:
            await out.start(200, "text/event-stream", keep_alive)
            if chat:
                await out.write(sse(openai.chunk_body(chat, id_, model, created, "", role=True)))

        async def on_text(piece: str) -> None:
            if not out.started:
                await begin()
            await out.write(sse(openai.chunk_body(chat, id_, model, created, piece)))

        try:
            try:
                outcome = await self.queue.run(job, gone, on_text)
            except (QueueFull, ClientGone, NotServing, DllamaError) as e:
                if not out.started or isinstance(e, ClientGone):
                    return self._failed(e)
                error = _error_of(e)            # headers are out: the error goes in the stream
                await out.write(sse(error.body()))
                await out.end()
                return error.status, False
            if outcome.cancelled:
                self.counters.cancel()
                return 499, False
            self.counters.tokens(len(job.prompt_ids), outcome.completion_tokens)
            if not out.started:
                await begin()
            final = openai.chunk_body(chat, id_, model, created, None if chat else "",
                                      finish_reason=outcome.finish_reason)
            await out.write(sse(final))
            if req.include_usage:
                use = openai.usage(len(job.prompt_ids), outcome.completion_tokens)
                await out.write(sse(openai.chunk_body(chat, id_, model, created, usage_=use)))
            await out.write(b"data: [DONE]\n\n")
            await out.end()
            return 200, keep_alive
        except ConnectionError:
            return 499, False

    def _failed(self, e: Exception):
        """A failure before any byte of the answer: raise it as an ApiError (or, for a
        client that left, answer nothing). Returns (status, keep) for one that left."""
        if isinstance(e, ClientGone):
            self.counters.cancel()
            return 499, False
        raise _error_of(e) from None


def _error_of(e: Exception) -> ApiError:
    if isinstance(e, QueueFull):
        return _unavailable(f"{e}; try again shortly", "queue_full")
    if isinstance(e, NotServing):
        return _unavailable(str(e), "not_serving")
    if isinstance(e, UsageError):
        return ApiError(400, str(e))
    if isinstance(e, DllamaError):
        log.error("generation failed: %s", e)
        return _unavailable(f"the generation failed: {e}", "generation_failed")
    return ApiError(500, f"internal error: {e}", type_="server_error")


def _unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, type_="server_error", code=code,
                    headers=[("Retry-After", str(RETRY_AFTER_S))])


async def _watch_disconnect(reader: asyncio.StreamReader, gone: asyncio.Event) -> None:
    """Set `gone` when the client closes its side. The body has been read in full, so the
    reader only sees end of file (or the next pipelined request, which is left alone)."""
    while not reader.at_eof():
        await asyncio.sleep(DISCONNECT_POLL_S)
    gone.set()


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


@contextlib.contextmanager
def serve_in_thread(backend: Backend, config: Optional[ApiConfig] = None) -> Iterator[ApiServer]:
    """Run an ApiServer on an event loop of its own in a thread; stopped on exit."""
    server = ApiServer(backend, config)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def main() -> None:
        state["stop"] = asyncio.Event()
        try:
            await server.start()
        except BaseException as e:      # noqa: B902 - reported to the caller
            state["failure"] = e
            return
        finally:
            started.set()
        try:
            await state["stop"].wait()
        finally:
            await server.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="api-server",
                              daemon=True)
    thread.start()
    started.wait()
    if "failure" in state:
        thread.join()
        loop.close()
        raise state["failure"]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(timeout=30)
        loop.close()
