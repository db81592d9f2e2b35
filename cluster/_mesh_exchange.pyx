# cython: language_level=3, boundscheck=False, wraparound=False, binding=True
"""The mesh all-reduce's socket step, compiled: one call sends this node's frame to every
other node and receives theirs (cluster/mesh_exchange.h) with the GIL released and no
Python between system calls. cluster/mesh.py calls it, and keeps the same step in Python
for a build without this module. Compiles with Cython 0.29 (Debian bookworm) and 3.x.
"""
import numpy as np

from libc.stdint cimport int64_t, uint8_t

cdef extern from "mesh_exchange.h":
    ctypedef struct dl_mesh_failure:
        int link
        int err
        int64_t got
    enum: DL_MESH_MAX_LINKS
    enum: DL_FRAME_HEADER
    int dl_mesh_exchange(int n_links, const int *fds, const int *node, const uint8_t *out,
                         int64_t size, uint8_t *frames, int64_t stride, int timeout_ms,
                         int64_t spin_ns, dl_mesh_failure *fail) noexcept nogil

_I32 = np.dtype(np.int32)
_U8 = np.dtype(np.uint8)


def mesh_exchange(fds, nodes, frames, int own, int64_t size, int timeout_ms,
                  int64_t spin_ns=0):
    """One all-gather step (cluster/mesh_exchange.h), the GIL released: send
    frames[own, :size] on every socket fds[j] (int32) and receive frames[nodes[j], :size]
    (nodes int32, each another row of frames, uint8 (n_nodes, stride) with contiguous
    rows). Returns (status, link, errno, bytes received from that link); status 0 is
    success, the others are mesh_exchange.h's DL_MESH_* failures."""
    for name, a in (("fds", fds), ("nodes", nodes)):
        if not isinstance(a, np.ndarray) or a.dtype != _I32 or a.ndim != 1 \
                or not a.flags.c_contiguous:
            raise ValueError(f"mesh_exchange: {name} must be a contiguous int32 vector")
    if not isinstance(frames, np.ndarray) or frames.dtype != _U8 or frames.ndim != 2 \
            or not frames.flags.c_contiguous or not frames.flags.writeable:
        raise ValueError("mesh_exchange: frames must be a writable C-contiguous uint8 array "
                         "of 2 dimensions")
    cdef int n_links = fds.shape[0]
    if nodes.shape[0] != n_links or not 0 < n_links <= DL_MESH_MAX_LINKS:
        raise ValueError(f"mesh_exchange: {n_links} sockets and {nodes.shape[0]} nodes, "
                         f"expected as many, 1 to {DL_MESH_MAX_LINKS}")
    cdef const int[::1] fv = fds
    cdef const int[::1] nv = nodes
    cdef uint8_t[:, ::1] frv = frames
    cdef int64_t n_rows = frames.shape[0], stride = frames.shape[1]
    cdef int k
    for k in range(n_links):
        if nv[k] < 0 or nv[k] >= n_rows or nv[k] == own or own < 0 or own >= n_rows:
            raise ValueError(f"mesh_exchange: nodes {nodes.tolist()} and own {own} must be "
                             f"distinct rows of frames (0 to {n_rows - 1})")
    if not DL_FRAME_HEADER <= size <= stride or timeout_ms < 0:
        raise ValueError(f"mesh_exchange: size {size} must be {DL_FRAME_HEADER} to "
                         f"{stride} bytes and timeout_ms {timeout_ms} not negative")
    cdef dl_mesh_failure fail
    cdef int rc
    fail.link, fail.err, fail.got = -1, 0, 0
    with nogil:
        rc = dl_mesh_exchange(n_links, &fv[0], &nv[0], &frv[own, 0], size, &frv[0, 0], stride,
                              timeout_ms, spin_ns, &fail)
    return rc, fail.link, fail.err, fail.got
