"""One node's step of the mesh all-reduce: send its PART frame to every other node,
receive theirs, add all parts in node order (cluster/sync_tcp.py wraps it as the root's
and the workers' synchronizers).

The sends never block: two nodes sending large batches at each other at once would both
stall on full socket buffers, so what does not fit is sent as the peer drains it, while
this node receives. The step runs in one compiled call without the GIL
(cluster/mesh_exchange.h, the module cluster._mesh_exchange); the same step in Python
remains for a build without it.
"""
from __future__ import annotations

import os
import select
import socket
import time
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import numpy as np

from dllama_node.cluster.protocol import HEADER, MAGIC, PROTOCOL_VERSION, ErrorReport, Kind
from dllama_node.cluster.wire import encode, row_bytes, sum_parts_q8_0_kernel
from dllama_node.common.errors import ClusterError, ProtocolError

if TYPE_CHECKING:
    from dllama_node.cluster.sync_tcp import Peer


def _compiled_exchange():
    """The whole step in C (cluster/mesh_exchange.h), or None where the build lacks it."""
    try:
        from dllama_node.cluster._mesh_exchange import mesh_exchange
    except ImportError:
        return None
    return mesh_exchange


class _LinkFailure(ClusterError):
    """Inside an exchange: the link to node `index` failed, or that node reported the
    failure of `blamed_node`."""

    def __init__(self, index: int, message: str, blamed_node: Optional[str] = None):
        super().__init__(message)
        self.index, self.blamed_node = index, blamed_node


class MeshExchange:
    """One node's all-gather of equal-sized PART frames over its links to every other node.

    links: one Peer per node in node order, None at this node's own index. frames[i]
    (HEADER.size + batch * row bytes, allocated once) holds what node i sent: this node
    encodes into its own frame, the others' arrive in theirs; parts[i] is its payload.
    The sum decodes all N parts and adds them in node order in one kernel call (q8_0) or
    numpy adds (f32): the arithmetic of cluster/wire.py's sum_parts_into, with no
    allocation per call. The step itself -- sends, polls, receives -- runs in one compiled
    call without the GIL (cluster/mesh_exchange.h); the same step in Python remains for a
    build without it. A failure raises _LinkFailure naming the node."""

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
        self.kernel = _compiled_exchange() if self.USE_KERNEL else None
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
            report = ErrorReport.from_payload(json.loads(have + rest), peer.conn.peer)
        except (ClusterError, ValueError) as e:
            raise _LinkFailure(i, f"sent an ERROR that could not be read ({e})") from None
        raise _LinkFailure(i, report.message, blamed_node=report.failed_node)

    def close(self) -> None:
        for _, peer in self.others:
            peer.conn.close()
