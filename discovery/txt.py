"""What a node tells its peers (NodeAdvert), and its two encodings.

- DNS-SD TXT (RFC 6763 section 6), for mDNS: length-prefixed "key=value" strings, each
  at most 255 bytes, short keys, integers in decimal. The whole record is kept under
  TXT_BUDGET_BYTES (RFC 6763 section 6.2 recommends 1300 so it fits one packet); the list
  of models is the only part that may be cut short, and then the record says so
  (`mn` > the `m<i>` keys present): the heartbeat carries the full advert.
- A plain dict (JSON), for the heartbeat and static-peer datagrams.

Decoding never trusts the peer: unknown keys are ignored, a duplicated key keeps its first
value (RFC 6763 section 6.4), and anything malformed raises ProtocolError naming the key,
the value found and what was expected; callers log it and skip the record.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from dllama_node.common.errors import ProtocolError, UsageError

TXT_FORMAT_VERSION = 1          # bumped only for changes an older reader would misread
TXT_STRING_MAX_BYTES = 255      # one length byte per string
TXT_BUDGET_BYTES = 1300         # whole record, length bytes included
NODE_ID_MAX_CHARS = 55          # "dllama-" + node_id is our mDNS host label (<= 63 bytes)
CLUSTER_MAX_CHARS = 63
MODEL_NAME_MAX_BYTES = 200
ROOT_ID_MAX_CHARS = NODE_ID_MAX_CHARS
INT64_MAX = 2 ** 63 - 1
# The highest election term an advert may carry: far past any real count (a term a second
# for 10^11 years). A peer claiming more is refused; the election never counts past it
# (daemon/election.py), so no term it computes can fail this check and end the daemon.
TERM_MAX = 2 ** 62
LAST_EXIT_MAX_BYTES = 240       # one TXT string: "lx=" + this fits in 255 bytes

_NODE_ID_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")
_CLUSTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_INSTANCE_RE = re.compile(r"[0-9a-f]{0,32}\Z")
_STATE_RE = re.compile(r"[a-z]{0,20}\Z")
_DECIMAL_RE = re.compile(r"-?[0-9]{1,19}\Z")


@dataclass(frozen=True)
class NodeAdvert:
    """One node's offer to the cluster, as its peers see it.

    node_id: lowercase letters, digits and '-', at most 55 characters (it names the mDNS
    service and host). address: the host peers reach it at; "" when the node does not know,
    and receivers fill in the address they heard it from. port: its cluster TCP port;
    heartbeat_port: its UDP heartbeat port. Bytes are Python ints; memlock_limit_bytes is
    -1 when unlimited. term/root_id: election state, 0/"" before any election.
    instance: random hex chosen at each start (a restarted node is a new instance);
    revision: raised by the node each time its advert changes, so peers keep the newest.
    """

    node_id: str
    cluster: str
    port: int
    heartbeat_port: int
    address: str = ""
    protocol_version: int = 1
    available_ram_bytes: int = 0
    free_swap_bytes: int = 0
    memlock_limit_bytes: int = -1
    cores: int = 1
    speed: float = 1.0
    models: Tuple[str, ...] = ()
    coordinator_only: bool = False
    never_root: bool = False
    term: int = 0
    root_id: str = ""
    instance: str = ""
    revision: int = 0
    control_port: int = 0       # TCP port of its authenticated control forwarding (0: none)
    http_port: int = 0          # TCP port of its OpenAI-compatible HTTP API (0: none)
    state: str = ""             # its daemon state in one word (discovering, serving, ...)
    last_exit: str = ""         # how its previous run ended, when badly (OOM kills above all)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "speed", float(self.speed))
        _validate(self)

    def replace(self, **changes: Any) -> "NodeAdvert":
        """A copy with `changes` applied (validated like any advert)."""
        return dataclasses.replace(self, **changes)

    def newer_than(self, other: "NodeAdvert") -> bool:
        """True when this advert should replace `other` (same node): a new instance, or a
        higher revision of the same instance."""
        return self.instance != other.instance or self.revision > other.revision

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict of every field (models as a list)."""
        d = dataclasses.asdict(self)
        d["models"] = list(self.models)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NodeAdvert":
        """Inverse of to_dict, for data from the network: unknown keys are ignored, a
        missing or mistyped field raises ProtocolError."""
        if not isinstance(d, Mapping):
            raise ProtocolError(f"advert: expected a JSON object, found {type(d).__name__}")
        kwargs: Dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                if f.default is dataclasses.MISSING:
                    raise ProtocolError(f"advert: field {f.name!r} is missing")
                continue
            value = d[f.name]
            expected = _FIELD_TYPES[f.name]
            ok = (isinstance(value, expected) and not (expected is int and isinstance(value, bool)))
            if f.name == "speed" and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if f.name == "models":
                ok = isinstance(value, list) and all(isinstance(m, str) for m in value)
            if not ok:
                wanted = "a list of strings" if f.name == "models" else expected.__name__
                raise ProtocolError(f"advert: field {f.name!r} = {value!r:.80}: expected {wanted}")
            kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except UsageError as e:
            raise ProtocolError(f"advert: {e}") from None

    def to_capacity(self):
        """The planner's view of this node (dllama_node.plan.NodeCapacity)."""
        from dllama_node.plan.data import NodeCapacity

        return NodeCapacity(node_id=self.node_id, available_ram_bytes=self.available_ram_bytes,
                            free_swap_bytes=self.free_swap_bytes,
                            memlock_limit_bytes=self.memlock_limit_bytes, cores=self.cores,
                            speed=self.speed, coordinator_only=self.coordinator_only)


