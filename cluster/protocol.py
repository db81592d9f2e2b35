"""The node-to-node protocol, declared in one place.

Every message is one frame: a 16-byte header, then `length` bytes of payload.

    magic   4 bytes   b"DLN\\x01"
    version u16       PROTOCOL_VERSION; a peer with another version is refused
    kind    u16       one of Kind
    length  u64       payload bytes (64-bit: slices can pass 4 GiB)

Control messages carry JSON; each kind's payload is declared below as a frozen dataclass
(Hello, Welcome, Auth, Assign, Loaded, ErrorReport, Need, ManifestText, StatsRequest,
StatsReport, MeshRequest, MeshAnswer; BYE and CHUNK_END are empty), sent with
Connection.send_message and read with recv_message / read_message, which check every
field's type and bounds on receipt (cluster/payload.py). The per-token data plane
carries raw little-endian arrays:

    FORWARD  <QIB3x start_pos, n, want_logits, then x float32 (n, dim): root -> workers
    PART     this node's partial output (n, dim), in the wire format: every node -> every
             other node of the mesh
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

import dataclasses
import enum
import json
import socket
import struct
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple, Type, TypeVar

import numpy as np

from dllama_node.cluster.payload import (FieldError, INT64_MAX, byte_count, checked,
                                         from_payload, read_declared, to_payload)
from dllama_node.cluster.wire import WIRE_FORMATS
from dllama_node.common.errors import ClusterError, ProtocolError
from dllama_node.model.config import ModelConfig
from dllama_node.model.tensors import SliceSpec

MAGIC = b"DLN\x01"
PROTOCOL_VERSION = 3   # 2: the cluster-key handshake; 3: the all-gather mesh (MESH)
HEADER = struct.Struct("<4sHHQ")
FORWARD_HEADER = struct.Struct("<QIB3x")
CHUNK_HEADER = struct.Struct("<HQ")
MAX_CONTROL_BYTES = 16 << 20          # a JSON message larger than this is not ours
# HELLO, WELCOME and AUTH are read before the peer has proven anything: a few hundred bytes
# of ours, so an announced length above this is refused before a buffer is made for it
PRE_AUTH_MAX_BYTES = 64 << 10
DEFAULT_TIMEOUT_S = 10.0


class Kind(enum.IntEnum):
    HELLO = 1        # root (or a mesh peer) -> worker: Hello
    WELCOME = 2      # worker -> root: Welcome
    ASSIGN = 3       # root -> worker: Assign, what to load
    LOADED = 4       # worker -> root: Loaded, what it measured
    FORWARD = 5
    PART = 6
    # 7 was SUM, the star's sum from the root (the star is bench/star_sync.py's now)
    LOGITS = 8
    ERROR = 9        # either way: ErrorReport; the sender gives up the session
    BYE = 10         # root -> worker: end of session (empty)
    NEED = 11        # worker -> root: Need, the manifest or tensors of its slice
    MANIFEST = 12    # root -> worker: ManifestText, the slice manifest (cluster/slices.py)
    CHUNK = 13       # root -> worker: <HQ name length, offset, then the name and the bytes
    CHUNK_END = 14   # root -> worker: every chunk asked for has been sent (empty)
    STATS = 15       # root -> worker: StatsRequest; worker -> root: StatsReport
    AUTH = 16        # root -> worker: Auth, the root's proof of the cluster key (cluster/auth.py)
    MESH = 17        # root -> worker: MeshRequest; worker -> root: MeshAnswer


def wire_bytes(n_values: int, wire: str) -> int:
    if wire == "f32":
        return 4 * n_values
    if wire == "q8_0":
        return n_values // 32 * 34
    raise ValueError(f"wire format {wire!r}: expected 'q8_0' or 'f32'")


# ---- the control messages ---------------------------------------------------------------
M = TypeVar("M", bound="Message")
SLICE_SOURCES = ("file", "cache", "stream")


class Message:
    """A control message: KIND names its frame, the dataclass fields its JSON payload."""

    KIND: ClassVar[Kind]
    MAX_BYTES: ClassVar[int] = MAX_CONTROL_BYTES     # the largest payload read as this message

    def to_payload(self) -> dict:
        return to_payload(self)

    @classmethod
    def from_payload(cls: Type[M], obj, peer: str = "?") -> M:
        """The message read from a received JSON object; a ProtocolError names the peer,
        the message, the field and the value of anything missing, mistyped or out of range."""
        return from_payload(cls, obj, cls.KIND.name, peer)


@dataclass(frozen=True)
class Hello(Message):
    """The initiator's offer (cluster/auth.py); a mesh peer adds its session and index."""

    KIND = Kind.HELLO
    MAX_BYTES = PRE_AUTH_MAX_BYTES
    version: int = checked(min=1)
    node_id: str = checked()
    cluster: str = checked()
    nonce: str = checked()                      # hex; its length is the handshake's check
    mesh: Optional[str] = checked(None, omit_none=True)
    index: Optional[int] = checked(None, min=1, omit_none=True)

    def handshake_fields(self) -> dict:
        return {"node_id": self.node_id, "cluster": self.cluster, "nonce": self.nonce}


