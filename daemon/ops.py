"""The control operations a daemon answers (daemon/control.py on the Unix socket,
daemon/forward.py between nodes). The root answers them itself; any other node forwards
the ones that need the root (generate, plan, models, the cluster's status) there.

    status   -> this node, the root, the term, every node's row (role, address, memory,
                slice as [start,stop) ranges, locked bytes, state), the plan and its table;
                asked on a worker, the root's answer with this node's id and the addresses
                the root does not know of itself
    generate -> {"prompt"} or {"messages"} with sampler settings and stop strings; streams
                {"token", "text"} lines, ends with text, tokens, prompt_tokens, finish_reason
                and its limit ("context" or "max_tokens"). Messages longer than the context
                lose their oldest turns (tokenizer/conversation_fit.py): a first line
                {"dropped_turns", "max_seq_len"} says how many
    models   -> the model files the cluster's nodes hold, by identity
    plan     -> a dry run: the plan for a model (this node's, or "model") and max_seq_len over
                the nodes present now, with its table
    ping     -> {"node_id"}: checks that a peer holds the cluster key (the handshake did that)
    progress -> this node's own slice load (daemon/load_progress.py), asked by the root;
                once loaded, with the bytes it locked in RAM
    report   -> how this node's previous run ended (kind, message, fixes, journal fields)
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, List, Optional

from dllama_node.common.errors import ClusterError, DllamaError, UsageError
from dllama_node.daemon import journal
from dllama_node.daemon.forward import forward

if TYPE_CHECKING:                                  # pragma: no cover
    from dllama_node.daemon.service import NodeService

log = logging.getLogger(__name__)

ROOT_OPS = ("generate", "plan", "models")


def locked_bytes_by_node(loading: Optional[dict]) -> dict:
    """node id -> bytes it locked in RAM, from the loading view's finished rows (a node
    reports them with the end of its load); nodes that did not say are left out."""
    rows = (loading or {}).get("nodes") or ()
    return {r["node_id"]: r["locked_bytes"] for r in rows
            if type(r.get("locked_bytes")) is int and r.get("node_id")}


def with_addresses(rows: List[dict], addresses: dict) -> List[dict]:
    """The root's rows with the addresses it does not know (its own) filled in from what the
    asking node reaches; rows that have one keep it."""
    return [dict(r, address=r.get("address") or addresses.get(r.get("node_id"), "")) for r in rows]


class ControlOps:
    def __init__(self, service: "NodeService"):
        self.s = service
        self.last_decode_tok_s: Optional[float] = None

    def handlers(self) -> dict:
        return {"status": self.status, "generate": self.generate, "models": self.models,
                "plan": self.plan, "ping": self.ping, "report": self.report,
                "progress": self.progress}

    # ---- routing ---------------------------------------------------------------------
    def _is_root(self) -> bool:
        return self.s.election.root_id == self.s.config.node_id

    async def _to_root(self, request: dict, emit) -> dict:
        """Forward to the root; its final line is returned (an error stays an error)."""
        s = self.s
        root_id = s.election.root_id
        advert = next((a for a in s.discovery.peers() if a.node_id == root_id), None) \
            if s.discovery and root_id else None
        if advert is None:
            raise ClusterError(f"node {s.config.node_id} knows no root yet (state {s.state}): "
                               "wait for the election, or see `dllama-ctl status`")
        if not advert.control_port:
            raise ClusterError(f"root {root_id} advertises no control port (an older version?)")
        answer = await forward(advert.address, advert.control_port, s.key, s.config.cluster,
                               s.config.node_id, dict(request, forwarded_by=s.config.node_id),
                               emit)
        answer.pop("done", None)
        if "error" in answer:
            err = DllamaError(answer["error"])
            err.exit_code = int(answer.get("exit_code", 6))
            raise err
        return answer

    # ---- ops ---------------------------------------------------------------------------
    async def ping(self, request: dict, emit) -> dict:
        return {"node_id": self.s.config.node_id, "state": self.s.state}

    async def progress(self, request: dict, emit) -> dict:
        own = self.s.loading.get(self.s.config.node_id)
        return {"node_id": self.s.config.node_id, "load": own.to_dict() if own else None}

    async def loading_view(self) -> Optional[dict]:
        """On the root: every planned node's load of the plan loading now (or loaded last),
        its own record asked of it while it is not finished (daemon/load_progress.py)."""
        from dllama_node.daemon.load_progress import NodeLoad, loading_done, merge_loading
        s = self.s
        lp = s.load_plan
        if lp is None:
            return None
        # read before the rows: the root is set ready only after its own slice is locked,
        # so rows read after a True here show it finished (read after the workers' answers,
        # a True could come with a row of the root's read while it was still locking)
        ready = s.root is not None and s.root.ready
        if s.load_rows is not None:
            rows = s.load_rows
        else:
            me = s.config.node_id
            root_view = {n: s.loading.get(n) for n in lp["nodes"]}
            reports = {me: root_view.get(me)}
            adverts = {a.node_id: a for a in s.trusted_peers()} if s.discovery else {}
            ask = [n for n in lp["nodes"] if n != me and n in adverts
                   and not (root_view.get(n) and root_view[n].finished)]

            async def ask_one(node_id: str):
                a = adverts[node_id]
                try:
                    answer = await forward(a.address, a.control_port, s.key, s.config.cluster,
                                           me, {"op": "progress"}, _ignore, timeout_s=3,
                                           who=f"node {node_id}")
                except (DllamaError, OSError, asyncio.TimeoutError) as e:
                    log.debug("node %s did not say how far it is: %s", node_id, e)
                    return node_id, None
                load = answer.get("load")
                return node_id, NodeLoad.from_dict(load) if isinstance(load, dict) else None
            for node_id, load in await asyncio.gather(*(ask_one(n) for n in ask)):
                reports[node_id] = load
            merged = merge_loading(lp["load_id"], lp["planned"], root_view, reports)
            rows = {n: merged[n] for n in lp["nodes"]}
            if loading_done(rows) and ready:
                s.load_rows = rows            # finished: nothing more to ask
        return {"load_id": lp["load_id"], "plan_table": lp["plan_table"], "done": ready,
                "nodes": [r.to_dict() for r in rows.values()]}

    async def report(self, request: dict, emit) -> dict:
        """How this node's previous run ended (daemon/oom_diagnosis.py), when badly."""
        d = getattr(self.s, "diagnosis", None)
        if d is None:
            return {"node_id": self.s.config.node_id, "kind": None}
        return {"node_id": self.s.config.node_id, "kind": d.kind, "message": d.message,
                "fixes": list(d.fixes), "phase": d.phase, "fields": d.fields()}

    async def status(self, request: dict, emit) -> dict:
        s = self.s
        local = {"node_id": s.config.node_id, "state": s.state, "root_id": s.election.root_id,
                 "term": s.election.term, "last_error": s.last_error,
                 "peers": [a.to_dict() for a in s.discovery.peers()] if s.discovery else []}
        if self._is_root() or request.get("local") or not s.election.root_id:
            loading = await self.loading_view() if self._is_root() else None
            view = dict(local, **self.cluster_view(loading))
            if self._is_root():
                view["loading"] = loading
            return view
        try:
            remote = await self._to_root({"op": "status"}, emit)
        except ClusterError as e:
            return dict(local, plan=None, plan_table=None, nodes=self.node_rows(None),
                        loading=None, last_error=f"the root did not answer: {e}")
        rows = remote.get("nodes")
        if isinstance(rows, list):        # the root cannot know its own reachable address
            remote["nodes"] = with_addresses(rows, self.peer_addresses())
        return dict(remote, node_id=s.config.node_id, state=s.state, asked_root=True)

    def peer_addresses(self) -> dict:
        """node id -> "host:port" of the peers this node reaches."""
        peers = self.s.discovery.peers() if self.s.discovery else []
        return {a.node_id: f"{a.address}:{a.port}" for a in peers if a.address}

    def cluster_view(self, loading: Optional[dict] = None) -> dict:
        from dllama_node.plan import format_plan
        root = self.s.root
        plan = root.plan if root is not None and root.ready else None
        return {"plan": plan.to_dict() if plan else None,
                "plan_table": format_plan(plan) if plan else None,
                "nodes": self.node_rows(plan, locked_bytes_by_node(loading))}

    def node_rows(self, plan, locked: Optional[dict] = None) -> List[dict]:
        """One row per node this node knows, itself first. locked: node id -> the bytes it
        locked, as it reported at the end of its load (this node's own: its own record)."""
        from dllama_node.plan.table import slice_cell
        s = self.s
        locked = dict(locked or {}, **{s.config.node_id: s.locked_bytes})
        me = s.advert()
        adverts = [me.replace(state=s.state)] + (s.discovery.peers() if s.discovery else [])
        in_plan = {n.node_id: n for n in plan.nodes} if plan else {}
        excluded = {x.node_id: x.reason for x in plan.excluded} if plan else {}
        rows = []
        for a in adverts:
            n = in_plan.get(a.node_id)
            if a.node_id == s.election.root_id:
                role = "coordinator" if a.coordinator_only else "root"
            elif a.node_id in excluded:
                role = "excluded"
            elif n is not None:
                role = "worker"
            else:
                role = "standby"
            slice_text = (slice_cell(n.spec.q_heads, n.spec.ffn_rows, n.spec.vocab_rows)
                          if n is not None else "")
            locked_bytes = locked.get(a.node_id)
            rows.append({
                "node_id": a.node_id, "role": role,
                "address": f"{a.address}:{a.port}" if a.address else "",
                "available_ram_bytes": a.available_ram_bytes, "free_swap_bytes": a.free_swap_bytes,
                "memlock_limit_bytes": a.memlock_limit_bytes, "cores": a.cores, "speed": a.speed,
                "slice": slice_text, "planned_bytes": n.memory.total if n is not None else None,
                "locked": None if locked_bytes is None else locked_bytes > 0,
                "locked_bytes": locked_bytes,
                "tok_s": (self.last_decode_tok_s if role in ("root", "coordinator") else None),
                "state": a.state or "", "excluded_reason": excluded.get(a.node_id)})
        return rows

    async def models(self, request: dict, emit) -> dict:
        if not self._is_root():
            return await self._to_root(request, emit)
        s = self.s
        held = {}
        for a in [s.advert()] + s.discovery.peers():
            for m in a.models:
                held.setdefault(m, []).append(a.node_id)
        out = []
        for identity, nodes in sorted(held.items()):
            out.append({"id": identity, "identity": identity, "held_by": sorted(nodes),
                        "path": s.config.model if identity == s.model_identity else None,
                        "serving": bool(s.root is not None and s.root.ready
                                        and identity == s.model_identity)})
        return {"models": out}

    async def plan(self, request: dict, emit) -> dict:
        if not self._is_root() and not request.get("local"):
            return await self._to_root(request, emit)
        from dllama_node.cluster.planning import make_plan
        from dllama_node.model import open_model
        from dllama_node.plan import format_plan

        s = self.s
        path = request.get("model") or s.config.model
        if not path:
            raise UsageError("plan: this node holds no model file: give one (\"model\")")
        max_seq_len = int(request.get("max_seq_len") or 0) or (s.config.max_seq_len or None)
        caps = [s.capacity] + [s._capacity_with_override(a) for a in s.discovery.peers()]

        def work():
            with open_model(path) as m:
                return make_plan(m, caps, max_seq_len, allow_swap=s.config.allow_swap,
                                 batch=64)
        plan = await asyncio.get_running_loop().run_in_executor(None, work)
        return {"plan": plan.to_dict(), "table": format_plan(plan)}

    async def generate(self, request: dict, emit) -> dict:
        if not self._is_root():
            return await self._to_root(request, emit)
        s = self.s
        if s.root is None or not s.root.ready:
            raise ClusterError(f"node {s.config.node_id} is the root but not serving yet (state "
                               f"{s.state}{': ' + s.last_error if s.last_error else ''})")
        params = _generate_params(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work():
            from dllama_node.cluster.sync_tcp import NodeFailure
            from dllama_node.engine.generate_text import generate_text, outcome_of, sampled
            from dllama_node.engine.sampler import Sampler
            from dllama_node.tokenizer.conversation_fit import (AnswerBudget, answer_reserve,
                                                                fit_chat)
            with s.busy:
                root = s.root
                if root is None or not root.ready:
                    raise ClusterError("the cluster is re-planning: try again in a few seconds")
                tok = root.tokenizer
                seq_len = root.plan.max_seq_len
                dropped = 0
                if params["messages"] is not None:
                    ids, fit = fit_chat(tok, params["messages"], seq_len,
                                        answer_reserve(seq_len, params["max_tokens"]))
                    dropped = fit.dropped_turns
                elif params["prompt_tokens"] is not None:
                    ids = params["prompt_tokens"]
                else:
                    ids = tok.encode(params["prompt"])
                # a prompt that leaves no room: the session's error says what would help
                budget = AnswerBudget(params["max_tokens"], seq_len, len(ids))
                if dropped:
                    loop.call_soon_threadsafe(queue.put_nowait, {"dropped_turns": dropped,
                                                                 "max_seq_len": seq_len})
                events = generate_text(sampled(root, Sampler(params["sampler"])), tok, ids,
                                       budget, params["stop"], cancel)
                t0 = time.perf_counter()
                try:
                    outcome = outcome_of(events, lambda p: loop.call_soon_threadsafe(
                        queue.put_nowait, {"token": p.token, "text": p.text}))
                except NodeFailure as e:
                    journal.log_event("peer_vanished", str(e), node=e.node_id,
                                      phase=f"generation, layer {e.layer}")
                    s.members = ()          # re-plan on the next tick
                    raise
                if outcome.completion_tokens > 1:
                    self.last_decode_tok_s = (outcome.completion_tokens - 1) / max(
                        time.perf_counter() - t0 - root.session.timings.prompt_s, 1e-9)
                return {"prompt_tokens": [int(i) for i in ids], "tokens": outcome.tokens,
                        "text": outcome.text, "dropped_turns": dropped, **outcome.finish()}

        future = loop.run_in_executor(None, work)
        try:
            while not future.done() or not queue.empty():
                try:
                    await emit(await asyncio.wait_for(queue.get(), 0.1))
                except asyncio.TimeoutError:
                    pass
        except BaseException:
            cancel.set()          # the client went away: stop generating for it
            raise
        return await future


def _generate_params(r: dict) -> dict:
    """Validated generate parameters; UsageError names the field and the value."""
    from dllama_node.engine.sampler import SamplerSettings

    messages = r.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise UsageError("messages: expected a non-empty list of {role, content} objects")
    prompt = r.get("prompt", "")
    if not isinstance(prompt, str):
        raise UsageError(f"prompt: expected text, found {type(prompt).__name__}")
    tokens = r.get("prompt_tokens")
    if tokens is not None and not (isinstance(tokens, list) and tokens
                                   and all(isinstance(t, int) and t >= 0 for t in tokens)):
        raise UsageError("prompt_tokens: expected a non-empty list of token ids")
    max_tokens = r.get("max_tokens", 256)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise UsageError(f"max_tokens {max_tokens!r}: expected a whole number >= 0")
    stop = r.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise UsageError("stop: expected a string or a list of strings")

    def num(name, default, kind=float):
        v = r.get(name, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UsageError(f"{name} {v!r}: expected a number")
        return kind(v)
    seed = r.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UsageError(f"seed {seed!r}: expected a whole number")
    settings = SamplerSettings(temperature=num("temperature", 0.8), top_k=num("top_k", 40, int),
                               top_p=num("top_p", 0.95),
                               repetition_penalty=num("repetition_penalty", 1.0),
                               seed=seed).validate()
    return {"messages": messages, "prompt": prompt, "prompt_tokens": tokens,
            "max_tokens": max_tokens, "stop": stop, "sampler": settings}


async def _ignore(line: dict) -> None:
    pass
