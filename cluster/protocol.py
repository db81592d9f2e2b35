"""The node-to-node protocol, declared in one place.

Every message is one frame: a 16-byte header, then `length` bytes of payload.

    magic   4 bytes   b"DLN\\x01"
    version u16       PROTOCOL_VERSION; a peer with another version is refused
    kind    u16       one of Kind
    length  u64       payload bytes (64-bit: slices can pass 4 GiB)

Control messages (HELLO, WELCOME, ASSIGN, LOADED, ERROR, BYE) carry JSON. The per-token
data plane carries raw little-endian arrays:

    FORWARD  <QIB3x start_pos, n, want_logits, then x float32 (n, dim): root -> workers
    PART     this node's partial output (n, dim), in the wire format: in the mesh (the
             default) every node -> every other node; in the star worker -> root
    SUM      star only: the all-reduced output (n, dim), in the wire format: root -> workers
    LOGITS   this node's classifier rows of the last token, float32: worker -> root

The mesh: after every worker has LOADED, the root sends each one MESH {"session",
"index", "peers"}; worker i connects to the workers before it (the addresses the root was
given), accepts the ones after it on its own listener, each link authenticated by the
same handshake as the root's (HELLO carries "mesh": session and "index"), and answers
MESH {"links"}. See cluster/sync_tcp.py for the all-reduce over it.

Wire formats: "q8_0" (default: blocks of 32 int8 with an f16 scale, 34 bytes per 32
values) or "f32". Every receive has a timeout; TCP_NODELAY is set on every socket.
Errors name the peer, what was awaited, and the number.
"""
from __future__ import annotations

import enum
import json
import socket
import struct
from typing import Optional, Tuple

import numpy as np

from dllama_node.common.errors import ClusterError, ProtocolError

MAGIC = b"DLN\x01"
PROTOCOL_VERSION = 3   # 2: the cluster-key handshake; 3: the all-gather mesh (MESH)
HEADER = struct.Struct("<4sHHQ")
FORWARD_HEADER = struct.Struct("<QIB3x")
CHUNK_HEADER = struct.Struct("<HQ")
MAX_CONTROL_BYTES = 16 << 20          # a JSON message larger than this is not ours
DEFAULT_TIMEOUT_S = 10.0


class Kind(enum.IntEnum):
    HELLO = 1        # root -> worker: {"version", "node_id", "cluster", "nonce"}
    WELCOME = 2      # worker -> root: {"version", "node_id", "cluster", "nonce", "proof", "pid"}
    ASSIGN = 3       # root -> worker: what to load (see cluster/worker.py)
    LOADED = 4       # worker -> root: {"weights_bytes", "kv_cache_bytes", "rss_bytes", "load_s"}
    FORWARD = 5
    PART = 6
    SUM = 7
    LOGITS = 8
    ERROR = 9        # either way: {"message"}; the sender gives up the session
    BYE = 10         # root -> worker: end of session
    NEED = 11        # worker -> root: {"what": "manifest"} or {"what": "tensors", "names"}
    MANIFEST = 12    # root -> worker: the slice manifest (cluster/slices.py), JSON
    CHUNK = 13       # root -> worker: <HQ name length, offset, then the name and the bytes
    CHUNK_END = 14   # root -> worker: every chunk asked for has been sent
    STATS = 15       # root -> worker {"reset": bool}; worker -> root {"compute_s", "sync_s", "steps"}
    AUTH = 16        # root -> worker: the root's proof of the cluster key (cluster/auth.py)
    MESH = 17        # root -> worker: {"session", "index", "peers"}; worker -> root: {"links"}


def wire_bytes(n_values: int, wire: str) -> int:
    if wire == "f32":
        return 4 * n_values
    if wire == "q8_0":
        return n_values // 32 * 34
    raise ValueError(f"wire format {wire!r}: expected 'q8_0' or 'f32'")


