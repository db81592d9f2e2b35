"""A worker node: listens for a root, loads the slice it is assigned, runs its part of
every forward step. For the mesh (cluster/protocol.py, MESH) it also links to the other
workers: it connects to those before it and accepts those after it on this same
listener, each link authenticated with the cluster key like the root's.

Workers are brittle by design (piwheels' rule): anything wrong with the root's session
-- the root vanished, a protocol error, a timeout -- drops that session, logs why, and
goes back to waiting for a root. The loaded slice is kept, so a root that reconnects
with the same assignment does not wait for a reload. A worker that loses another worker
of the mesh tells the root which one (ERROR with "failed_node") before it drops the
session, so the root names the node that failed, not the one that noticed.

    python -m dllama_node.cluster.worker --listen 127.0.0.1:0 [--threads 1]

prints "listening HOST:PORT" on stdout once it accepts connections.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from typing import Optional


from dllama_node.cluster.protocol import (FORWARD_HEADER, PROTOCOL_VERSION, Assign, Auth,
                                          Connection, DEFAULT_TIMEOUT_S, ErrorReport, Hello,
                                          Kind, Loaded, MeshAnswer, MeshPeer, MeshRequest,
                                          Rejection, StatsReport, StatsRequest, Welcome)
from dllama_node.cluster.auth import (INITIATOR, RESPONDER, AuthenticationError, Handshake,
                                      read_key)
from dllama_node.cluster.sync_tcp import NodeFailure, Peer, WorkerMeshSync, WorkerSide
from dllama_node.cluster.wire import check_wire
from dllama_node.common.errors import ClusterError, DllamaError, ProtocolError
from dllama_node.common.memory import current_rss_bytes

log = logging.getLogger("dllama_node.worker")


class LoadedSlice:
    """What an ASSIGN produced: kept across sessions while the assignment is the same."""

    rss_before = 0           # the process's RSS before this slice loaded

    def __init__(self, key: tuple, model, transformer, load_s: float):
        self.key, self.model, self.transformer, self.load_s = key, model, transformer, load_s

    def close(self) -> None:
        self.model.close()


def _own_copy(a: Assign):
    """This node's copy of the root's model file, or None (then the root streams it)."""
    from dllama_node.cluster.slices import model_identity
    from dllama_node.model import open_model

    path = a.model_path
    if not path or not os.path.exists(path):
        return None
    model = open_model(path)
    if model.file_size == a.model_size and model_identity(model) == a.model_identity:
        return model
    log.warning("model %s here is not the root's (%d bytes, identity differs): streaming the "
                "slice instead", path, model.file_size)
    model.close()
    return None


def load_assignment(a: Assign, conn: Connection, cache, progress=None) -> LoadedSlice:
    """Load the slice: from this node's copy of the model when it has the root's file,
    else from the slice cache, else streamed from the root into the cache.
    progress(phase, bytes_done, bytes_total), phase "streaming" or "reading"."""
    from dllama_node.cluster.slice_cache import open_slice
    from dllama_node.cluster.slices import slice_weights
    from dllama_node.cluster.transfer import fetch_slice
    from dllama_node.engine.forward import Transformer
    from dllama_node.engine.load import load_weights

    t0 = time.perf_counter()
    spec = a.slice
    def phase(name):
        return (lambda done, total: progress(name, done, total)) if progress else None
    model = _own_copy(a)
    streamed = 0
    if model is not None:
        source = "file"
    else:
        path, streamed = fetch_slice(conn, cache, phase("streaming"))
        model = open_slice(path)
        source = "stream" if streamed else "cache"
    try:
        reading = phase("reading")
        weights = load_weights(model, spec, progress=reading) if source == "file" \
            else slice_weights(model, spec, progress=reading)
        check_wire(a.wire, model.config.dim)
        transformer = Transformer(weights, a.seq_len, a.threads, a.batch)   # linked by assign
    except BaseException:
        model.close()
        raise
    loaded = LoadedSlice(a.load_key, model, transformer, time.perf_counter() - t0)
    loaded.source, loaded.streamed_bytes = source, streamed
    return loaded


class Worker:
    def __init__(self, host: str, port: int, node_id: str, key: bytes, cluster: str = "default",
                 timeout_s: float = DEFAULT_TIMEOUT_S, state_dir: Optional[str] = None,
                 on_loaded=None, on_assigned=None, on_progress=None):
        from dllama_node.cluster.slice_cache import SliceCache

        self.node_id = node_id
        self.key, self.cluster = key, cluster
        self.on_loaded = on_loaded       # e.g. lock the slice in RAM
        self.on_assigned = on_assigned   # on_assigned(assignment): accepted, about to load
        # on_progress(phase, bytes_done, bytes_total): "streaming", "reading", then "kept"
        # (the slice was already loaded) or "failed"; on_loaded follows a load
        self.on_progress = on_progress
        self.state_dir = state_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dllama-node")
        self.cache = SliceCache(os.path.join(self.state_dir, "slices"))
        self.timeout_s = timeout_s
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.address = "%s:%d" % self.listener.getsockname()[:2]
        self.loaded: Optional[LoadedSlice] = None
        self.assignment: Optional[Assign] = None
        self.root_id = ""

    def serve_forever(self) -> None:
        while True:
            sock, addr = self.listener.accept()
            conn = Connection(sock, "%s:%d" % addr[:2], self.timeout_s)
            try:
                self.session(conn)
            except NodeFailure as e:
                log.warning("dropping the session: %s", e)
            except (ProtocolError, AuthenticationError) as e:
                log.warning("refused peer %s: %s", conn.peer, e)
            except ClusterError as e:
                log.warning("root %s gone: %s; dropping the session, waiting for a root",
                            conn.peer, e)
            except DllamaError as e:
                log.error("session with root %s failed: %s", conn.peer, e)
                try:
                    conn.send_message(ErrorReport(f"node {self.node_id}: {e}"))
                except ClusterError:
                    pass
            except Exception:            # noqa: BLE001 - one connection's bug ends that connection
                # whatever one peer's connection raised, the next root still finds this node
                # listening (in a daemon this loop is the data plane's thread)
                log.exception("session with peer %s ended by an unexpected error", conn.peer)
            finally:
                conn.close()

    def session(self, conn: Connection) -> None:
        # nothing is handled before the root has proven it holds the cluster key
        hello = conn.recv_message(Hello)
        hs = Handshake(self.key, RESPONDER, self.cluster, self.node_id)
        conn.send_message(Welcome(version=PROTOCOL_VERSION, pid=os.getpid(),
                                  **hs.answer(hello.handshake_fields(), conn.peer)))
        try:
            auth = conn.recv_message(Auth)
        except ClusterError as e:
            raise AuthenticationError(f"peer {conn.peer} did not prove it holds this cluster's "
                                      f"key ({e})") from None
        hs.finish(auth.to_payload())
        self.root_id = hello.node_id
        log.info("root %s connected (node id %s)", conn.peer, self.root_id)
        try:
            self._serve(conn)
        finally:
            if self.loaded is not None:
                self.loaded.transformer.sync.close()    # the links to other workers

    def _serve(self, conn: Connection) -> None:
        while True:
            kind, length = conn.recv_header("the next request", timeout_s=None)
            if kind == Kind.ASSIGN:
                self.assign(conn, conn.read_message(Assign, length))
            elif kind == Kind.FORWARD:
                self.forward(conn, length)
            elif kind == Kind.MESH:
                self.mesh(conn, conn.read_message(MeshRequest, length))
            elif kind == Kind.STATS:
                request = conn.read_message(StatsRequest, length)
                stats = self.loaded.transformer.sync.stats if self.loaded else None
                conn.send_message(StatsReport(**stats.to_dict()) if stats else StatsReport())
                if stats and request.reset:
                    stats.reset()
            elif kind == Kind.BYE:
                conn.recv_bytes(length, "BYE")
                log.info("root %s ended the session", conn.peer)
                return
            else:
                raise ProtocolError(f"node {conn.peer}: unexpected {kind.name} between steps")

    def _recheck(self, conn: Connection, a: Assign, key: tuple) -> bool:
        """Does the slice still fit what this node has now? If not, say so with the numbers."""
        from dllama_node.common.memory import read_memory
        from dllama_node.common.units import format_mib

        needed = a.planned_bytes
        if not needed or (self.loaded is not None and self.loaded.key == key):
            return True
        freed = 0        # what dropping the slice held now gives back: its resident part
        if self.loaded is not None:
            t = self.loaded.transformer
            freed = max(0, min(t.w.nbytes() + t.cache.nbytes,
                               current_rss_bytes() - self.loaded.rss_before))
        available = read_memory().available_bytes + freed
        if needed <= available:
            return True
        message = (f"node {self.node_id} rejects its slice: it needs {format_mib(needed)}, "
                   f"{format_mib(available)} is available now")
        log.warning("%s", message)
        conn.send_message(ErrorReport(message, reject=Rejection(self.node_id, available, needed)))
        return False

    def assign(self, conn: Connection, a: Assign) -> None:
        key = a.load_key
        if not self._recheck(conn, a, key):
            return
        if self.on_assigned is not None:
            self.on_assigned(a)
        if self.loaded is None or self.loaded.key != key:
            if self.loaded is not None:
                self.loaded.close()
                self.loaded = None
            log.info("loading slice %s of %s", a.slice.to_dict(), a.model_path)
            rss_before = current_rss_bytes()
            try:
                self.loaded = load_assignment(a, conn, self.cache, self.on_progress)
            except BaseException:
                if self.on_progress is not None:
                    self.on_progress("failed", 0, 0)
                raise
            if self.on_loaded is not None:
                self.on_loaded(self.loaded.transformer)
            self.loaded.rss_before = rss_before
        elif self.on_progress is not None:
            self.on_progress("kept", 0, 0)
        t = self.loaded.transformer
        self.assignment = a
        t.sync = self.unlinked_sync(conn, t)    # a new root gets a new synchronizer
        conn.send_message(Loaded(
            node_id=self.node_id, source=self.loaded.source,
            streamed_bytes=self.loaded.streamed_bytes, weights_bytes=t.w.nbytes(),
            kv_cache_bytes=t.cache.nbytes, rss_bytes=current_rss_bytes(),
            load_s=round(self.loaded.load_s, 3)))

    def forward(self, conn: Connection, length: int) -> None:
        if self.loaded is None:
            raise ProtocolError(f"node {conn.peer}: FORWARD before ASSIGN")
        t = self.loaded.transformer
        head = conn.recv_bytes(FORWARD_HEADER.size, "FORWARD header")
        start_pos, n, want_logits = FORWARD_HEADER.unpack(head)
        if not 0 < n <= t.batch or start_pos + n > t.seq_len:
            raise ProtocolError(f"node {conn.peer}: FORWARD of {n} tokens at position "
                                f"{start_pos} does not fit batch {t.batch} / context {t.seq_len}")
        x = t.s.x[:n]
        conn.recv_payload_into(x, length - FORWARD_HEADER.size, "FORWARD input")
        t0 = time.perf_counter()
        t.sync.start_pos = start_pos
        try:
            t.forward_embedded(n, start_pos, bool(want_logits))
        except NodeFailure as failure:
            if failure.node_id != self.root_id:     # another worker: tell the root which
                try:
                    conn.send_message(ErrorReport(
                        failure.cause, failed_node=failure.node_id,
                        position=failure.position, layer=failure.layer, phase=failure.phase))
                except ClusterError:
                    pass
            raise
        t.sync.stats.step_s += time.perf_counter() - t0
        t.sync.stats.steps += 1

    def unlinked_sync(self, conn: Connection, transformer) -> WorkerSide:
        """The synchronizer from LOADED until MESH: none but the logits to the root. The
        seam where bench/star_sync.py puts its star instead."""
        return WorkerSide(conn)

    # ---- the mesh ------------------------------------------------------------------
    def mesh(self, conn: Connection, m: MeshRequest) -> None:
        """Build this node's links to the other workers (cluster/protocol.py, MESH): connect
        to those before it at the addresses the root was given, accept those after it on
        this node's listener, each authenticated; then answer MESH. A failure is told to
        the root (ERROR), which gives up this start."""
        if self.loaded is None:
            raise ProtocolError(f"node {conn.peer}: MESH before ASSIGN")
        index, session = m.index, m.session
        peers = {p.index: p for p in m.peers}
        if index not in peers or peers[index].auth_id != self.node_id:
            raise ProtocolError(f"node {conn.peer}: MESH gives this node ({self.node_id}) "
                                f"index {index}, which names {peers.get(index)}")
        links = [None] * (len(peers) + 1)
        links[0] = Peer(self.root_id, conn)
        try:
            for j in sorted(peers):
                if j < index:
                    links[j] = self._connect_peer(peers[j], session, index)
            self._accept_peers({j: p for j, p in peers.items() if j > index}, session, links)
        except ClusterError as e:
            for link in links[1:]:
                if link is not None:
                    link.conn.close()
            log.error("node %s could not join the mesh: %s", self.node_id, e)
            conn.send_message(ErrorReport(f"node {self.node_id} could not join the mesh: {e}"))
            return
        t = self.loaded.transformer
        t.sync.close()
        t.sync = WorkerMeshSync(links, index, t.cfg.dim, t.batch, self.assignment.wire,
                                m.spin_us)
        log.info("mesh: node %d of %d, linked to %s", index, len(links),
                 ", ".join(link.node_id for link in links if link is not None))
        conn.send_message(MeshAnswer(len(links) - 1))

    def _connect_peer(self, p: MeshPeer, session: str, index: int) -> Peer:
        c = Connection.connect(p.host, p.port, self.timeout_s)
        try:
            hs = Handshake(self.key, INITIATOR, self.cluster, self.node_id)
            c.send_message(Hello(version=PROTOCOL_VERSION, mesh=session, index=index,
                                 **hs.offer()))
            welcome = c.recv_message(Welcome)
            if welcome.node_id != p.auth_id:
                raise AuthenticationError(f"{c.peer} answers as node {welcome.node_id}, "
                                          f"the root knows node {p.auth_id} there")
            c.send_message(Auth(**hs.confirm(welcome.handshake_fields(), c.peer)))
        except BaseException:
            c.close()
            raise
        return Peer(p.node_id, c)

    def _accept_peers(self, expected: dict, session: str, links: list) -> None:
        """Accept the workers after this one; anything else that connects meanwhile is
        refused with a logged reason."""
        deadline = time.monotonic() + self.timeout_s
        while expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(f"{p.node_id} ({p.host}:{p.port})" for p in expected.values())
                raise ClusterError(f"node {self.node_id}: no connection from {names} in "
                                   f"{self.timeout_s:.1f} s")
            self.listener.settimeout(remaining)
            try:
                sock, addr = self.listener.accept()
            except socket.timeout:
                continue
            finally:
                self.listener.settimeout(None)
            c = Connection(sock, "%s:%d" % addr[:2], self.timeout_s)
            try:
                hello = c.recv_message(Hello)
                j = hello.index
                if (hello.mesh != session or j not in expected
                        or hello.node_id != expected[j].auth_id):
                    raise ProtocolError(f"peer {c.peer} (node {hello.node_id}, index "
                                        f"{j}) is not a node this mesh waits for")
                hs = Handshake(self.key, RESPONDER, self.cluster, self.node_id)
                c.send_message(Welcome(version=PROTOCOL_VERSION, pid=os.getpid(),
                                       **hs.answer(hello.handshake_fields(), c.peer)))
                hs.finish(c.recv_message(Auth).to_payload())
            except ClusterError as e:
                log.warning("refused peer %s while building the mesh: %s", c.peer, e)
                c.close()
                continue
            links[j] = Peer(expected.pop(j).node_id, c)


def main(argv=None, worker_class=Worker) -> None:
    """The worker process; bench/star_sync.py runs it with its own worker_class."""
    ap = argparse.ArgumentParser(description="dllama worker node")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    ap.add_argument("--node-id", default=f"{socket.gethostname()}-{os.getpid()}")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                    help="seconds to wait for a peer inside a forward step")
    ap.add_argument("--key-file", required=True, help="the cluster key (cluster/auth.py)")
    ap.add_argument("--cluster", default="default", help="cluster name")
    ap.add_argument("--state-dir", default=None,
                    help="where streamed slices are cached (default ~/.cache/dllama-node)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format=f"%(levelname)s worker {args.node_id}: %(message)s")
    host, _, port = args.listen.rpartition(":")
    worker = worker_class(host or "127.0.0.1", int(port), args.node_id,
                          read_key(args.key_file), args.cluster, args.timeout, args.state_dir)
    print(f"listening {worker.address}", flush=True)
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
