"""The root of a cluster: plans, assigns slices, drives every forward step.

The root is robust (piwheels' rule): when a worker fails mid-generation it reports the
node, the position, the layer and the cause to the client, drops the node, re-plans over
the nodes that are left, and serves the next request.

The all-reduces run over a mesh: every node sends its part to every other node. The older
star through the root lives in bench/star_sync.py, bench/compare_sync.py's baseline, which
puts it in through link() (and the worker's unlinked_sync()).
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from dllama_node.cluster.auth import INITIATOR, Handshake
from dllama_node.cluster.planning import make_plan
from dllama_node.cluster.protocol import (PROTOCOL_VERSION, Assign, Auth, Connection,
                                          DEFAULT_TIMEOUT_S, ErrorReport, Hello, Kind, Loaded,
                                          MeshAnswer, MeshPeer, MeshRequest, StatsReport,
                                          StatsRequest, Welcome)
from dllama_node.cluster.run_options import RunOptions
from dllama_node.cluster.sync_tcp import NodeFailure, Peer, RootMeshSync, RootSide
from dllama_node.cluster.transfer import serve_slice
from dllama_node.cluster.wire import check_wire
from dllama_node.common.errors import ClusterError
from dllama_node.common.memory import current_rss_bytes
from dllama_node.engine.forward import Transformer
from dllama_node.engine.context import longer_context_advice
from dllama_node.engine.generate import Session
from dllama_node.engine.load import load_weights
from dllama_node.plan import NodeCapacity, ShardPlan

log = logging.getLogger(__name__)


@dataclass
class WorkerAddress:
    host: str
    port: int
    capacity: NodeCapacity                  # what it reported; its node_id names it in the plan
    process: Optional[object] = None        # a local child, to report how it ended

    @property
    def node_id(self) -> str:
        return self.capacity.node_id


@dataclass
class NodeReport:
    """After load: measured next to planned."""

    node_id: str
    role: str
    planned_bytes: int
    weights_bytes: int
    kv_cache_bytes: int
    rss_bytes: int
    load_s: float
    source: str = "file"          # file (its own copy), cache (its slice cache) or stream
    streamed_bytes: int = 0


class PlanRejected(ClusterError):
    """A worker re-checked its slice against what it has now and said no."""

    def __init__(self, message: str, node_id: str, available_bytes: int, needed_bytes: int):
        super().__init__(message)
        self.node_id, self.available_bytes, self.needed_bytes = node_id, available_bytes, needed_bytes


class ClusterRoot:
    """Runs `options` over this node (root_capacity) and its workers. key and cluster
    are what the workers check this root by (cluster/auth.py)."""

    sync_mode = "mesh"         # the all-reduce's topology, as link() builds it
    # what a worker of this root runs on this machine (cluster/local.py), after python
    worker_program = ("-m", "dllama_node.cluster.worker")

    def __init__(self, options: RunOptions, root_capacity: NodeCapacity,
                 workers: Sequence[WorkerAddress], key: bytes = b"", cluster: str = "default"):
        from dllama_node.cluster.slices import model_identity
        from dllama_node.model import open_model

        self.options = options
        self.model = open_model(options.model_path)
        self.model_identity = model_identity(self.model)
        self.stream_weights = options.stream_weights  # workers get slices from here
        self.key, self.cluster = key, cluster
        self.allow_swap = options.allow_swap
        self.model_path = options.model_path
        self.root_capacity = root_capacity
        self.workers = list(workers)
        self.threads = options.threads or 1
        self.batch, self.timeout_s = options.batch, options.timeout_s
        self.max_seq_len, self.split = options.max_seq_len, options.split
        self.wire = check_wire(options.wire, self.model.config.dim)
        self.spin_us = options.spin_us
        self.tokenizer = None
        if options.load_tokenizer:
            from dllama_node.tokenizer import load_tokenizer as _load
            self.tokenizer = _load(self.model.metadata, self.model.config.vocab_size,
                                   options.tokenizer_path)
        self.peers: List[Peer] = []
        self.plan: Optional[ShardPlan] = None
        self.session: Optional[Session] = None
        self.sync: Optional[RootSide] = None     # link()'s synchronizer, after start
        self.reports: List[NodeReport] = []
        self._auth_ids: dict = {}            # worker node id -> the id its handshake used

    # ---- start ---------------------------------------------------------------------
    def start(self, progress: Optional[Callable[[str], None]] = None,
              stream_progress: Optional[Callable[[str, int, int], None]] = None,
              on_plan: Optional[Callable[[ShardPlan, str], None]] = None,
              load_progress: Optional[Callable[[int, int], None]] = None) -> ShardPlan:
        """Connect to every worker, plan over them, assign and load every slice.
        stream_progress(node_id, bytes_done, bytes_total) while a slice streams;
        on_plan(plan, load_id) once the plan is made, before anything loads (the load id
        goes to every worker in its assignment); load_progress(bytes_done, bytes_total)
        while the root reads its own slice."""
        say = progress or (lambda msg: None)
        load_id = secrets.token_hex(8)
        self._close_peers()
        conns = []
        try:
            for w in self.workers:
                conn = Connection.connect(w.host, w.port, self.timeout_s)
                hs = Handshake(self.key, INITIATOR, self.cluster, self.root_capacity.node_id)
                conn.send_message(Hello(version=PROTOCOL_VERSION, **hs.offer()))
                welcome = conn.recv_message(Welcome)
                conn.send_message(Auth(**hs.confirm(welcome.handshake_fields(), conn.peer)))
                conns.append(conn)
                self._auth_ids[w.node_id] = hs.peer_id    # the id it proved, for the mesh
            capacities = [self.root_capacity] + [w.capacity for w in self.workers]
            split = self.split[:len(capacities)] if self.split else None
            self.plan = make_plan(self.model, capacities, self.max_seq_len, split,
                                  allow_swap=self.allow_swap, batch=self.batch)
            by_id = {n.node_id: n for n in self.plan.nodes}
            root_slice = by_id[self.root_capacity.node_id]
            if on_plan is not None:
                on_plan(self.plan, load_id)
            cfg = self.model.config
            self.peers = []
            for w, conn in zip(self.workers, conns):
                node = by_id.get(w.node_id)
                if node is None:      # excluded by the plan: tell it the session is over
                    conn.send(Kind.BYE)
                    conn.close()
                    continue
                conn.send_message(Assign(
                    model_path=None if self.stream_weights else self.model_path,
                    model_identity=self.model_identity, model_size=self.model.file_size,
                    config=cfg, slice=node.spec, seq_len=self.plan.max_seq_len,
                    batch=self.batch, planned_bytes=node.memory.total - node.memory.reserve,
                    threads=self.threads, wire=self.wire, load_id=load_id))
                self.peers.append(Peer(w.node_id, conn, node.spec.vocab_rows, w.process))
            assigned = {p.node_id for p in self.peers} | {root_slice.node_id}
            missing = [n.node_id for n in self.plan.nodes if n.node_id not in assigned]
            if missing:   # every slice must run somewhere, or the sums are wrong
                raise ClusterError(f"the plan gives slices to {', '.join(missing)}, which are "
                                   "not connected")
            say(f"loading {len(self.peers) + 1} slices")
            t0 = time.perf_counter()
            weights = load_weights(self.model, root_slice.spec, progress=load_progress)
            transformer = Transformer(weights, self.plan.max_seq_len, self.threads, self.batch)
            transformer.forward = self._timed(transformer.forward)
            self.reports = [NodeReport(root_slice.node_id, root_slice.role,
                                       root_slice.memory.total, weights.nbytes(),
                                       transformer.cache.nbytes, current_rss_bytes(),
                                       time.perf_counter() - t0)]
            for peer in self.peers:
                node = by_id[peer.node_id]
                streamed = serve_slice(peer.conn, self.model, node.spec, peer.node_id,
                                       stream_progress)
                r = self._loaded(peer)
                self.reports.append(NodeReport(peer.node_id, node.role, node.memory.total,
                                               r.weights_bytes, r.kv_cache_bytes, r.rss_bytes,
                                               r.load_s, r.source, streamed))
            self.sync = transformer.sync = self.link()
            # a plan made without an asked length is as long as the nodes' memory allows
            asked = self.plan.options.max_seq_len is not None
            self.session = Session(transformer, context_advice=longer_context_advice(
                self.plan.max_seq_len, self.plan.layout.config.seq_len,
                None if asked else self.plan.max_seq_len))
            return self.plan
        except BaseException:
            for conn in conns:
                conn.close()
            self.peers = []
            raise

    def link(self) -> RootSide:
        """The all-reduce over the loaded workers: the mesh. Every worker links to every
        other (cluster/protocol.py, MESH) at the addresses this root was given; each
        answers once its links stand. bench/star_sync.py overrides this with its star."""
        session = secrets.token_hex(16)
        address = {w.node_id: w for w in self.workers}
        peers = tuple(MeshPeer(i, p.node_id, self._auth_ids[p.node_id],
                               address[p.node_id].host, address[p.node_id].port)
                      for i, p in enumerate(self.peers, 1))
        for i, peer in enumerate(self.peers, 1):
            peer.conn.send_message(MeshRequest(session, i, peers, self.spin_us))
        for peer in self.peers:
            answer = peer.conn.recv_message(MeshAnswer, f"MESH from {peer.node_id}",
                                            timeout_s=self.timeout_s * (len(self.peers) + 1))
            if answer.links != len(self.peers):
                raise ClusterError(f"node {peer.node_id} linked to {answer.links} nodes, "
                                   f"expected {len(self.peers)}")
        return RootMeshSync(self.peers, self.model.config.dim, self.batch, self.wire,
                            self.spin_us)

    def _loaded(self, peer: Peer) -> Loaded:
        """The worker's LOADED, or its reasoned rejection of the slice (PlanRejected)."""
        kind, length = peer.conn.recv_header(f"LOADED from {peer.node_id}", timeout_s=None)
        if kind == Kind.ERROR:
            error = peer.conn.read_message(ErrorReport, length)
            if error.reject is not None:
                raise PlanRejected(error.message, peer.node_id, error.reject.available_bytes,
                                   error.reject.needed_bytes)
            raise ClusterError(f"node {peer.node_id}: {error.message}")
        if kind != Kind.LOADED:
            raise ClusterError(f"node {peer.node_id}: expected LOADED, got {kind.name}")
        return peer.conn.read_message(Loaded, length)

    # ---- serve ---------------------------------------------------------------------
    def generate(self, prompt, max_tokens, sampler, stop_ids=(), vocab_limit=None):
        """Session.generate over the cluster; a failed node is named, dropped, and the
        cluster re-planned before this raises, so the next request can be served."""
        try:
            yield from self.session.generate(prompt, max_tokens, sampler, stop_ids,
                                             vocab_limit=vocab_limit)
        except NodeFailure as failure:
            log.error("%s", failure)
            self.drop(failure.node_id)
            raise

    def _timed(self, forward):
        """The root's forward steps, timed: its compute is step time less sync time."""
        def timed(tokens, start_pos, logits=True):
            t = time.perf_counter()
            try:
                return forward(tokens, start_pos, logits)
            finally:
                self.sync.stats.step_s += time.perf_counter() - t
        return timed

    def node_stats(self, reset: bool = False) -> dict:
        """node_id -> SyncStats.to_dict() of every node, the root's included."""
        out = {self.reports[0].node_id: self.sync.stats.to_dict()}
        for peer in self.peers:
            peer.conn.send_message(StatsRequest(reset))
            out[peer.node_id] = peer.conn.recv_message(StatsReport).to_payload()
        if reset:
            self.sync.stats.reset()
        return out

    def drop(self, node_id: str) -> None:
        """Forget a failed worker; the cluster re-plans over the rest at the next start."""
        self.workers = [w for w in self.workers if w.node_id != node_id]
        self._close_peers()
        self.session = None

    def recover(self, progress=None, stream_progress=None) -> ShardPlan:
        """Re-plan and reload over the workers that are left."""
        return self.start(progress, stream_progress)

    @property
    def ready(self) -> bool:
        return self.session is not None

    def _close_peers(self) -> None:
        for p in self.peers:
            try:
                p.conn.send(Kind.BYE)
            except ClusterError:
                pass
            p.conn.close()
        self.peers = []

    def close(self) -> None:
        self._close_peers()
        self.model.close()
