"""The synchronizer over TCP: an all-gather mesh (the default) or a star around the root.

Per forward step the root sends FORWARD (the embedded input) to every worker; at the end
every worker sends its LOGITS rows to the root. Per layer there are two all-reduces:

  mesh  every node encodes its partial output once, sends the same PART frame to every
        other node and adds all N partials in node order (cluster/wire.py's
        sum_parts_into): one one-way trip per all-reduce, bit-identical sums everywhere.
        The sends never block (two nodes sending large batches at each other would both
        stall on full socket buffers): what does not fit is sent as the peer drains it,
        while this node receives.
  star  each worker sends its PART to the root, which adds them in node order and sends
        the SUM back: a round trip through the root per all-reduce.

Receives are fixed-size, into buffers allocated once. Every failure is a NodeFailure that
names the node, the position, the layer and phase, and the cause.
"""
from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from dllama_node.cluster.protocol import (FORWARD_HEADER, HEADER, MAGIC, PROTOCOL_VERSION,
                                          Connection, Kind)
from dllama_node.cluster.wire import decode, encode, row_bytes, sum_parts_q8_0_kernel
from dllama_node.common.errors import ClusterError, ProtocolError
from dllama_node.model import quants


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


def _wire_buffer(n: int, dim: int, wire: str) -> np.ndarray:
    if wire == "f32":
        return np.zeros((n, dim), np.float32)
    return np.zeros((n, dim // quants.QK * quants.Q8_0_BLOCK_BYTES), np.uint8)


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


class MeshExchange:
    """One node's all-gather of equal-sized PART frames over its links to every other node.

    links: one Peer per node in node order, None at this node's own index. frames[i]
    (HEADER.size + batch * row bytes, allocated once) holds what node i sent: this node
    encodes into its own frame, the others' arrive in theirs; parts[i] is its payload.
    The sum decodes all N parts and adds them in node order in one kernel call (q8_0) or
    numpy adds (f32): the arithmetic of cluster/wire.py's sum_parts_into, with no
    allocation per call. The step itself -- sends, polls, receives -- runs in one kernel
    call without the GIL (kernels/src/mesh_exchange.h); the same step in Python remains
    for a build without it. A failure raises _LinkFailure naming the node."""

    USE_KERNEL = True        # tests switch it off to run the Python step

    def __init__(self, links: Sequence[Optional[Peer]], index: int, dim: int, batch: int,
                 wire: str, spin_us: int = 0):
        self.links, self.index, self.wire = list(links), index, wire
        # poll without sleeping for up to spin_max_s while most steps end within it: a
        # peer a few microseconds behind then costs no sleep and wake-up; when the waits
        # are long (a busy or oversubscribed machine) the node sleeps at once instead
        self.spin_max_s, self.spin_s = spin_us * 1e-6, 0.0
        self.short_steps = 1.0                # running share of steps within spin_max_s
        self.others = [(i, p) for i, p in enumerate(self.links) if p is not None]
        n_nodes = len(self.links)
        self.row_bytes = row_bytes(dim, wire)
        size = HEADER.size + batch * self.row_bytes
        self.frames = np.zeros((n_nodes, size), np.uint8)             # (n_nodes, header + payload)
        self.views = [memoryview(f) for f in self.frames]
        if wire == "f32":                                             # (n_nodes, batch, dim)
            self.parts = np.ndarray((n_nodes, batch, dim), np.float32, buffer=self.frames,
                                    offset=HEADER.size, strides=(size, 4 * dim, 4))
        else:                                                         # (n_nodes, batch, width)
            self.parts = np.ndarray((n_nodes, batch, self.row_bytes), np.uint8,
                                    buffer=self.frames, offset=HEADER.size,
                                    strides=(size, self.row_bytes, 1))
            self.sum_q8_0 = sum_parts_q8_0_kernel()
        self.header_length = -1
        self.by_fd = {p.conn.sock.fileno(): (i, p) for i, p in self.others}
        self.poller = select.poll()
        self.timeout_s = min((p.conn.timeout_s for _, p in self.others), default=0.0)
        # the whole step in C (kernels/src/mesh_exchange.h) where the build has it
        from dllama_node.kernels import _kernels

        self.kernel = getattr(_kernels, "mesh_exchange", None) if self.USE_KERNEL else None
        self.fds = np.array([p.conn.sock.fileno() for _, p in self.others], np.int32)
        self.nodes = np.array([i for i, _ in self.others], np.int32)

    def all_reduce(self, buf: np.ndarray, what: str) -> int:
        """buf (n, dim) float32 <- the sum of every node's part in node order. Returns the
        payload bytes of one frame."""
        n = buf.shape[0]
        length = n * self.row_bytes
        own = self.parts[self.index, :n]
        if self.wire == "f32":
            own[...] = buf
        else:
            encode(buf, self.wire, own)
        if length != self.header_length:      # the header changes with n alone
            HEADER.pack_into(self.frames[self.index], 0, MAGIC, PROTOCOL_VERSION,
                             int(Kind.PART), length)
            self.header_length = length
        self._exchange(HEADER.size + length, length, what)
        parts = self.parts[:, :n]
        if self.wire != "f32":
            self.sum_q8_0(parts, buf)
        elif len(parts) == 1:
            np.copyto(buf, parts[0])
        else:
            np.add(parts[0], parts[1], out=buf)
            for part in parts[2:]:
                buf += part
        return length

    def _exchange(self, size: int, length: int, what: str) -> None:
        if not self.others:                   # a cluster of one: nothing to exchange
            return
        if self.spin_max_s:
            self.spin_s = self.spin_max_s if self.short_steps >= 0.5 else 0.0
            t = time.perf_counter()
        if self.kernel is not None:
            status, link, err, got = self.kernel(self.fds, self.nodes, self.frames, self.index,
                                                 size, int(1000 * self.timeout_s),
                                                 int(1e9 * self.spin_s))
            if status:
                self._kernel_failure(status, link, err, got, size, length, what)
        else:
            self._python_exchange(size, length, what)
        if self.spin_max_s:
            short = time.perf_counter() - t <= self.spin_max_s
            self.short_steps += 0.05 * (short - self.short_steps)

    def _python_exchange(self, size: int, length: int, what: str) -> None:
        out = self.views[self.index][:size]
        sending: Dict[int, int] = {}          # node index -> bytes of our frame sent so far
        for i, peer in self.others:
            peer.conn.use_timeout(None)       # we poll ourselves: no poll inside Python's calls
            sent = self._send(i, peer, out, 0, what)
            if sent < size:
                sending[i] = sent
        got = {i: 0 for i, _ in self.others}  # node index -> bytes of its frame received
        poller = self.poller
        for fd, (i, _) in self.by_fd.items():
            poller.register(fd, select.POLLIN | (select.POLLOUT if i in sending else 0))
        try:
            while got or sending:
                events = self._poll(poller)
                if not events:
                    late = min(got) if got else min(sending)
                    doing = "waiting for" if got else "sending"
                    raise _LinkFailure(late, f"no answer in {self.timeout_s:.1f} s while "
                                             f"{doing} PART of {what}")
                for fd, event in events:
                    i, peer = self.by_fd[fd]
                    if i in sending and event & (select.POLLOUT | select.POLLERR
                                                 | select.POLLHUP):
                        sent = self._send(i, peer, out, sending[i], what)
                        if sent < size:
                            sending[i] = sent
                        else:
                            del sending[i]
                    if i in got and event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        if self._receive(i, peer, got, size, out, what):
                            del got[i]
                    if i not in got and i not in sending:
                        poller.unregister(fd)
                    elif i not in sending:
                        poller.modify(fd, select.POLLIN)
        finally:
            for fd, (i, _) in self.by_fd.items():
                if i in got or i in sending:
                    poller.unregister(fd)

    def _kernel_failure(self, status: int, link: int, err: int, got: int, size: int,
                        length: int, what: str) -> None:
        """Raise the _LinkFailure of a failed kernel step, in the Python path's words."""
        i, peer = self.others[link]
        if status == 1:
            raise _LinkFailure(i, f"connection closed while waiting for PART of {what} "
                                  f"({got} of {size} bytes received)")
        if status in (2, 3):
            doing = "waiting for" if status == 2 else "sending"
            raise _LinkFailure(i, f"connection lost while {doing} PART of {what} "
                                  f"({os.strerror(err)})")
        if status in (4, 5):
            doing = "waiting for" if status == 4 else "sending"
            raise _LinkFailure(i, f"no answer in {self.timeout_s:.1f} s while {doing} PART "
                                  f"of {what}")
        try:
            kind, frame_length = peer.conn.check_header(self.views[i])
        except ProtocolError as e:
            raise _LinkFailure(i, str(e)) from None
        self._unexpected(i, peer, kind, frame_length, got, length, what)
        raise _LinkFailure(i, f"status {status} from the exchange kernel")

    def _poll(self, poller) -> list:
        """Ready links; for the first spin_s keep the CPU and ask again (a peer a few
        microseconds behind costs no sleep and wake-up), then sleep up to the timeout."""
        if self.spin_s > 0:
            deadline = time.perf_counter() + self.spin_s
            while True:
                events = poller.poll(0)
                if events or time.perf_counter() > deadline:
                    break
            if events:
                return events
        return poller.poll(1000 * self.timeout_s)

    def _send(self, i: int, peer: Peer, out: memoryview, sent: int, what: str) -> int:
        try:
            return sent + peer.conn.sock.send(out[sent:], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return sent
        except OSError as e:
            raise _LinkFailure(i, f"connection lost while sending PART of {what} "
                                  f"({e.strerror or e})") from None

    def _receive(self, i: int, peer: Peer, got: Dict[int, int], size: int, out: memoryview,
                 what: str) -> bool:
        """Read what node i has sent of its frame; True once the frame is whole. Its header
        must be ours byte for byte: a PART of the same length."""
        view, before = self.views[i], got[i]
        try:
            n = peer.conn.sock.recv_into(view[before:size], 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            raise _LinkFailure(i, f"connection lost while waiting for PART of {what} "
                                  f"({e.strerror or e})") from None
        if n == 0:
            raise _LinkFailure(i, f"connection closed while waiting for PART of {what} "
                                  f"({before} of {size} bytes received)")
        got[i] = before + n
        if before < HEADER.size <= got[i] and view[:HEADER.size] != out[:HEADER.size]:
            try:
                kind, frame_length = peer.conn.check_header(view)
            except ProtocolError as e:
                raise _LinkFailure(i, str(e)) from None
            self._unexpected(i, peer, kind, frame_length, got[i], size - HEADER.size, what)
        return got[i] == size

    def _unexpected(self, i: int, peer: Peer, kind: Kind, frame_length: int, got: int,
                    length: int, what: str) -> None:
        if kind != Kind.ERROR:
            raise _LinkFailure(i, f"expected PART of {what} ({length} bytes), got "
                                  f"{kind.name} ({frame_length} bytes)")
        have = bytes(self.views[i][HEADER.size:got])[:frame_length]
        try:
            import json

            rest = peer.conn.recv_bytes(frame_length - len(have), "ERROR")
            report = json.loads(have + rest)
        except (ClusterError, ValueError) as e:
            raise _LinkFailure(i, f"sent an ERROR that could not be read ({e})") from None
        blamed = report.get("failed_node") if isinstance(report, dict) else None
        message = report.get("message") if isinstance(report, dict) else None
        raise _LinkFailure(i, f"{message}", blamed_node=blamed)

    def close(self) -> None:
        for _, peer in self.others:
            peer.conn.close()


class _LinkFailure(ClusterError):
    """Inside an exchange: the link to node `index` failed, or that node reported the
    failure of `blamed_node`."""

    def __init__(self, index: int, message: str, blamed_node: Optional[str] = None):
        super().__init__(message)
        self.index, self.blamed_node = index, blamed_node


class _RootSide:
    """The root's FORWARD and LOGITS, and how it names a failed worker (both topologies)."""

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


class RootMeshSync(_RootSide):
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


class RootSync(_RootSide):
    """The root as the centre of the star: receive every PART, send back the SUM."""

    def __init__(self, peers: Sequence[Peer], dim: int, batch: int, wire: str):
        super().__init__(peers)
        self.dim, self.wire = dim, wire
        self.parts = [_wire_buffer(batch, dim, wire) for _ in self.peers]
        self.sum_wire = _wire_buffer(batch, dim, wire)
        self.scratch = np.zeros((batch, dim), np.float32)     # a decoded part

    def all_reduce(self, buf: np.ndarray, layer: int, phase: str) -> None:
        t = time.perf_counter()
        n = buf.shape[0]
        for peer, part in zip(self.peers, self.parts):
            view = part[:n]
            try:
                length = peer.conn.expect(Kind.PART, f"PART of layer {layer} {phase}")
                peer.conn.recv_payload_into(view, length, f"PART of layer {layer} {phase}")
            except ClusterError as e:
                self._fail(peer, e, layer, phase)
            buf += decode(view, self.wire, self.scratch[:n])
            self.stats.bytes_received += HEADER.size + view.nbytes
        out = encode(buf, self.wire, self.sum_wire[:n] if self.wire != "f32" else None)
        if self.wire != "f32":
            decode(out, self.wire, buf)
        for peer in self.peers:
            try:
                peer.conn.send(Kind.SUM, out)
            except ClusterError as e:
                self._fail(peer, e, layer, phase)
        self.stats.bytes_sent += len(self.peers) * (HEADER.size + out.nbytes)
        self.stats.sync_s += time.perf_counter() - t


class WorkerSync:
    """The worker's side of the star: send PART, receive SUM; send LOGITS."""

    def __init__(self, conn: Connection, dim: int, batch: int, wire: str):
        self.conn, self.dim, self.wire = conn, dim, wire
        self.part = _wire_buffer(batch, dim, wire)
        self.sum_wire = _wire_buffer(batch, dim, wire)
        self.stats = SyncStats()
        self.start_pos = 0

    def start_forward(self, x, start_pos, logits) -> None:
        return None

    def all_reduce(self, buf: np.ndarray, layer: int, phase: str) -> None:
        t = time.perf_counter()
        n = buf.shape[0]
        out = encode(buf, self.wire, self.part[:n] if self.wire != "f32" else None)
        self.conn.send(Kind.PART, out)
        view = self.sum_wire[:n]
        length = self.conn.expect(Kind.SUM, f"SUM of layer {layer} {phase}")
        self.conn.recv_payload_into(view, length, f"SUM of layer {layer} {phase}")
        decode(view, self.wire, buf)
        self.stats.bytes_sent += HEADER.size + out.nbytes
        self.stats.bytes_received += HEADER.size + view.nbytes
        self.stats.sync_s += time.perf_counter() - t

    def gather_logits(self, local: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        self.conn.send(Kind.LOGITS, np.ascontiguousarray(local, dtype=np.float32))
        self.stats.bytes_sent += HEADER.size + local.nbytes
        self.stats.sync_s += time.perf_counter() - t
        return local

    def close(self) -> None:
        return None


class WorkerMeshSync(WorkerSync):
    """A worker as node `index` of the mesh: links[0] is its root, the others the workers
    it connected to or accepted (cluster/worker.py). A failed link raises NodeFailure
    naming that node; the worker tells the root before it drops the session."""

    def __init__(self, links: Sequence[Optional[Peer]], index: int, dim: int, batch: int,
                 wire: str, spin_us: int = 0):
        super().__init__(links[0].conn, dim, batch, wire)
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
