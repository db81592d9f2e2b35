"""One dllama-node: finds its peers, takes part in the election, and either serves as
the root (plans, negotiates, drives generation) or as a worker (runs its slice).

Control plane: this asyncio loop -- discovery, heartbeats, election, plan decisions,
sd_notify, the control socket. Data plane: cluster/worker.py's server in a thread (this
node as a worker) and cluster/root.py (this node as the root), both blocking code run
off the loop. Decisions are the pure functions of daemon/election.py and plan/; this
module applies them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Dict, List, Optional, Set

from dllama_node.cluster.auth import read_key
from dllama_node.cluster.root import ClusterRoot, PlanRejected, WorkerAddress
from dllama_node.cluster.run_options import RunOptions
from dllama_node.cluster.worker import Worker
from dllama_node.common.errors import ClusterError, DllamaError, UsageError
from dllama_node.common.tasks import cancel_and_wait
from dllama_node.daemon import journal, systemd
from dllama_node.daemon.capacity import measure_capacity
from dllama_node.daemon.config import ConfigSource, DaemonConfig
from dllama_node.daemon.control import ControlServer
from dllama_node.daemon.election import Action, ElectionState, PeerView, decide
from dllama_node.daemon.forward import ForwardServer, forward
from dllama_node.daemon.load_progress import LoadProgress
from dllama_node.daemon.membership import Membership, last_exit_text
from dllama_node.daemon.ops import ControlOps
from dllama_node.daemon.run_record import start_run
from dllama_node.daemon.resources import lock_memory, raise_priority
from dllama_node.discovery.service import Discovery, DiscoveryConfig
from dllama_node.discovery.txt import LAST_EXIT_MAX_BYTES, NodeAdvert
from dllama_node.engine.kv_cache import KVCache
from dllama_node.plan import NodeCapacity, format_plan

log = logging.getLogger("dllama_node.node")

TICK_S = 0.25
SETTLE_S = 2.0          # listen for peers this long before the first election
RETRY_S = 15.0          # a plan that failed is tried again after this, or when peers change


def capacity_of(advert: NodeAdvert) -> NodeCapacity:
    return NodeCapacity(advert.node_id, advert.available_ram_bytes, advert.free_swap_bytes,
                        advert.memlock_limit_bytes, advert.cores, advert.speed,
                        advert.coordinator_only)


class NodeService:
    """config: the settings it starts with; source: where they came from (the file and
    the flags), reloaded on SIGHUP."""

    def __init__(self, config: DaemonConfig, source: Optional[ConfigSource] = None):
        self.config = config
        self.source = source or ConfigSource()
        self.state = "starting"
        self.election = ElectionState()
        self.root: Optional[ClusterRoot] = None
        self.members: tuple = ()             # worker ids the running plan was made for
        self.overrides: Dict[str, int] = {}  # node -> available bytes it reported on rejecting
        self.busy = threading.Lock()         # one start or generation at a time
        self.stopping = asyncio.Event()
        self.reload_requested = False
        self.discovery: Optional[Discovery] = None
        self.last_error = ""
        self.failed: tuple = ((), 0.0)       # (members, when) of the last failed start
        self.ops = ControlOps(self)
        self.membership = Membership()
        self.refused: Dict[str, str] = {}    # instance -> why (wrong key): left out of plans
        self.verified: set = set()           # instances that proved they hold the key
        self.probing: set = set()
        self.tasks: Set[asyncio.Task] = set()  # key probes, reports: cancelled at stop
        self.locked_bytes: Optional[int] = None  # of its slice locked in RAM; None: not tried
        self.control_port = 0
        self.http_port = 0
        self.last_exit = ""
        self.loading = LoadProgress()        # slice loads: this node's own, and on the root
        self.load_plan: Optional[dict] = None  # the plan loading or loaded: load_id, planned
        self.load_rows: Optional[dict] = None  # its rows once every node finished

    # ---- start-up ------------------------------------------------------------------
    def _prepare(self) -> None:
        c = self.config
        os.makedirs(c.state_dir, exist_ok=True)
        self.run_record, diagnosis = start_run(c.state_dir, c.node_id)
        self.diagnosis = diagnosis
        if diagnosis is not None:         # start_run logged it; peers learn it from the advert
            self.last_exit = last_exit_text(diagnosis.kind, diagnosis.message, LAST_EXIT_MAX_BYTES)
        self.key = read_key(c.key_file)
        self.capacity = measure_capacity(c.node_id, c.state_dir, n_threads=c.threads or None,
                                         coordinator_only=c.coordinator_only)
        self.model_identity = ""
        if c.model:
            from dllama_node.cluster.slices import model_identity
            from dllama_node.model import open_model
            with open_model(c.model) as m:
                self.model_identity = model_identity(m)
        prio = raise_priority(c.nice, node_id=c.node_id)
        log.info("priority: %s", prio.to_dict())
        host, port = c.listen_host_port
        self.worker = Worker(host, port, c.node_id, self.key, c.cluster,
                             state_dir=c.state_dir, on_loaded=self._worker_loaded,
                             on_assigned=self._assigned, on_progress=self._worker_progress)
        self.port = port or int(self.worker.address.rpartition(":")[2])

    def _assigned(self, a) -> None:
        """A root gave this node a slice (a cluster/protocol.py Assign): the run record says
        so (a later OOM kill is then reported with what the slice needed and what a shorter
        context would save)."""
        kv_dim = a.slice.n_kv_heads * a.config.head_dim
        self.run_record.update(phase="loading", planned_bytes=a.planned_bytes,
                               available_bytes=self.capacity.available_ram_bytes,
                               max_seq_len=a.seq_len,
                               kv_bytes_per_token=2 * a.config.n_layers * kv_dim
                               * KVCache.BYTES_PER_VALUE)
        self.loading.begin(self.config.node_id, a.load_id, 0)

    def _worker_progress(self, phase: str, done: int, total: int) -> None:
        me = self.config.node_id
        if phase in ("kept", "failed"):
            self.loading.finish(me, phase)
        else:
            self.loading.update(me, phase, done, total)

    def _on_plan(self, plan, load_id: str) -> None:
        """The root made a plan and is about to load it: a row per node for the bars."""
        self.load_rows = None
        self.load_plan = {"load_id": load_id, "nodes": [n.node_id for n in plan.nodes],
                          "planned": {n.node_id: n.memory.weights for n in plan.nodes},
                          "plan_table": format_plan(plan)}
        for n in plan.nodes:
            self.loading.begin(n.node_id, load_id, n.memory.weights)

    def _root_read(self, done: int, total: int) -> None:
        me = self.config.node_id
        if done >= total:
            self.loading.finish(me, "loaded")      # locked later, once every slice loaded
        else:
            self.loading.update(me, "reading", done, total)

    def _worker_loaded(self, transformer) -> None:
        loaded = self.worker.loaded
        self._lock_slice(transformer, loaded.source if loaded is not None else "")

    def _lock_slice(self, transformer, source: str = "file") -> None:
        self.run_record.update(phase="serving")
        me = self.config.node_id
        own = self.loading.get(me)
        source = _SOURCES.get(source, "")
        if not self.config.lock_memory:
            self.loading.finish(me, "loaded", source)
            return
        self.loading.update(me, "locking", own.done if own else 0)
        try:
            self._lock_arrays(transformer)
        finally:
            self.loading.finish(me, "loaded", source, locked_bytes=self.locked_bytes)

    def _lock_arrays(self, transformer) -> None:
        arrays = [transformer.cache.data] + transformer.w.matrices()
        result = lock_memory([a for a in arrays if a.size], node_id=self.config.node_id)
        self.locked_bytes = result.locked_bytes
        log.info("memory lock: %s", result.to_dict())

    def advert(self) -> NodeAdvert:
        c, cap = self.config, self.capacity
        return NodeAdvert(node_id=c.node_id, cluster=c.cluster, port=self.port,
                          heartbeat_port=self.port, available_ram_bytes=cap.available_ram_bytes,
                          free_swap_bytes=cap.free_swap_bytes,
                          memlock_limit_bytes=cap.memlock_limit_bytes, cores=cap.cores,
                          speed=cap.speed,
                          models=(self.model_identity,) if self.model_identity else (),
                          coordinator_only=c.coordinator_only, never_root=c.never_root,
                          control_port=self.control_port, http_port=self.http_port,
                          state=_state_word(self.state),
                          last_exit=self.last_exit)

    # ---- the loop ------------------------------------------------------------------
    async def run(self) -> None:
        self._prepare()
        threading.Thread(target=self.worker.serve_forever, name="data-plane",
                         daemon=True).start()
        loop = self.loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        c = self.config
        dconf = DiscoveryConfig(static_peers=tuple(_endpoint(p) for p in c.static_peers),
                                mdns=c.mdns, interfaces=list(c.interfaces) or None,
                                interval_s=c.heartbeat_interval_s,
                                timeout_s=c.heartbeat_timeout_s)
        control = ControlServer(c.control_socket, self.ops.handlers())
        host, port = c.listen_host_port
        forward_server = ForwardServer(host, port + 1 if port else 0, self.key, c.cluster,
                                       c.node_id, self.ops.handlers())
        self.control_port = await forward_server.start()
        api = await self._start_api()
        async with Discovery(self.advert(), dconf) as discovery:
            self.discovery = discovery
            await control.start()
            self._set_state("discovering")
            systemd.ready(f"discovering peers of cluster {c.cluster}")
            started = time.monotonic()
            interval = systemd.watchdog_interval_s()
            last_ping = 0.0
            try:
                while not self.stopping.is_set():
                    if interval and time.monotonic() - last_ping >= interval / 2:
                        systemd.watchdog_ping()       # from the loop that does the work
                        last_ping = time.monotonic()
                    if self.reload_requested:
                        self._reload()
                    if time.monotonic() - started >= SETTLE_S:
                        await self._tick()
                    try:
                        await asyncio.wait_for(self.stopping.wait(), TICK_S)
                    except asyncio.TimeoutError:
                        pass
            finally:
                systemd.stopping("stopping")
                await self._cancel_tasks()
                await control.stop()
                await forward_server.stop()
                if api is not None:
                    await api.stop()
                await loop.run_in_executor(None, self._close_root)
                self.run_record.finish()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        """Run coro on the loop as a task this service keeps until it ends, so that
        stopping can cancel it and wait for it (python-zeroconf's rule: no task is left
        to the garbage collector or to outlive the loop)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _cancel_tasks(self) -> None:
        """Cancel every task of this service and wait until each has ended."""
        await cancel_and_wait(list(self.tasks))
        self.tasks.clear()

    async def _start_api(self):
        """The OpenAI-compatible HTTP API on every node; it generates only on the root (the
        others answer 503 naming the root, whose address the mDNS advert gives)."""
        where = self.config.http_host_port
        if where is None:
            return None
        from dllama_node.api.backend import EngineBackend, model_id_from_path
        from dllama_node.api.server import ApiConfig, ApiServer
        from dllama_node.cluster.runners import ClusterRunner

        def runner():
            root = self.root
            return ClusterRunner(root) if root is not None and root.ready else None

        def state():
            if self.election.root_id and self.election.root_id != self.config.node_id:
                return f"not the root: ask node {self.election.root_id}"
            return "serving" if self.root is not None and self.root.ready else self.state
        model_id = model_id_from_path(self.config.model) if self.config.model else "dllama"
        backend = EngineBackend(runner, model_id, lock=self.busy, state=state)
        api = ApiServer(backend, ApiConfig(host=where[0], port=where[1], key=self.key,
                                           queue_size=self.config.http_queue))
        try:
            await api.start()
        except OSError as e:
            log.error("HTTP API not started on %s:%d: %s", where[0], where[1], e.strerror)
            return None
        self.http_port = api.port
        log.info("HTTP API at %s", api.url)
        return api

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            log.info("state: %s%s", state, f" ({detail})" if detail else "")
        self.state = state
        systemd.status(f"{state}{': ' + detail if detail else ''}")
        if self.discovery is not None and self.discovery.advert.state != _state_word(state):
            update = lambda: self.discovery.update_advert(state=_state_word(state))  # noqa: E731
            if threading.current_thread() is threading.main_thread():
                update()
            else:                                # from the blocking start, in a worker thread
                self.loop.call_soon_threadsafe(update)

    def _request_reload(self) -> None:
        self.reload_requested = True

    def _reload(self) -> None:
        self.reload_requested = False
        systemd.reloading("reloading configuration")
        try:
            new = self.source.load()
        except UsageError as e:
            log.error("reload refused: %s", e)
        else:
            self.config = new
            self.members = ()       # re-plan with the new settings
            log.info("configuration reloaded")
        systemd.ready(self.state)

    # ---- election and planning -------------------------------------------------------
    def _views(self, now: float) -> List[PeerView]:
        me = PeerView(self.config.node_id, self.capacity.available_ram_bytes,
                      bool(self.model_identity), self.config.never_root,
                      self.config.coordinator_only, self.election.term,
                      self.election.root_id, True, now)
        views = [me]
        table = self.discovery.table
        for a in self.trusted_peers():
            entry = table.entry(a.node_id)
            views.append(PeerView(a.node_id, a.available_ram_bytes, bool(a.models),
                                  a.never_root, a.coordinator_only, a.term, a.root_id or None,
                                  True, entry.heard_s if entry else None))
        return views

    def trusted_peers(self) -> List[NodeAdvert]:
        """The peers that proved they hold the cluster key (the others are not members)."""
        return [a for a in self.discovery.peers() if a.instance in self.verified]

    async def _probe(self, a: NodeAdvert) -> None:
        """Check once per instance that a peer holds the cluster key: a mutual challenge-
        response on its control port. A peer without it is left out, with the reason."""
        async def ignore(line):
            pass
        try:
            if not a.control_port:
                raise ClusterError("it advertises no control port (an older version?)")
            await forward(a.address, a.control_port, self.key, self.config.cluster,
                          self.config.node_id, {"op": "ping"}, ignore, timeout_s=10,
                          who=f"node {a.node_id}")
        except DllamaError as e:
            self.refused[a.instance] = str(e)
            journal.log_event("plan_rejected", f"node {a.node_id} ({a.address}) is not a member: "
                              f"{e}", node=a.node_id, phase=self.state)
        else:
            self.verified.add(a.instance)
        finally:
            self.probing.discard(a.instance)

    def _watch_members(self) -> None:
        """Start key probes for new peers; journal vanished and returning nodes."""
        for a in self.discovery.peers():
            if a.instance not in self.verified and a.instance not in self.refused \
                    and a.instance not in self.probing:
                self.probing.add(a.instance)
                self._spawn(self._probe(a), f"probe {a.node_id}")
        plan = self.root.plan if self.root is not None and self.root.plan else None
        planned = {n.node_id: n.memory.total for n in plan.nodes} if plan else {}
        old_root = self.election.root_id
        changes = self.membership.update(self.trusted_peers(), planned)
        me = self.config.node_id
        for v in changes.vanished:
            if old_root == me or v.advert.node_id == old_root:
                journal.log_event("peer_vanished", v.message(), node=v.advert.node_id,
                                  phase=v.advert.state or "unknown",
                                  available_bytes=v.advert.available_ram_bytes,
                                  planned_bytes=v.planned_bytes)
        for r in changes.returned:
            if old_root == me:
                self._spawn(self._journal_return(r), f"report of {r.advert.node_id}")

    async def _journal_return(self, r) -> None:
        """A node came back after a bad exit: ask it for its whole report (the advert holds
        a shortened one) and journal it here, on the root, with its fields."""
        a = r.advert
        message, fields = r.message(), {}
        try:
            report = await forward(a.address, a.control_port, self.key, self.config.cluster,
                                   self.config.node_id, {"op": "report"},
                                   _ignore, timeout_s=10, who=f"node {a.node_id}")
            if report.get("message"):
                message = f"node {a.node_id} is back; its previous run: {report['message']}"
                fields = {k: v for k, v in (report.get("fields") or {}).items()
                          if isinstance(v, (int, str)) and k != "phase"}
                if report.get("phase"):
                    fields["previous_phase"] = report["phase"]
        except DllamaError as e:
            log.info("node %s did not send its report (%s); journaling its advert's", a.node_id, e)
        journal.log_event("oom_diagnosis" if r.oom_killed else "previous_exit", message,
                          node=a.node_id, reported_by=self.config.node_id, **fields)

    async def _tick(self) -> None:
        now = time.monotonic()
        self._watch_members()
        if self.probing:
            return        # a peer is proving it holds the key: elect with it or without it
        decision = decide(self.election, self._views(now), now, self.config.node_id)
        old = self.election
        self.election = decision.state
        if (old.term, old.root_id) != (decision.state.term, decision.state.root_id):
            log.info("election: %s (%s)", decision.action.name, decision.reason)
            self.discovery.update_advert(term=decision.state.term,
                                         root_id=decision.state.root_id or "")
        if decision.state.root_id == self.config.node_id:
            await self._serve_as_root()
        else:
            if self.root is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._close_root)
            if decision.action == Action.NO_ROOT:
                self._set_state("electing", decision.reason)
            elif decision.state.root_id:
                own = self.loading.get(self.config.node_id)
                busy = own is not None and not own.finished
                self._set_state("loading" if busy else "serving",
                                f"worker of root {decision.state.root_id}")
            else:
                self._set_state("electing")

    async def _serve_as_root(self) -> None:
        peers = self.trusted_peers()
        members = tuple(sorted(a.node_id for a in peers))
        if self.root is not None and self.root.ready and members == self.members:
            return
        if not self.model_identity:
            self._set_state("electing", "root without a model file: cannot plan")
            return
        failed_members, failed_at = self.failed
        if failed_members == members and time.monotonic() - failed_at < RETRY_S:
            return                       # same nodes, same answer: do not flood the journal
        if not self.busy.acquire(blocking=False):
            return                       # a generation or a start is running; next tick
        try:
            self._set_state("planning", f"{len(peers) + 1} nodes")
            await asyncio.get_running_loop().run_in_executor(None, self._start_root, peers)
            self.members = members
            self._set_state("serving", f"root of {len(self.root.reports)} nodes, "
                                       f"max_seq_len {self.root.plan.max_seq_len}")
        except DllamaError as e:
            self.last_error = str(e)
            self.failed = (members, time.monotonic())
            log.error("cluster start failed: %s (trying again in %.0f s or when peers change)",
                      e, RETRY_S)
            self._set_state("planning", str(e))
        finally:
            self.busy.release()

    def _start_root(self, peers: List[NodeAdvert]) -> None:
        """Plan, negotiate, load (blocking). A node that rejects its slice reports what it
        has now; the root re-plans with that, at most three times."""
        self._close_root()
        c = self.config
        options = RunOptions(model_path=c.model, tokenizer_path=c.tokenizer,
                             threads=c.threads or self.capacity.cores,
                             max_seq_len=c.max_seq_len or None, wire=c.wire,
                             allow_swap=c.allow_swap)
        for attempt in range(3):
            workers = [WorkerAddress(a.address, a.port, self._capacity_with_override(a))
                       for a in peers]
            root = ClusterRoot(options, self.capacity, workers, key=self.key, cluster=c.cluster)
            try:
                self._set_state("loading")
                self.load_plan = self.load_rows = None
                plan = root.start(
                    stream_progress=lambda n, d, t: self.loading.update(n, "streaming", d, t),
                    on_plan=self._on_plan,
                    load_progress=self._root_read)
            except PlanRejected as r:
                root.close()
                log.warning("%s; re-planning", r)
                self.overrides[r.node_id] = r.available_bytes
                continue
            except BaseException as e:
                root.close()
                for n in (self.load_plan or {}).get("nodes", ()):
                    own = self.loading.get(n)
                    if own is not None and not own.finished:
                        self.loading.finish(n, "failed", str(e)[:200])
                raise
            self._lock_slice(root.session.transformer)
            self.root = root                     # serving from here: the status shows the plan
            journal.log_event("plan_table", format_plan(plan), node=c.node_id, phase="planning",
                              planned_bytes=sum(n.memory.total for n in plan.nodes))
            for x in plan.excluded:
                journal.log_event("plan_rejected", f"node {x.node_id} left out: {x.reason}",
                                  node=x.node_id, phase="planning")
            self.run_record.update(phase="serving",
                                   planned_bytes=plan.node(c.node_id).memory.total)
            return
        raise ClusterError("the nodes kept rejecting their slices after 3 plans")

    def _capacity_with_override(self, advert: NodeAdvert) -> NodeCapacity:
        cap = capacity_of(advert)
        if advert.node_id in self.overrides:
            from dataclasses import replace
            cap = replace(cap, available_ram_bytes=min(cap.available_ram_bytes,
                                                       self.overrides[advert.node_id]))
        return cap

    def _close_root(self) -> None:
        if self.root is not None:
            self.root.close()
            self.root = None
            self.members = ()



_SOURCES = {"file": "from its model file", "cache": "from its slice cache",
            "stream": "streamed from the root"}


def _endpoint(text: str):
    host, _, port = text.rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        raise UsageError(f"static peer {text!r}: expected HOST:PORT") from None


def _state_word(state: str) -> str:
    """The advertised state: one lowercase word (the TXT record keeps it short)."""
    import re
    return re.sub(r"[^a-z]", "", state.lower())[:20]


async def _ignore(line: dict) -> None:
    pass