class Connection:
    """One peer. Frames out with sendmsg (no copies), in with recv_into."""

    def __init__(self, sock: socket.socket, peer: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.sock = sock
        self.peer = peer
        self.timeout_s = timeout_s
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, val in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
        sock.settimeout(timeout_s)
        self._timeout_now: Optional[float] = timeout_s    # what the socket is set to
        self._header = bytearray(HEADER.size)
        self.pushback: Optional[Tuple[Kind, int]] = None   # a header read ahead, not consumed

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> "Connection":
        peer = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise ClusterError(f"node {peer} is unreachable: {e.strerror or e}") from None
        return cls(sock, peer, timeout_s)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def use_timeout(self, timeout_s: Optional[float]) -> None:
        """Set the socket's timeout (None: blocking) unless it is set so already: the
        data plane calls this per message, and a settimeout is a system call."""
        if timeout_s != self._timeout_now:
            self.sock.settimeout(timeout_s)
            self._timeout_now = timeout_s

    # ---- sending -------------------------------------------------------------------
    def send(self, kind: Kind, *parts) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(len(v) for v in views)
        buffers = [HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), total)] + views
        self.use_timeout(self.timeout_s)
        try:
            while buffers:
                sent = self.sock.sendmsg(buffers)
                while buffers and sent >= len(buffers[0]):
                    sent -= len(buffers[0])
                    buffers.pop(0)
                if buffers and sent:
                    buffers[0] = memoryview(buffers[0])[sent:]
        except socket.timeout:
            raise ClusterError(f"node {self.peer}: sending {kind.name} stalled for "
                               f"{self.timeout_s:.1f} s") from None
        except OSError as e:
            raise ClusterError(f"node {self.peer}: connection lost while sending {kind.name} "
                               f"({e.strerror or e})") from None

    def send_json(self, kind: Kind, obj: dict) -> None:
        self.send(kind, json.dumps(obj).encode())

    # ---- receiving -----------------------------------------------------------------
    def _recv_exact(self, view: memoryview, what: str, timeout_s: Optional[float]) -> None:
        self.use_timeout(timeout_s)
        got = 0
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise ClusterError(f"node {self.peer}: connection closed while waiting for "
                                       f"{what} ({got} of {len(view)} bytes received)")
                got += n
        except socket.timeout:
            raise ClusterError(f"node {self.peer}: no answer in {timeout_s:.1f} s while waiting "
                               f"for {what}") from None
        except ConnectionError as e:
            raise ClusterError(f"node {self.peer}: connection lost while waiting for {what} "
                               f"({e.strerror or e})") from None

    def recv_header(self, what: str = "a message",
                    timeout_s: Optional[float] = -1.0) -> Tuple[Kind, int]:
        """(kind, payload length). timeout_s None waits forever (keepalive still
        notices a dead peer); -1 uses the connection's timeout."""
        if self.pushback is not None:
            header, self.pushback = self.pushback, None
            return header
        t = self.timeout_s if timeout_s == -1.0 else timeout_s
        self._recv_exact(memoryview(self._header), what, t)
        return self.check_header(self._header)

    def check_header(self, header) -> Tuple[Kind, int]:
        """(kind, payload length) of a received 16-byte header, or a ProtocolError."""
        magic, version, kind, length = HEADER.unpack_from(header)
        if magic != MAGIC:
            raise ProtocolError(f"peer {self.peer} does not speak the dllama protocol "
                                f"(first bytes {bytes(header[:8]).hex(' ')}, expected "
                                f"{MAGIC.hex(' ')} ...)")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"peer {self.peer} speaks protocol version {version}, this node "
                                f"speaks {PROTOCOL_VERSION}: upgrade the older node")
        try:
            return Kind(kind), length
        except ValueError:
            raise ProtocolError(f"peer {self.peer} sent message kind {kind}, which protocol "
                                f"version {PROTOCOL_VERSION} does not have") from None

    def recv_payload_into(self, buf: np.ndarray, length: int, what: str) -> None:
        view = memoryview(buf).cast("B")
        if length != len(view):
            raise ProtocolError(f"node {self.peer}: {what} has {length} bytes, expected "
                                f"{len(view)}")
        self._recv_exact(view, what, self.timeout_s)

    def recv_bytes(self, length: int, what: str) -> bytes:
        buf = bytearray(length)
        self._recv_exact(memoryview(buf), what, self.timeout_s)
        return bytes(buf)

    def expect(self, kind: Kind, what: str, timeout_s: Optional[float] = -1.0) -> int:
        """Receive a header of `kind` (an ERROR from the peer is raised as such)."""
        got, length = self.recv_header(what, timeout_s)
        if got == Kind.ERROR:
            raise ClusterError(f"node {self.peer}: {self._json(length, what).get('message')}")
        if got != kind:
            raise ProtocolError(f"node {self.peer}: expected {kind.name} ({what}), got {got.name}")
        return length

    def _json(self, length: int, what: str) -> dict:
        if length > MAX_CONTROL_BYTES:
            raise ProtocolError(f"node {self.peer}: a {length}-byte control message is not "
                                f"ours (limit {MAX_CONTROL_BYTES})")
        try:
            return json.loads(self.recv_bytes(length, what))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"node {self.peer}: {what} is not valid JSON ({e})") from None

    def recv_json(self, kind: Kind, what: str, timeout_s: Optional[float] = -1.0) -> dict:
        return self._json(self.expect(kind, what, timeout_s), what)
