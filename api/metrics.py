"""Request counters and the Prometheus text exposition of /metrics (format 0.0.4).

    dllama_tokens_per_second                     gauge, decode speed of the last generation
    dllama_sync_ms{node="n0"}                    gauge, mean sync time per forward step
    dllama_memory_bytes{node="n0",kind="rss"}    gauge, kinds: weights kv_cache planned rss
    dllama_requests_total{endpoint=,code=}       counter, answered requests by HTTP status
    dllama_prompt_tokens_total                   counter
    dllama_completion_tokens_total               counter
    dllama_cancelled_total                       counter, generations stopped by a client leaving
    dllama_queue_waiting                         gauge, requests waiting for the engine
    dllama_generating                            gauge, 1 while a generation runs
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Dict, Iterable, List, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiCounters:
    """What the server counts; safe to update from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()       # (endpoint, code) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0

    def request(self, endpoint: str, code: int) -> None:
        with self._lock:
            self.requests[(endpoint, int(code))] += 1

    def tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += int(prompt_tokens)
            self.completion_tokens += int(completion_tokens)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1


def escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Dict[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


def _value(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class _Exposition:
    def __init__(self):
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[Tuple[Dict[str, object], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_value(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(counters: ApiCounters, backend_metrics: dict, waiting: int, generating: bool) -> str:
    """The /metrics page from the server's counters and Backend.metrics()."""
    out = _Exposition()
    nodes = backend_metrics.get("nodes", [])
    out.family("dllama_tokens_per_second", "gauge",
               "Decode speed of the last generation, tokens per second.",
               [({}, float(backend_metrics.get("tokens_per_second", 0.0)))])
    out.family("dllama_sync_ms", "gauge",
               "Mean time per forward step a node spends exchanging activations, ms.",
               [({"node": n["node_id"]}, float(n.get("sync_ms", 0.0))) for n in nodes])
    out.family("dllama_memory_bytes", "gauge",
               "Memory per node by kind: weights, kv_cache, planned (the plan's total), rss.",
               [({"node": n["node_id"], "kind": kind}, int(value))
                for n in nodes for kind, value in sorted(n.get("memory_bytes", {}).items())])
    with counters._lock:
        requests = sorted(counters.requests.items())
        prompt, completion, cancelled = (counters.prompt_tokens, counters.completion_tokens,
                                         counters.cancelled)
    out.family("dllama_requests_total", "counter",
               "HTTP requests answered, by endpoint and status (499: the client left).",
               [({"endpoint": e, "code": c}, n) for (e, c), n in requests])
    out.family("dllama_prompt_tokens_total", "counter", "Prompt tokens of served requests.",
               [({}, prompt)])
    out.family("dllama_completion_tokens_total", "counter", "Tokens generated for clients.",
               [({}, completion)])
    out.family("dllama_cancelled_total", "counter",
               "Generations stopped because their client went away.", [({}, cancelled)])
    out.family("dllama_queue_waiting", "gauge", "Requests waiting for the engine.",
               [({}, int(waiting))])
    out.family("dllama_generating", "gauge", "1 while a generation runs.",
               [({}, int(bool(generating)))])
    return out.text()
