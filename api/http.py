"""Just enough HTTP/1.1 on asyncio streams for a JSON API with server-sent events.

Requests: a request line, headers, and a body of Content-Length bytes (chunked request
bodies are refused with 411). "Expect: 100-continue" is answered before the body is read
(curl sends it for bodies over 1 KiB). Connections persist between requests (HTTP/1.1
keep-alive) unless either side says "Connection: close" or the request is HTTP/1.0.

Responses: a whole body with Content-Length, or a stream in chunked transfer coding
(ChunkedResponse) for SSE. Standard library only: the .deb depends on Debian packages.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Dict, Iterable, Optional, Tuple

MAX_LINE_BYTES = 16 * 1024           # request line or one header line
MAX_HEADERS = 100
MAX_BODY_BYTES = 4 * 1024 * 1024
HEAD_TIMEOUT_S = 75.0                # an idle keep-alive connection is closed after this
BODY_TIMEOUT_S = 30.0


class HttpError(Exception):
    """A request that cannot be parsed: answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    path: str                        # without the query string
    query: str
    version: str                     # "HTTP/1.1"
    headers: Dict[str, str] = field(default_factory=dict)   # lower-case names
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    def json(self):
        """The body parsed as JSON; ValueError (json.JSONDecodeError) when it is not."""
        return json.loads(self.body.decode("utf-8"))


async def _line(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise EOFError from None
        raise HttpError(400, f"{what} ended without a line break") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431 if what == "header" else 414,
                        f"{what} longer than {MAX_LINE_BYTES} bytes") from None
    return line.rstrip(b"\r\n")


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       max_body_bytes: int = MAX_BODY_BYTES,
                       head_timeout_s: float = HEAD_TIMEOUT_S) -> Optional[Request]:
    """The next request on the connection, or None when the client closed it (or stayed
    idle past head_timeout_s) before sending one. HttpError for a malformed request."""
    try:
        first = await asyncio.wait_for(_line(reader, "request line"), head_timeout_s)
    except (EOFError, asyncio.TimeoutError, ConnectionError):
        return None
    parts = first.decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"request line {first[:80]!r}: expected METHOD PATH HTTP/1.x")
    method, target, version = parts
    headers: Dict[str, str] = {}
    try:
        while True:
            line = await asyncio.wait_for(_line(reader, "header"), BODY_TIMEOUT_S)
            if not line:
                break
            if len(headers) >= MAX_HEADERS:
                raise HttpError(431, f"more than {MAX_HEADERS} headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise HttpError(400, f"header line {line[:80]!r}: expected NAME: VALUE")
            name = name.lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    except (EOFError, asyncio.TimeoutError):
        raise HttpError(400, "the request headers did not arrive in full") from None
    path, _, query = target.partition("?")
    request = Request(method, path, query, version, headers)
    if "transfer-encoding" in headers:
        raise HttpError(411, "chunked request bodies are not supported: send Content-Length")
    length_text = headers.get("content-length", "0")
    try:
        length = int(length_text)
        if length < 0:
            raise ValueError
    except ValueError:
        raise HttpError(400, f"Content-Length {length_text!r}: expected a byte count") from None
    if length > max_body_bytes:
        raise HttpError(413, f"request body of {length} bytes: at most {max_body_bytes} accepted")
    if length:
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            request.body = await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            raise HttpError(400, f"the body ended before its Content-Length of {length} "
                                 "bytes") from None
    return request


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def response_head(status: int, headers: Iterable[Tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}", "Server: dllama-node"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send_response(writer: asyncio.StreamWriter, status: int, body: bytes,
                        content_type: str = "application/json", keep_alive: bool = True,
                        headers: Iterable[Tuple[str, str]] = ()) -> None:
    head = response_head(status, [("Content-Type", content_type),
                                  ("Content-Length", str(len(body))),
                                  ("Connection", "keep-alive" if keep_alive else "close"),
                                  *headers])
    writer.write(head + body)
    await writer.drain()


class ChunkedResponse:
    """A response streamed in chunked transfer coding: start(), write() each piece, end()."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.started = False

    async def start(self, status: int, content_type: str, keep_alive: bool = True,
                    headers: Iterable[Tuple[str, str]] = ()) -> None:
        self.writer.write(response_head(status, [
            ("Content-Type", content_type), ("Transfer-Encoding", "chunked"),
            ("Cache-Control", "no-cache"),
            ("Connection", "keep-alive" if keep_alive else "close"), *headers]))
        self.started = True
        await self.writer.drain()

    async def write(self, data: bytes) -> None:
        if data:
            self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self.writer.drain()

    async def end(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
