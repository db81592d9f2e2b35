"""What the HTTP server generates with: one node or a cluster, behind one interface.

    class Backend:
        model_id: str                       # the name /v1/models lists
        tokenizer                           # encode, decode, encode_chat, eos_id, eot_ids
        max_seq_len: int                    # the context, prompt and answer together
        state() -> str                      # "serving", or why not ("planning", ...)
        generate(prompt_ids, max_tokens, sampler_settings, stop_ids, cancel) -> Iterator[int]
        metrics() -> dict

generate() is blocking: the server runs it in a thread, one generation at a time, and sets
`cancel` (a threading.Event) when the client goes away; it is checked between tokens.
metrics() is called from the event loop and must not block on a running generation:

    {"tokens_per_second": float,            # decode speed of the last generation
     "nodes": [{"node_id": str,
                "sync_ms": float,           # mean time per forward step spent in sync
                "memory_bytes": {"weights": int, "kv_cache": int, "planned": int,
                                 "rss": int}}]}
"""
from __future__ import annotations

import abc
import logging
import os
import threading
from typing import Callable, Iterator, Optional, Sequence, Union

from dllama_node.common.errors import DllamaError
from dllama_node.common.memory import current_rss_bytes
from dllama_node.engine.sampler import Sampler, SamplerSettings

log = logging.getLogger(__name__)

SINGLE_NODE_ID = "local"


class NotServing(DllamaError):
    """The backend has no model ready (the cluster is planning, loading or re-planning)."""

    def __init__(self, state: str):
        super().__init__(f"the model is not being served (state: {state})")
        self.state = state


def model_id_from_path(model_path: str) -> str:
    """The name a model file is served under: its file name without .gguf or .m."""
    name = os.path.basename(model_path)
    for ext in (".gguf", ".m"):
        if name.endswith(ext) and len(name) > len(ext):
            return name[:-len(ext)]
    return name


class Backend(abc.ABC):
    model_id: str = "model"

    @property
    @abc.abstractmethod
    def tokenizer(self): ...

    @property
    @abc.abstractmethod
    def max_seq_len(self) -> int: ...

    def state(self) -> str:
        return "serving"

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[int], max_tokens: int,
                 sampler_settings: SamplerSettings, stop_ids: Sequence[int],
                 cancel: threading.Event) -> Iterator[int]: ...

    def metrics(self) -> dict:
        return {"tokens_per_second": 0.0, "nodes": []}


RunnerSource = Union[object, Callable[[], Optional[object]]]


class EngineBackend(Backend):
    """A Backend over cluster/runners.py's runners: SingleRunner (engine.node.LocalNode) or
    ClusterRunner (cluster.root.ClusterRoot).

    runner: the runner, or a callable returning the current one (None while there is
        none: the daemon's root re-plans and replaces it).
    model_id: the name clients see in /v1/models and in answers.
    lock: held for the whole of each generation; pass the daemon's own lock when other
        work (a re-plan, the control socket's generate) shares the engine.
    state: a callable naming the owner's state when no runner is ready.
    """

    def __init__(self, runner: RunnerSource, model_id: str,
                 lock: Optional[threading.Lock] = None,
                 state: Optional[Callable[[], str]] = None):
        self._source = runner if callable(runner) else None
        self._runner = None if self._source else runner
        self.model_id = model_id
        self.lock = lock or threading.Lock()
        self._state = state
        self._last_tok_s = 0.0
        self._node_stats: dict = {}          # node_id -> SyncStats dict, refreshed after each run

    def runner(self):
        """The runner that can generate now; NotServing otherwise."""
        runner = self._source() if self._source else self._runner
        if runner is None or runner.session is None:
            raise NotServing(self._state() if self._state else "not ready")
        return runner

    def state(self) -> str:
        try:
            self.runner()
        except NotServing as e:
            return e.state
        return "serving"

    @property
    def tokenizer(self):
        return self.runner().tokenizer

    @property
    def max_seq_len(self) -> int:
        return int(self.runner().seq_len)

    def generate(self, prompt_ids, max_tokens, sampler_settings, stop_ids, cancel):
        sampler = Sampler(sampler_settings)
        with self.lock:
            runner = self.runner()
            vocab_limit = runner.tokenizer.vocab_size if runner.tokenizer is not None else None
            gen = runner.generate(list(prompt_ids), max_tokens, sampler, stop_ids,
                                  vocab_limit=vocab_limit)
            produced = 0
            try:
                for token in gen:
                    if cancel.is_set():
                        break
                    produced += 1
                    yield token
                    if cancel.is_set():      # before the next forward step
                        break
            finally:
                gen.close()
                if cancel.is_set():
                    log.info("generation cancelled after %d tokens", produced)
                self._after(runner)

    def _after(self, runner) -> None:
        """While still holding the lock: remember the speed and every node's sync figures
        (asking the workers over the data plane, which is idle now)."""
        session = runner.session
        if session is not None:
            self._last_tok_s = session.timings.decode_tok_s
        if getattr(runner, "sync_stats", None) is not None and session is not None:
            try:
                self._node_stats = runner.node_stats()
            except DllamaError as e:
                log.warning("node statistics not refreshed: %s", e)

    def metrics(self) -> dict:
        runner = self._source() if self._source else self._runner
        out = {"tokens_per_second": self._last_tok_s, "nodes": []}
        if runner is None:
            return out
        reports = list(getattr(runner, "reports", ()) or ())
        if not reports:                          # one node: what it holds, measured now
            out["nodes"].append({
                "node_id": SINGLE_NODE_ID, "sync_ms": 0.0,
                "memory_bytes": {"weights": int(runner.weights_bytes),
                                 "kv_cache": int(runner.kv_cache_bytes),
                                 "rss": current_rss_bytes()}})
            return out
        stats = dict(self._node_stats)
        root_stats = getattr(runner, "sync_stats", None)
        if root_stats is not None:                # the root's own figures are live
            stats[reports[0].node_id] = root_stats.to_dict()
        for i, r in enumerate(reports):
            st = stats.get(r.node_id, {})
            steps = st.get("steps", 0)
            out["nodes"].append({
                "node_id": r.node_id,
                "sync_ms": 1000.0 * st.get("sync_s", 0.0) / steps if steps else 0.0,
                "memory_bytes": {"weights": int(r.weights_bytes),
                                 "kv_cache": int(r.kv_cache_bytes),
                                 "planned": int(r.planned_bytes),
                                 "rss": current_rss_bytes() if i == 0 else int(r.rss_bytes)}})
        return out