@dataclass(frozen=True)
class Welcome(Message):
    """The responder's answer: who it is, its nonce and its proof of the key."""

    KIND = Kind.WELCOME
    MAX_BYTES = PRE_AUTH_MAX_BYTES
    version: int = checked(min=1)
    pid: int = checked(min=0)
    node_id: str = checked()
    cluster: str = checked()
    nonce: str = checked()
    proof: str = checked()

    def handshake_fields(self) -> dict:
        return {"node_id": self.node_id, "cluster": self.cluster, "nonce": self.nonce,
                "proof": self.proof}


@dataclass(frozen=True)
class Auth(Message):
    """The initiator's proof of the cluster key."""

    KIND = Kind.AUTH
    MAX_BYTES = PRE_AUTH_MAX_BYTES
    proof: str = checked()


def _config_payload(config: ModelConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "rope_scaling"}


def _read_config(obj) -> ModelConfig:
    return read_declared(ModelConfig, obj)


def _read_slice(obj) -> SliceSpec:
    """A SliceSpec's ranges, each [start, stop] of ints with 0 <= start <= stop."""
    if not isinstance(obj, dict):
        raise FieldError("", obj, "a JSON object of ranges")
    for f in dataclasses.fields(SliceSpec):
        r = obj.get(f.name, dataclasses.MISSING)
        if r is dataclasses.MISSING:
            raise FieldError(f.name, r, "")
        if (not isinstance(r, list) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or not 0 <= r[0] <= r[1] <= INT64_MAX):
            raise FieldError(f.name, r, "[start, stop] with 0 <= start <= stop")
    return SliceSpec.from_dict(obj)


@dataclass(frozen=True)
class Assign(Message):
    """What a worker loads: the slice of which model, for what context, batch and wire.
    model_path is None when the worker must stream its slice (or has no copy)."""

    KIND = Kind.ASSIGN
    model_path: Optional[str] = checked()
    model_identity: str = checked()
    model_size: int = byte_count()
    config: ModelConfig = checked(encode=_config_payload, decode=_read_config)
    slice: SliceSpec = checked(encode=SliceSpec.to_dict, decode=_read_slice)
    seq_len: int = checked(min=1)
    batch: int = checked(min=1)
    planned_bytes: int = byte_count()
    threads: int = checked(min=1)
    wire: str = checked(choices=WIRE_FORMATS)
    load_id: str = checked()

    @property
    def load_key(self) -> tuple:
        """Two assignments with the same key load the same slice the same way: a worker
        keeps what it loaded (a new root, the same plan)."""
        return (self.model_identity, self.model_size, self.slice, self.seq_len, self.batch,
                self.threads, self.wire)


@dataclass(frozen=True)
class Loaded(Message):
    """A worker's slice is loaded: where it came from and what it measured."""

    KIND = Kind.LOADED
    node_id: str = checked()
    source: str = checked(choices=SLICE_SOURCES)
    streamed_bytes: int = byte_count()
    weights_bytes: int = byte_count()
    kv_cache_bytes: int = byte_count()
    rss_bytes: int = byte_count()
    load_s: float = checked(min=0)


@dataclass(frozen=True)
class Rejection:
    """A worker's numbers when its slice no longer fits what it has."""

    node_id: str = checked()
    available_bytes: int = byte_count()
    needed_bytes: int = byte_count()


