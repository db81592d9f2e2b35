"""The star all-reduce, bench/compare_sync.py's baseline and nothing else's.

In the star every worker sends its PART to the root, which adds the parts in node order
(its own exact, each worker's as it crossed the wire) and answers every worker with the
sum, encoded for the wire, in a PART frame of its own; every node -- the root too --
continues from the sum as received. A round trip through the root per all-reduce, where
the product's mesh (cluster/sync_tcp.py) has one one-way trip.

It is put into a local cluster through the product's seams: StarRoot.link() replaces the
mesh with RootStar, StarWorker.unlinked_sync() gives each worker its WorkerStar, and
StarRoot.worker_program runs this file as the workers' program, so

    LocalCluster(options, root_class=StarRoot)

is a star cluster. Run as a script, this file is such a worker (cluster/worker.py's
command line).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import numpy as np

from dllama_node.cluster.protocol import HEADER, Connection, Kind
from dllama_node.cluster.root import ClusterRoot
from dllama_node.cluster.sync_tcp import Peer, RootSide, WorkerSide
from dllama_node.cluster.wire import decode, encode, row_bytes
from dllama_node.cluster.worker import Worker, main as worker_main
from dllama_node.common.errors import ClusterError


def _wire_buffer(batch: int, dim: int, wire: str) -> np.ndarray:
    """(batch, dim) values as they travel: float32 itself, or q8_0 blocks as bytes."""
    if wire == "f32":
        return np.zeros((batch, dim), np.float32)
    return np.zeros((batch, row_bytes(dim, wire)), np.uint8)


class RootStar(RootSide):
    """The root as the centre of the star: receive every PART, send back the sum."""

    def __init__(self, peers: Sequence[Peer], dim: int, batch: int, wire: str):
        super().__init__(peers)
        self.dim, self.wire = dim, wire
        self.parts = [_wire_buffer(batch, dim, wire) for _ in self.peers]
        self.sum_wire = _wire_buffer(batch, dim, wire)
        self.scratch = np.zeros((batch, dim), np.float32)     # a decoded part

    def all_reduce(self, buf: np.ndarray, layer: int, phase: str) -> None:
        t = time.perf_counter()
        n = buf.shape[0]
        what = f"PART of layer {layer} {phase}"
        for peer, part in zip(self.peers, self.parts):
            view = part[:n]
            try:
                peer.conn.recv_payload_into(view, peer.conn.expect(Kind.PART, what), what)
            except ClusterError as e:
                self._fail(peer, e, layer, phase)
            buf += decode(view, self.wire, self.scratch[:n])
            self.stats.bytes_received += HEADER.size + view.nbytes
        out = encode(buf, self.wire, self.sum_wire[:n] if self.wire != "f32" else None)
        if self.wire != "f32":
            decode(out, self.wire, buf)
        for peer in self.peers:
            try:
                peer.conn.send(Kind.PART, out)
            except ClusterError as e:
                self._fail(peer, e, layer, phase)
        self.stats.bytes_sent += len(self.peers) * (HEADER.size + out.nbytes)
        self.stats.sync_s += time.perf_counter() - t


class WorkerStar(WorkerSide):
    """A worker's side of the star: send its PART, receive the sum."""

    def __init__(self, conn: Connection, dim: int, batch: int, wire: str):
        super().__init__(conn)
        self.wire = wire
        self.part = _wire_buffer(batch, dim, wire)
        self.sum_wire = _wire_buffer(batch, dim, wire)

    def all_reduce(self, buf: np.ndarray, layer: int, phase: str) -> None:
        t = time.perf_counter()
        n = buf.shape[0]
        out = encode(buf, self.wire, self.part[:n] if self.wire != "f32" else None)
        self.conn.send(Kind.PART, out)
        view = self.sum_wire[:n]
        what = f"the sum of layer {layer} {phase}"
        self.conn.recv_payload_into(view, self.conn.expect(Kind.PART, what), what)
        decode(view, self.wire, buf)
        self.stats.bytes_sent += HEADER.size + out.nbytes
        self.stats.bytes_received += HEADER.size + view.nbytes
        self.stats.sync_s += time.perf_counter() - t


class StarRoot(ClusterRoot):
    """A root whose all-reduce is the star, and whose local workers are StarWorkers."""

    sync_mode = "star"
    worker_program = (os.path.abspath(__file__),)

    def link(self) -> RootStar:
        return RootStar(self.peers, self.model.config.dim, self.batch, self.wire)


class StarWorker(Worker):
    """A worker that answers the star from its LOADED on (a star root sends no MESH)."""

    def unlinked_sync(self, conn: Connection, transformer) -> WorkerStar:
        return WorkerStar(conn, transformer.cfg.dim, transformer.batch, self.assignment.wire)


if __name__ == "__main__":
    worker_main(sys.argv[1:], worker_class=StarWorker)
