"""How a control message's JSON payload is checked: the types of cluster/protocol.py's
messages are the schema.

A message is a frozen dataclass; its fields' annotations say what a field holds (int,
float, bool, str, Optional[...], Tuple[X, ...], or another dataclass) and field metadata
(`checked(...)`) adds bounds, a set of allowed values, whether a None is left out of the
payload, and a codec for a value that has its own JSON form (a SliceSpec, a ModelConfig).

from_payload() reads a received object and refuses a missing, mistyped or out-of-range
field with a ProtocolError naming the peer, the message, the field and the value
("node 10.0.0.2:7321: LOADED field 'weights_bytes' is -5, expected an integer in
[0, 2**63 - 1]"). Integers are 64-bit: nothing that counts bytes may wrap. Fields a
payload has beyond the declared ones are ignored, as before (a newer peer may add some).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Callable, Dict, Optional, Sequence

from dllama_node.common.errors import ProtocolError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_SHOWN_CHARS = 80                       # of a refused value, in the error


def checked(default: Any = dataclasses.MISSING, *, min: Optional[float] = None,
            max: Optional[float] = None, choices: Optional[Sequence[str]] = None,
            omit_none: bool = False, encode: Optional[Callable[[Any], Any]] = None,
            decode: Optional[Callable[[Any], Any]] = None) -> Any:
    """A dataclass field with its checks. decode(json value) -> value may raise
    KeyError/TypeError/ValueError, refused as the field's error; omit_none leaves the
    key out of the payload when the value is None (the field was optional on the wire)."""
    meta = {"min": min, "max": max, "choices": tuple(choices) if choices else None,
            "omit_none": omit_none, "encode": encode, "decode": decode}
    return dataclasses.field(default=default, metadata=meta)


def byte_count(default: Any = dataclasses.MISSING) -> Any:
    """A number of bytes: a 64-bit integer, never negative."""
    return checked(default, min=0)


class FieldError(Exception):
    """One field refused: its path inside the payload, the value and what was expected."""

    def __init__(self, path: str, value: Any, expected: str):
        super().__init__(path)
        self.path, self.value, self.expected = path, value, expected

    def describe(self) -> str:
        if self.value is dataclasses.MISSING:
            return f"has no field {self.path!r}"
        shown = repr(self.value)
        if len(shown) > _SHOWN_CHARS:
            shown = shown[:_SHOWN_CHARS] + "..."
        return f"field {self.path!r} is {shown}, expected {self.expected}"


def to_payload(obj) -> dict:
    """A declared dataclass -> its JSON object."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        if value is None and meta.get("omit_none"):
            continue
        out[f.name] = meta["encode"](value) if meta.get("encode") else _plain(value)
    return out


def _plain(value):
    if dataclasses.is_dataclass(value):
        return to_payload(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def from_payload(cls, obj, message: str, peer: str):
    """The declared dataclass `cls` read from a received JSON object, every field checked;
    a ProtocolError names the peer, the message and the field."""
    try:
        return _read_dataclass(cls, obj, "")
    except FieldError as e:
        raise ProtocolError(f"node {peer}: {message} {e.describe()}") from None


def read_declared(cls, obj):
    """A plain dataclass (not a message) read and checked the same way, for a decode
    codec; a FieldError names the field inside it."""
    return _read_dataclass(cls, obj, "")


def _read_dataclass(cls, obj, prefix: str):
    if not isinstance(obj, dict):
        raise FieldError(prefix or "(payload)", obj, "a JSON object")
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FieldError(path, dataclasses.MISSING, "")
            continue
        values[f.name] = _read(hints[f.name], obj[f.name], path, f.metadata)
    return cls(**values)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _read(tp, value, path: str, meta) -> Any:
    if typing.get_origin(tp) is typing.Union:          # Optional[X]
        if value is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if meta.get("decode"):
        try:
            return meta["decode"](value)
        except FieldError as e:
            inner = f"{path}.{e.path}" if e.path else path
            raise FieldError(inner, e.value, e.expected) from None
        except (KeyError, TypeError, ValueError) as e:
            raise FieldError(path, value, f"{tp.__name__} ({type(e).__name__}: {e})") from None
    if typing.get_origin(tp) is tuple:                  # Tuple[X, ...]
        if not isinstance(value, list):
            raise FieldError(path, value, "a JSON array")
        item = typing.get_args(tp)[0]
        return tuple(_read(item, v, f"{path}[{i}]", {}) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _read_dataclass(tp, value, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(path, value, "true or false")
        return value
    if tp is int:
        return _read_number(value, path, meta, integer=True)
    if tp is float:
        return _read_number(value, path, meta, integer=False)
    if tp is str:
        choices = meta.get("choices")
        if not isinstance(value, str) or (choices and value not in choices):
            raise FieldError(path, value, " or ".join(map(repr, choices)) if choices
                             else "a string")
        return value
    raise TypeError(f"field {path}: type {tp!r} has no reader")


def _read_number(value, path: str, meta, integer: bool):
    low = INT64_MIN if meta.get("min") is None else meta["min"]
    high = INT64_MAX if meta.get("max") is None else meta["max"]
    kinds = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds)
            or not (integer or math.isfinite(value)) or not low <= value <= high):
        bound = {INT64_MIN: "-2**63", INT64_MAX: "2**63 - 1"}
        what = "an integer" if integer else "a number"
        raise FieldError(path, value, f"{what} in [{bound.get(low, low)}, "
                                      f"{bound.get(high, high)}]")
    return value if integer else float(value)
