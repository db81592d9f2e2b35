"""OpenAI-compatible request validation and response shapes (pure functions over dicts).

A request body is checked field by field; the first bad field raises ApiError with an
OpenAI-style error object that names the field (`param`) and the value found:

    {"error": {"message": "temperature 3.5: expected a number from 0 to 2",
               "type": "invalid_request_error", "param": "temperature", "code": null}}

Fields we accept: model (any string; answers name the served model), messages or prompt,
max_tokens (or max_completion_tokens), temperature [0, 2], top_p [0, 1], top_k (an
extension, as llama.cpp's server), repetition_penalty (extension), seed, stop (a string
or up to 4), stream, stream_options.include_usage, n (1 only), frequency_penalty and
presence_penalty (0 only), user (ignored), truncate (an extension, chat only: true by
default, the oldest turns of a conversation longer than the context are left out, as
tokenizer/conversation_fit.py decides; false answers 400 instead). Other fields are ignored.
Values left out take the engine's sampler defaults (engine/sampler.py), not OpenAI's.
"""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from dllama_node.engine.sampler import SamplerSettings

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}         # OpenAI's newer name for the system role
MAX_STOP_STRINGS = 4
DEFAULT_COMPLETION_MAX_TOKENS = 16            # /v1/completions, as OpenAI's default
_DEFAULTS = SamplerSettings()
# /v1/completions fields we cannot honour, with the values that mean "off"
UNSUPPORTED_COMPLETION_FIELDS = {"echo": (None, False), "logprobs": (None,), "best_of": (None, 1),
                                 "suffix": (None, "")}


class ApiError(Exception):
    """An error answered with an OpenAI-style error object and an HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type_: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Sequence = ()):
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type_, code
        self.headers = list(headers)

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad(param: Optional[str], message: str) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class CompletionRequest:
    """A validated request. Exactly one of messages (chat) and prompt (text or ids)."""

    chat: bool
    messages: List[Dict[str, str]] = field(default_factory=list)
    prompt: Any = None                     # str, or a list of token ids
    max_tokens: Optional[int] = None       # None: as many as the context leaves
    sampler: SamplerSettings = _DEFAULTS
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: Optional[str] = None
    truncate: bool = True                  # leave the oldest turns out rather than refuse


def _number(body: dict, name: str, low: float, high: float, default: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"{name} {value!r}: expected a number")
    if value < low or value > high or (low_open and value == low):
        lo = "(" if low_open else "["
        raise bad(name, f"{name} {value}: expected a number in {lo}{low:g}, {high:g}]")
    return float(value)


def _int(body: dict, name: str, low: int, high: int, default: Optional[int]) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"{name} {value!r}: expected an integer")
    if not low <= value <= high:
        raise bad(name, f"{name} {value}: expected an integer from {low} to {high}")
    return value


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}[{i}]", f"{where}[{i}] of type {kind!r}: only text parts "
                                           "({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, f"{where} {value!r}: expected a string or a list of text parts")


def _messages(body: dict) -> List[Dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "messages is missing: expected a list of {role, content} objects")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"messages {str(messages)[:80]}: expected a non-empty list of "
                              "{role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] {str(m)[:80]!r}: expected an object "
                                        "with role and content")
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role {m.get('role')!r}: expected "
                                             f"one of {', '.join(ROLES)}")
        if "content" not in m:
            raise bad(f"messages[{i}].content", f"messages[{i}].content is missing")
        out.append({"role": role, "content": _content(m["content"], f"messages[{i}].content")})
    return out


def _prompt(body: dict) -> Any:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "prompt is missing: expected a string")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if (isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return list(prompt)
    raise bad("prompt", f"prompt {str(prompt)[:80]}: expected a string, a list of one "
                        "string, or a list of token ids (one prompt per request)")


def _stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) for s in stop)):
        raise bad("stop", f"stop {str(stop)[:80]}: expected a string or a list of up to "
                          f"{MAX_STOP_STRINGS} strings")
    return [s for s in stop if s]


def parse_request(body: Any, chat: bool, max_seq_len: int) -> CompletionRequest:
    """Validate a /v1/chat/completions (chat=True) or /v1/completions body."""
    if not isinstance(body, dict):
        raise bad(None, f"the request body is {type(body).__name__}: expected a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"model {model!r}: expected a string")
    req = CompletionRequest(chat=chat, model=model)
    if chat:
        req.messages = _messages(body)
        if body.get("logprobs") not in (None, False):
            raise bad("logprobs", f"logprobs {body['logprobs']!r}: not supported by this server")
    else:
        req.prompt = _prompt(body)
        for name, allowed in UNSUPPORTED_COMPLETION_FIELDS.items():
            if name in body and body[name] not in allowed:
                raise bad(name, f"{name} {body[name]!r}: not supported by this server")
    if body.get("n") not in (None, 1):
        raise bad("n", f"n {body['n']!r}: this server gives one choice per request (n=1)")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise bad(name, f"{name} {body[name]}: only 0 is supported (use "
                            "repetition_penalty)")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    default = None if chat else DEFAULT_COMPLETION_MAX_TOKENS
    req.max_tokens = _int(body, key, 1, max_seq_len, default)
    temperature = _number(body, "temperature", 0.0, 2.0, _DEFAULTS.temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, _DEFAULTS.top_p)
    top_k = _int(body, "top_k", 0, 1 << 31, _DEFAULTS.top_k)
    penalty = _number(body, "repetition_penalty", 0.0, 100.0, _DEFAULTS.repetition_penalty,
                      low_open=True)
    seed = _int(body, "seed", -(1 << 63), (1 << 64) - 1, None)
    if seed is not None and seed < 0:
        seed += 1 << 64                     # OpenAI seeds are signed 64-bit integers
    if top_p == 0.0:                        # only the most likely token
        top_p = 1e-9
    req.sampler = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=penalty, seed=seed).validate()
    req.stop = _stop(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", f"stream {stream!r}: expected true or false")
    req.stream = bool(stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", f"stream_options {options!r}: expected an object")
    req.include_usage = bool(options.get("include_usage", False))
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool) and truncate is not None:
        raise bad("truncate", f"truncate {truncate!r}: expected true or false")
    req.truncate = truncate is not False
    return req


# ---- response shapes ---------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(chat: bool, id_: str, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int,
                    created: Optional[int] = None) -> dict:
    """The whole answer of a non-streamed request."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": id_, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()) if created is None else created, "model": model,
            "system_fingerprint": None, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(chat: bool, id_: str, model: str, created: int, text: Optional[str] = None,
               finish_reason: Optional[str] = None, role: bool = False,
               usage_: Optional[dict] = None) -> dict:
    """One streamed chunk: a piece of text, the opening role (chat), the finish reason, or
    (usage_ given) the closing usage chunk with no choices."""
    if usage_ is not None:
        choices = []
    elif chat:
        delta: Dict[str, str] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None,
                    "finish_reason": finish_reason}]
    out = {"id": id_, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": created, "model": model, "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def models_body(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_body(model_id, created)]}


def model_body(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "dllama-node"}