_FIELD_TYPES: Dict[str, type] = {
    "node_id": str, "cluster": str, "port": int, "heartbeat_port": int, "address": str,
    "protocol_version": int, "available_ram_bytes": int, "free_swap_bytes": int,
    "memlock_limit_bytes": int, "cores": int, "speed": float, "models": list,
    "coordinator_only": bool, "never_root": bool, "term": int, "root_id": str,
    "instance": str, "revision": int, "control_port": int, "http_port": int, "state": str,
    "last_exit": str,
}


def _validate(a: NodeAdvert) -> None:
    """Raise UsageError naming the first field out of range."""
    def bad(name: str, value: Any, expected: str) -> UsageError:
        return UsageError(f"node advert field {name} = {value!r:.80}: expected {expected}")

    if not (len(a.node_id) <= NODE_ID_MAX_CHARS and _NODE_ID_RE.match(a.node_id)):
        raise bad("node_id", a.node_id, f"1-{NODE_ID_MAX_CHARS} characters of a-z, 0-9 and '-', "
                  "not starting or ending with '-'")
    if a.root_id and not (len(a.root_id) <= ROOT_ID_MAX_CHARS and _NODE_ID_RE.match(a.root_id)):
        raise bad("root_id", a.root_id, "empty or a node id")
    if not (len(a.cluster) <= CLUSTER_MAX_CHARS and _CLUSTER_RE.match(a.cluster)):
        raise bad("cluster", a.cluster, f"1-{CLUSTER_MAX_CHARS} characters of A-Z, a-z, 0-9, "
                  "'_', '.' and '-'")
    if not _INSTANCE_RE.match(a.instance):
        raise bad("instance", a.instance, "at most 32 lowercase hex digits")
    if _utf8_len(a.address) > 253 or any(c in a.address for c in " =,\x00"):
        raise bad("address", a.address, "a host name or IP address")
    for name in ("port", "heartbeat_port"):
        value = getattr(a, name)
        if not 1 <= value <= 65535:
            raise bad(name, value, "a port in [1, 65535]")
    for name in ("control_port", "http_port"):
        value = getattr(a, name)
        if not 0 <= value <= 65535:
            raise bad(name, value, "0 (none) or a port in [1, 65535]")
    if not _STATE_RE.match(a.state):
        raise bad("state", a.state, "at most 20 lowercase letters")
    if _utf8_len(a.last_exit) > LAST_EXIT_MAX_BYTES or "\x00" in a.last_exit:
        raise bad("last_exit", a.last_exit[:40], f"at most {LAST_EXIT_MAX_BYTES} bytes of text")
    for name, low in (("protocol_version", 0), ("available_ram_bytes", 0), ("free_swap_bytes", 0),
                      ("memlock_limit_bytes", -1), ("cores", 1), ("revision", 0)):
        value = getattr(a, name)
        if not low <= value <= INT64_MAX:
            raise bad(name, value, f"an integer in [{low}, 2**63-1]")
    if not 0 <= a.term <= TERM_MAX:
        raise bad("term", a.term, "an integer in [0, 2**62]")
    if not (math.isfinite(a.speed) and a.speed >= 0.0):
        raise bad("speed", a.speed, "a finite number >= 0")
    for m in a.models:
        if not 1 <= _utf8_len(m) <= MODEL_NAME_MAX_BYTES or "\x00" in m:
            raise bad("models", m, f"model names of 1-{MODEL_NAME_MAX_BYTES} bytes")


