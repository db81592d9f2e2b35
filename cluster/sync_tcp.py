"""The synchronizer over TCP: the all-gather mesh.

Per forward step the root sends FORWARD (the embedded input) to every worker; at the end
every worker sends its LOGITS rows to the root. Per layer there are two all-reduces:
every node encodes its partial output once, sends the same PART frame to every other
node and adds all N partials in node order (cluster/wire.py's sum_parts_into): one
one-way trip per all-reduce, bit-identical sums everywhere. The step itself is
cluster/mesh.py's MeshExchange. (The older star through the root lives on only as
bench/compare_sync.py's baseline, bench/star_sync.py, built on RootSide and WorkerSide.)

Receives are fixed-size, into buffers allocated once. Every failure is a NodeFailure that
names the node, the position, the layer and phase, and the cause.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from dllama_node.cluster.mesh import MeshExchange, _LinkFailure
from dllama_node.cluster.protocol import FORWARD_HEADER, HEADER, Connection, Kind
from dllama_node.common.errors import ClusterError, ProtocolError


@dataclass
class SyncStats:
    """Time spent exchanging (waiting included) and bytes moved, since the last reset."""

    sync_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    steps: int = 0
    step_s: float = 0.0          # wall time of whole forward steps (compute = step - sync)

    def reset(self) -> None:
        self.sync_s, self.bytes_sent, self.bytes_received, self.steps = 0.0, 0, 0, 0
        self.step_s = 0.0

    @property
    def compute_s(self) -> float:
        return max(self.step_s - self.sync_s, 0.0)

    def to_dict(self) -> dict:
        return {"sync_s": self.sync_s, "step_s": self.step_s, "compute_s": self.compute_s,
                "steps": self.steps, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received}


@dataclass
class Peer:
    """A worker as the root sees it."""

    node_id: str
    conn: Connection
    vocab_rows: tuple = (0, 0)
    process: Optional[object] = None      # a local child (subprocess.Popen), to name its exit


class NodeFailure(ClusterError):
    """A peer failed during a forward step."""

    def __init__(self, message: str, node_id: str, position: int, layer: Optional[int],
                 phase: str, cause: str = ""):
        super().__init__(message)
        self.node_id, self.position, self.layer, self.phase = node_id, position, layer, phase
        self.cause = cause or message


class RootSide:
    """The root's FORWARD and LOGITS, and how it names a failed worker; a topology adds
    all_reduce."""

    def __init__(self, peers: Sequence[Peer]):
        self.peers = list(peers)
        self.stats = SyncStats()
        self.start_pos = 0

    def _fail(self, peer: Peer, e: ClusterError, layer: Optional[int], phase: str,
              reported_by: Optional[Peer] = None):
        where = f"layer {layer} ({phase})" if layer is not None else phase
        cause = str(e) + (f" (reported by node {reported_by.node_id})" if reported_by else "")
        if peer.process is not None:
            code = _exit_status(peer.process)
            if code:
                cause += f"; {code}"
        raise NodeFailure(f"node {peer.node_id} failed at position {self.start_pos}, {where}: "
                          f"{cause}", peer.node_id, self.start_pos, layer, phase) from None

    def start_forward(self, x: np.ndarray, start_pos: int, logits: bool) -> None:
        t = time.perf_counter()
        self.start_pos = start_pos
        head = FORWARD_HEADER.pack(start_pos, x.shape[0], 1 if logits else 0)
        for peer in self.peers:
            try:
                peer.conn.send(Kind.FORWARD, head, x)
            except ClusterError as e:
                self._fail(peer, e, None, "sending the input")
        self.stats.bytes_sent += len(self.peers) * (HEADER.size + len(head) + x.nbytes)
        self.stats.steps += 1
        self.stats.sync_s += time.perf_counter() - t

    def gather_logits(self, local: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        parts: List[np.ndarray] = [local]
        for peer in self.peers:
            v0, v1 = peer.vocab_rows
            rows = np.empty(v1 - v0, np.float32)
            try:
                length = peer.conn.expect(Kind.LOGITS, "LOGITS")
                peer.conn.recv_payload_into(rows, length, "LOGITS")
            except ClusterError as e:
                self._fail(peer, e, None, "gathering logits")
            parts.append(rows)
            self.stats.bytes_received += HEADER.size + rows.nbytes
        self.stats.sync_s += time.perf_counter() - t
        return np.concatenate(parts)

    def close(self) -> None:
        return None


class RootMeshSync(RootSide):
    """The root as node 0 of the mesh: its links are its connections to the workers,
    peers[k] being node k + 1."""

    def __init__(self, peers: Sequence[Peer], dim: int, batch: int, wire: str,
                 spin_us: int = 0):
        super().__init__(peers)
        self.mesh = MeshExchange([None] + self.peers, 0, dim, batch, wire, spin_us)

    def all_reduce(self, buf: np.ndarray, layer: int, phase: str) -> None:
        t = time.perf_counter()
        try:
            length = self.mesh.all_reduce(buf, f"layer {layer} {phase}")
        except _LinkFailure as e:
            link = self.peers[e.index - 1]
            blamed = [p for p in self.peers if p.node_id == e.blamed_node]
            if blamed and blamed[0] is not link:
                self._fail(blamed[0], e, layer, phase, reported_by=link)
            self._fail(link, e, layer, phase)
        self.stats.bytes_sent += len(self.peers) * (HEADER.size + length)
        self.stats.bytes_received += len(self.peers) * (HEADER.size + length)
        self.stats.sync_s += time.perf_counter() - t


class WorkerSide:
    """A worker's LOGITS, and its all-reduce before the root has linked it to the mesh:
    none (an all-reduce then is the root's protocol error); a topology adds all_reduce."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.stats = SyncStats()
        self.start_pos = 0

    def start_forward(self, x, start_pos, logits) -> None:
        return None

    def all_reduce(self, buf: np.ndarray, layer: int, phase: str) -> None:
        raise ProtocolError(f"node {self.conn.peer}: FORWARD before MESH (layer {layer} "
                            f"{phase}): this node is not linked to its peers yet")

    def gather_logits(self, local: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        self.conn.send(Kind.LOGITS, np.ascontiguousarray(local, dtype=np.float32))
        self.stats.bytes_sent += HEADER.size + local.nbytes
        self.stats.sync_s += time.perf_counter() - t
        return local

    def close(self) -> None:
        return None


class WorkerMeshSync(WorkerSide):
    """A worker as node `index` of the mesh: links[0] is its root, the others the workers
    it connected to or accepted (cluster/worker.py). A failed link raises NodeFailure
    naming that node; the worker tells the root before it drops the session."""

    def __init__(self, links: Sequence[Optional[Peer]], index: int, dim: int, batch: int,
                 wire: str, spin_us: int = 0):
        super().__init__(links[0].conn)
        self.mesh = MeshExchange(links, index, dim, batch, wire, spin_us)

    def all_reduce(self, buf: np.ndarray, layer: int, phase: str) -> None:
        t = time.perf_counter()
        try:
            length = self.mesh.all_reduce(buf, f"layer {layer} {phase}")
        except _LinkFailure as e:
            peer = self.mesh.links[e.index]
            raise NodeFailure(f"node {peer.node_id} failed at position {self.start_pos}, "
                              f"layer {layer} ({phase}): {e}", peer.node_id, self.start_pos,
                              layer, phase, cause=str(e)) from None
        others = len(self.mesh.others)
        self.stats.bytes_sent += others * (HEADER.size + length)
        self.stats.bytes_received += others * (HEADER.size + length)
        self.stats.sync_s += time.perf_counter() - t

    def close(self) -> None:
        """Close the links to the other workers (the root's connection is its owner's)."""
        for i, peer in self.mesh.others:
            if i != 0:
                peer.conn.close()


def _exit_status(process) -> str:
    """How a local child ended, waiting briefly for the kernel to reap it."""
    import signal

    for _ in range(20):
        code = process.poll()
        if code is not None:
            break
        time.sleep(0.05)
    else:
        return ""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process (pid {process.pid}) was killed by {name}"
    return f"the process (pid {process.pid}) exited with status {code}"
