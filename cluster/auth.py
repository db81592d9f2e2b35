"""Cluster membership authenticated with a shared key that never crosses the wire.

Every node of a cluster holds the same 32-byte key in a file (64 hex digits, mode 0600).
Two nodes prove to each other that they hold it with a mutual challenge-response:

    initiator (root)                                   responder (worker)
    HELLO   {node_id, cluster, nonce: N_i}       -->
                                                 <--   WELCOME {node_id, cluster, nonce: N_r,
                                                                proof: P_r}
    AUTH    {proof: P_i}                          -->

    P_r = HMAC-SHA256(key, T("responder", N_r, N_i))
    P_i = HMAC-SHA256(key, T("initiator", N_i, N_r))
    T(role, own_nonce, peer_nonce) = length-prefixed  "dllama-node auth v1" | role |
        own_nonce | peer_nonce | cluster name | initiator node id | responder node id

Each side checks the other's proof with hmac.compare_digest before it trusts anything
else from it. Fresh random 32-byte nonces on both sides make a recorded proof useless in
any other session (replay); the role in T stops a proof from being reflected back to its
sender; the node ids and the cluster name bind the proof to who is talking to whom.

After the handshake both sides can derive the same per-session key (HKDF-SHA256, RFC 5869,
salt = N_i | N_r) for MACs on data-plane frames. The handshake authenticates the peer
only: without per-frame MACs (or TLS) an on-path attacker could still inject frames after
it. Errors name the peer and, for a wrong key, this node's key id (a fingerprint that says
which key is loaded), never the key.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
from typing import Optional, Union

from dllama_node.common.errors import ClusterError, ProtocolError

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 32
PROOF_BYTES = 32                       # HMAC-SHA256
DEFAULT_KEY_PATH = "/etc/dllama-node/cluster.key"
MAX_KEY_FILE_BYTES = 4096              # a key file is 65 bytes; anything this large is not one
INITIATOR = "initiator"                # the node that connects (the root, in HELLO)
RESPONDER = "responder"                # the node that accepts (a worker)
_DOMAIN = b"dllama-node auth v1"
_LEN = struct.Struct(">Q")

PathLike = Union[str, "os.PathLike[str]"]


class ClusterKeyError(ClusterError):
    """The cluster key file is missing, unreadable or malformed."""


class AuthenticationError(ClusterError):
    """A peer did not prove that it holds this cluster's key, or names another cluster."""


# ---- the key file --------------------------------------------------------------------
def generate_key() -> bytes:
    """A new cluster key: KEY_BYTES random bytes from the OS."""
    return secrets.token_bytes(KEY_BYTES)


def key_id(key: bytes) -> str:
    """A 12-hex-digit fingerprint of the key (an HMAC of a constant): two nodes with the
    same key id hold the same key. It does not reveal the key."""
    return hmac.new(key, b"dllama-node key id", hashlib.sha256).hexdigest()[:12]