@dataclass(frozen=True)
class ErrorReport(Message):
    """Why the sender gives up: a message, and with it a rejected slice (reject) or the
    other worker that failed mid-step (failed_node, position, layer, phase)."""

    KIND = Kind.ERROR
    message: str = checked()
    reject: Optional[Rejection] = checked(None, omit_none=True)
    failed_node: Optional[str] = checked(None, omit_none=True)
    position: Optional[int] = checked(None, min=0, omit_none=True)
    layer: Optional[int] = checked(None, min=0, omit_none=True)
    phase: Optional[str] = checked(None, omit_none=True)


@dataclass(frozen=True)
class Need(Message):
    """A streaming worker asks for its slice's manifest, or for tensors of it."""

    KIND = Kind.NEED
    what: str = checked(choices=("manifest", "tensors"))
    names: Optional[Tuple[str, ...]] = checked(None, omit_none=True)


@dataclass(frozen=True)
class ManifestText(Message):
    """The slice manifest as its canonical JSON text (SliceManifest.from_json checks it)."""

    KIND = Kind.MANIFEST
    manifest: str = checked()


@dataclass(frozen=True)
class StatsRequest(Message):
    KIND = Kind.STATS
    reset: bool = checked(False)


@dataclass(frozen=True)
class StatsReport(Message):
    """A node's SyncStats (cluster/sync_tcp.py) since the last reset."""

    KIND = Kind.STATS
    sync_s: float = checked(0.0, min=0)
    step_s: float = checked(0.0, min=0)
    compute_s: float = checked(0.0, min=0)
    steps: int = checked(0, min=0)
    bytes_sent: int = byte_count(0)
    bytes_received: int = byte_count(0)


@dataclass(frozen=True)
class MeshPeer:
    """Worker `index` of the mesh, where the root reached it, and the id it proved."""

    index: int = checked(min=1)
    node_id: str = checked()
    auth_id: str = checked()
    host: str = checked()
    port: int = checked(min=1, max=65535)


@dataclass(frozen=True)
class MeshRequest(Message):
    """The root asks a worker to link to every other worker of this session."""

    KIND = Kind.MESH
    session: str = checked()
    index: int = checked(min=1)
    peers: Tuple[MeshPeer, ...] = checked()
    spin_us: int = checked(0, min=0)


@dataclass(frozen=True)
class MeshAnswer(Message):
    """A worker's links stand: to this many other nodes."""

    KIND = Kind.MESH
    links: int = checked(min=0)


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

    def send_message(self, message: Message) -> None:
        self.send(message.KIND, json.dumps(message.to_payload()).encode())

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
            raise ClusterError(f"node {self.peer}: {self.read_message(ErrorReport, length).message}")
        if got != kind:
            raise ProtocolError(f"node {self.peer}: expected {kind.name} ({what}), got {got.name}")
        return length

    def _json(self, length: int, what: str, limit: int = MAX_CONTROL_BYTES) -> dict:
        """A JSON payload of `length` bytes, at most `limit`. Whatever a peer sends ends as
        a ProtocolError: not UTF-8, not JSON, an integer past Python's digit limit
        (ValueError), nesting deeper than the parser's recursion (RecursionError)."""
        if length > limit:
            raise ProtocolError(f"node {self.peer}: a {length}-byte {what} message is not "
                                f"ours (limit {limit})")
        data = self.recv_bytes(length, what)
        try:
            return json.loads(data)
        except RecursionError:
            raise ProtocolError(f"node {self.peer}: {what} is not valid JSON (nested too deep)"
                                ) from None
        except ValueError as e:      # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ProtocolError(f"node {self.peer}: {what} is not valid JSON "
                                f"({str(e)[:120]})") from None

    def read_message(self, cls: Type[M], length: int, what: Optional[str] = None) -> M:
        """The payload of a header already received, read as message `cls` and checked."""
        return cls.from_payload(self._json(length, what or cls.KIND.name, cls.MAX_BYTES),
                                self.peer)

    def recv_message(self, cls: Type[M], what: Optional[str] = None,
                     timeout_s: Optional[float] = -1.0) -> M:
        """The next message, which must be a `cls` (an ERROR is raised as such)."""
        what = what or cls.KIND.name
        return self.read_message(cls, self.expect(cls.KIND, what, timeout_s), what)