def _utf8_len(text: str) -> int:
    """Bytes of `text` in UTF-8; a huge number for text that has none (lone surrogates)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return INT64_MAX


# --- TXT ------------------------------------------------------------------------------------------

# Short TXT key per field, in the order they are written (models come last, as m0, m1, ...).
_TXT_KEYS: Tuple[Tuple[str, str], ...] = (
    ("node_id", "id"), ("cluster", "cl"), ("protocol_version", "pv"), ("port", "p"),
    ("heartbeat_port", "hp"), ("address", "a"), ("available_ram_bytes", "ram"),
    ("free_swap_bytes", "swp"), ("memlock_limit_bytes", "mlk"), ("cores", "c"), ("speed", "s"),
    ("coordinator_only", "co"), ("never_root", "nr"), ("term", "t"), ("root_id", "r"),
    ("instance", "i"), ("revision", "rv"), ("control_port", "cp"), ("http_port", "wp"),
    ("state", "st"), ("last_exit", "lx"),
)
_REQUIRED_TXT_KEYS = ("id", "cl", "p", "hp")


def _txt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def encode_txt(advert: NodeAdvert, budget_bytes: int = TXT_BUDGET_BYTES) -> bytes:
    """The advert as a DNS-SD TXT record (raw rdata: length-prefixed strings).

    Every field but the models is always written; models follow as m0, m1, ... while the
    record stays within budget_bytes, and `mn` holds how many the node has.
    """
    strings: List[bytes] = [f"v={TXT_FORMAT_VERSION}".encode()]
    for name, key in _TXT_KEYS:
        value = getattr(advert, name)
        if value == "":
            continue
        strings.append(f"{key}={_txt_value(value)}".encode())
    strings.append(f"mn={len(advert.models)}".encode())
    for s in strings:
        if len(s) > TXT_STRING_MAX_BYTES:     # cannot happen for a validated advert
            raise UsageError(f"TXT string {s[:20]!r}...: {len(s)} bytes, at most "
                             f"{TXT_STRING_MAX_BYTES}")
    used = sum(1 + len(s) for s in strings)
    if used > budget_bytes:
        raise UsageError(f"TXT record of node {advert.node_id}: {used} bytes without models, "
                         f"budget {budget_bytes}")
    for i, model in enumerate(advert.models):
        s = f"m{i}={model}".encode()
        if used + 1 + len(s) > budget_bytes:
            break
        strings.append(s)
        used += 1 + len(s)
    return b"".join(bytes((len(s),)) + s for s in strings)


def split_txt(text: bytes) -> List[bytes]:
    """Raw TXT rdata -> its strings. Raises ProtocolError when a length runs past the end."""
    strings: List[bytes] = []
    pos = 0
    while pos < len(text):
        n = text[pos]
        if pos + 1 + n > len(text):
            raise ProtocolError(f"TXT record: string at byte {pos} claims {n} bytes, "
                                f"{len(text) - pos - 1} remain")
        strings.append(text[pos + 1:pos + 1 + n])
        pos += 1 + n
    return strings


def txt_pairs(text: bytes) -> Dict[str, str]:
    """Raw TXT rdata -> {key: value} (keys lowercased, first occurrence wins, strings
    without '=' and empty keys skipped). Raises ProtocolError on bytes that are not UTF-8."""
    pairs: Dict[str, str] = {}
    for s in split_txt(text):
        key, sep, value = s.partition(b"=")
        if not sep or not key:
            continue
        try:
            k, v = key.decode("ascii").lower(), value.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"TXT record: string {s[:40]!r} is not UTF-8") from None
        pairs.setdefault(k, v)
    return pairs


def _parse_int(key: str, value: str) -> int:
    if not _DECIMAL_RE.match(value):
        raise ProtocolError(f"TXT key {key}={value!r:.40}: expected a decimal integer")
    return int(value)


def decode_txt(text: bytes) -> NodeAdvert:
    """Raw TXT rdata -> NodeAdvert. Raises ProtocolError naming the first problem."""
    pairs = txt_pairs(text)
    version = pairs.get("v")
    if version is None:
        raise ProtocolError("TXT record: key v (format version) is missing: not a dllama node")
    if _parse_int("v", version) != TXT_FORMAT_VERSION:
        raise ProtocolError(f"TXT record: format version {version}, this node reads "
                            f"{TXT_FORMAT_VERSION}: upgrade the older node")
    for key in _REQUIRED_TXT_KEYS:
        if key not in pairs:
            raise ProtocolError(f"TXT record: key {key} is missing")
    kwargs: Dict[str, Any] = {}
    for name, key in _TXT_KEYS:
        if key not in pairs:
            continue
        value = pairs[key]
        kind = _FIELD_TYPES[name]
        if kind is str:
            kwargs[name] = value
        elif kind is bool:
            if value not in ("0", "1"):
                raise ProtocolError(f"TXT key {key}={value!r:.40}: expected 0 or 1")
            kwargs[name] = value == "1"
        elif kind is float:
            try:
                kwargs[name] = float(value)
            except ValueError:
                raise ProtocolError(f"TXT key {key}={value!r:.40}: expected a number") from None
        else:
            kwargs[name] = _parse_int(key, value)
    n_models = _parse_int("mn", pairs.get("mn", "0"))
    models = []
    for i in range(max(0, min(n_models, TXT_BUDGET_BYTES))):
        model = pairs.get(f"m{i}")
        if model is None:
            break
        models.append(model)
    kwargs["models"] = models
    try:
        return NodeAdvert(**kwargs)
    except UsageError as e:
        raise ProtocolError(f"TXT record: {e}") from None


def txt_models_complete(text: bytes) -> Optional[bool]:
    """Whether a TXT record lists every model its node has (None when unreadable)."""
    try:
        pairs = txt_pairs(text)
        n_models = _parse_int("mn", pairs.get("mn", "0"))
    except ProtocolError:
        return None
    return all(f"m{i}" in pairs for i in range(n_models))


__all__ = ["NodeAdvert", "TXT_BUDGET_BYTES", "TXT_FORMAT_VERSION", "TXT_STRING_MAX_BYTES",
           "decode_txt", "encode_txt", "split_txt", "txt_models_complete", "txt_pairs"]