def write_key(path: PathLike, key: bytes) -> None:
    """Write `key` to `path` as 64 hex digits and a newline, mode 0600, atomically (a
    temporary file in the same folder, fsynced, renamed over `path`)."""
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"cluster key is a {type(key).__name__}, expected {KEY_BYTES} bytes")
    if len(key) != KEY_BYTES:
        raise ValueError(f"cluster key is {len(key)} bytes, expected {KEY_BYTES}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ClusterKeyError(f"cannot write cluster key file {path}: {e.strerror or e}") from None
    try:
        try:
            os.fchmod(fd, 0o600)                     # whatever the umask
            os.write(fd, bytes(key).hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise ClusterKeyError(f"cannot write cluster key file {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass                                         # the rename is done; durability is best effort
    log.info("wrote cluster key %s (key id %s)", path, key_id(bytes(key)))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_key(path: PathLike) -> bytes:
    """The key in `path` (64 hex digits; surrounding whitespace ignored). Warns when the
    file is readable or writable by group or others. Errors name the file and what is
    wrong with it, never its content."""
    path = os.fspath(path)
    what = f"cluster key file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ClusterKeyError(f"{what} does not exist: every node of a cluster needs the same "
                              f"key file ({KEY_BYTES} random bytes as {2 * KEY_BYTES} hex digits, "
                              "mode 0600)") from None
    except PermissionError:
        raise ClusterKeyError(f"{what} is not readable by this user (uid {os.geteuid()}): run the "
                              "service as the file's owner, or chown the file") from None
    except OSError as e:
        raise ClusterKeyError(f"{what} cannot be opened: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise ClusterKeyError(f"{what} is not a regular file")
        if st.st_mode & 0o077:
            log.warning("%s has mode %04o: other users can read or change the cluster key; "
                        "run: chmod 600 %s", what, stat.S_IMODE(st.st_mode), path)
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise ClusterKeyError(f"{what} is {st.st_size} bytes, expected {2 * KEY_BYTES} hex "
                                  "digits and a newline")
        raw = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    except IsADirectoryError:
        raise ClusterKeyError(f"{what} is a directory") from None
    finally:
        os.close(fd)
    return _parse_key(raw, what)


def _parse_key(raw: bytes, what: str) -> bytes:
    text = raw.strip()
    if not text:
        raise ClusterKeyError(f"{what} is empty: expected {2 * KEY_BYTES} hex digits")
    if len(text) != 2 * KEY_BYTES:
        raise ClusterKeyError(f"{what}: expected {2 * KEY_BYTES} hex digits ({KEY_BYTES} bytes), "
                              f"found {len(text)} characters")
    for i, c in enumerate(text):
        if c not in b"0123456789abcdefABCDEF":
            raise ClusterKeyError(f"{what}: character {i + 1} of {len(text)} is not a hex digit")
    return bytes.fromhex(text.decode("ascii"))


# ---- proofs and keys -----------------------------------------------------------------
def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _transcript(role: str, own_nonce: bytes, peer_nonce: bytes, cluster: str,
                initiator_id: str, responder_id: str) -> bytes:
    parts = (_DOMAIN, role.encode(), own_nonce, peer_nonce, cluster.encode(),
             initiator_id.encode(), responder_id.encode())
    return b"".join(_LEN.pack(len(p)) + p for p in parts)


def make_proof(key: bytes, role: str, own_nonce: bytes, peer_nonce: bytes, cluster: str,
               initiator_id: str, responder_id: str) -> bytes:
    """HMAC-SHA256(key, T(role, own_nonce, peer_nonce, ...)): the prover's `role` and its
    own nonce first. PROOF_BYTES bytes."""
    if role not in (INITIATOR, RESPONDER):
        raise ValueError(f"role {role!r}: expected {INITIATOR!r} or {RESPONDER!r}")
    msg = _transcript(role, own_nonce, peer_nonce, cluster, initiator_id, responder_id)
    return hmac.new(key, msg, hashlib.sha256).digest()


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF (RFC 5869) with HMAC-SHA256: extract then expand to `length` bytes."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF output of {length} bytes: expected 1 to {255 * 32}")
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


class Handshake:
    """One side of one mutual handshake. Use once per connection.

    Initiator: offer() -> HELLO fields; confirm(welcome) -> AUTH fields.
    Responder: answer(hello) -> WELCOME fields; finish(auth).
    Then session_key(purpose) on both sides gives the same key.
    """

    def __init__(self, key: bytes, role: str, cluster: str, node_id: str,
                 nonce: Optional[bytes] = None):
        if len(key) != KEY_BYTES:
            raise ValueError(f"cluster key is {len(key)} bytes, expected {KEY_BYTES}")
        if role not in (INITIATOR, RESPONDER):
            raise ValueError(f"role {role!r}: expected {INITIATOR!r} or {RESPONDER!r}")
        self._key = bytes(key)
        self.role, self.cluster, self.node_id = role, cluster, node_id
        self.nonce = nonce if nonce is not None else new_nonce()
        if len(self.nonce) != NONCE_BYTES:
            raise ValueError(f"nonce is {len(self.nonce)} bytes, expected {NONCE_BYTES}")
        self.peer_id: Optional[str] = None
        self.peer_nonce: Optional[bytes] = None
        self.peer_label = "the peer"
        self.verified = False

    def __repr__(self) -> str:                      # never the key
        return (f"Handshake(role={self.role!r}, cluster={self.cluster!r}, "
                f"node_id={self.node_id!r}, peer_id={self.peer_id!r}, verified={self.verified})")

    @property
    def peer_role(self) -> str:
        return RESPONDER if self.role == INITIATOR else INITIATOR

    def _ids(self):
        if self.role == INITIATOR:
            return self.node_id, self.peer_id
        return self.peer_id, self.node_id

    # ---- the steps, over plain values ----------------------------------------------
    def meet(self, peer_id: str, peer_nonce: bytes, peer_cluster: Optional[str] = None,
             peer_address: Optional[str] = None) -> None:
        """Record who the peer says it is and its nonce."""
        label = f"node {peer_id}" + (f" ({peer_address})" if peer_address else "")
        if self.peer_id is not None:
            raise ProtocolError(f"{label}: a second handshake on one connection")
        if not isinstance(peer_id, str) or not peer_id:
            raise ProtocolError(f"peer {peer_address or '?'} sent no node id in its handshake")
        if len(peer_nonce) != NONCE_BYTES:
            raise ProtocolError(f"{label}: nonce is {len(peer_nonce)} bytes, expected "
                                f"{NONCE_BYTES}")
        if hmac.compare_digest(peer_nonce, self.nonce):
            raise AuthenticationError(f"{label} sent back this node's own nonce (a reflection)")
        if peer_cluster is not None and peer_cluster != self.cluster:
            raise AuthenticationError(f"cluster name mismatch: {label} belongs to cluster "
                                      f"{peer_cluster!r}, this node to {self.cluster!r}")
        self.peer_id, self.peer_nonce, self.peer_label = peer_id, bytes(peer_nonce), label

    def proof(self) -> bytes:
        """This node's proof for the peer met (PROOF_BYTES bytes)."""
        self._need_peer()
        return make_proof(self._key, self.role, self.nonce, self.peer_nonce, self.cluster,
                          *self._ids())

    def verify(self, peer_proof: bytes) -> None:
        """Raise AuthenticationError unless `peer_proof` shows the peer holds our key."""
        self._need_peer()
        expected = make_proof(self._key, self.peer_role, self.peer_nonce, self.nonce,
                              self.cluster, *self._ids())
        if len(peer_proof) != PROOF_BYTES or not hmac.compare_digest(peer_proof, expected):
            raise AuthenticationError(
                f"cluster key mismatch: {self.peer_label} did not prove it holds this "
                f"cluster's key (this node's key id is {key_id(self._key)}; every node needs "
                f"the same key file)")
        self.verified = True

    def session_key(self, purpose: str = "frames") -> bytes:
        """A 32-byte key for this session only (both nonces), the same on both sides once
        the peer is verified; different purposes give independent keys."""
        if not self.verified:
            raise ClusterError(f"{self.peer_label}: no session key before the peer is verified")
        initiator_nonce, responder_nonce = ((self.nonce, self.peer_nonce)
                                            if self.role == INITIATOR
                                            else (self.peer_nonce, self.nonce))
        info = _transcript("session:" + purpose, b"", b"", self.cluster, *self._ids())
        return hkdf_sha256(self._key, initiator_nonce + responder_nonce, info)

    def _need_peer(self) -> None:
        if self.peer_id is None:
            raise ProtocolError("handshake: the peer's node id and nonce are not known yet")

    # ---- the steps, over the JSON of HELLO / WELCOME / AUTH ------------------------
    def offer(self) -> dict:
        """Initiator: the fields to add to HELLO."""
        return {"node_id": self.node_id, "cluster": self.cluster, "nonce": self.nonce.hex()}

    def answer(self, hello: dict, peer_address: Optional[str] = None) -> dict:
        """Responder: take HELLO; the fields to add to WELCOME (this node's proof included)."""
        self._meet_fields(hello, "HELLO", peer_address)
        return {"node_id": self.node_id, "cluster": self.cluster, "nonce": self.nonce.hex(),
                "proof": self.proof().hex()}

    def confirm(self, welcome: dict, peer_address: Optional[str] = None) -> dict:
        """Initiator: take WELCOME, verify the responder; the fields of AUTH."""
        self._meet_fields(welcome, "WELCOME", peer_address)
        self.verify(_hex_field(welcome, "proof", PROOF_BYTES, "WELCOME", self.peer_label))
        return {"proof": self.proof().hex()}

    def finish(self, auth: dict) -> None:
        """Responder: take AUTH and verify the initiator."""
        self.verify(_hex_field(auth, "proof", PROOF_BYTES, "AUTH", self.peer_label))

    def _meet_fields(self, msg: dict, what: str, peer_address: Optional[str]) -> None:
        where = peer_address or "?"
        if not isinstance(msg, dict):
            raise ProtocolError(f"peer {where}: {what} is not a JSON object")
        peer_id = msg.get("node_id")
        label = f"node {peer_id} ({where})" if peer_id else f"peer {where}"
        cluster = msg.get("cluster")
        if not isinstance(cluster, str):
            raise ProtocolError(f"{label}: {what} names no cluster (this node is in cluster "
                                f"{self.cluster!r}; is the peer an older version?)")
        self.meet(peer_id, _hex_field(msg, "nonce", NONCE_BYTES, what, label), cluster,
                  peer_address)


def _hex_field(msg: dict, name: str, n_bytes: int, what: str, label: str) -> bytes:
    value = msg.get(name) if isinstance(msg, dict) else None
    if not isinstance(value, str):
        raise ProtocolError(f"{label}: {what} has no {name!r} field")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"{label}: {what} field {name!r} is not hex") from None
    if len(raw) != n_bytes:
        raise ProtocolError(f"{label}: {what} field {name!r} is {len(raw)} bytes, expected "
                            f"{n_bytes}")
    return raw
