# cython: language_level=3, boundscheck=False, wraparound=False, binding=True
"""The compiled kernels: thin checked wrappers around the C code in kernels/src.

Every function has the name and arguments of its twin in kernels/reference.py (the
numpy contract). Each wrapper checks every dtype, shape and stride and raises
ValueError with the numbers; the C kernels then run with the GIL released and never
validate anything themselves.

Arrays are numpy arrays whose last axis is contiguous; the row stride may be larger
(weights may be column slices of a bigger matrix, w[:, a:b]). Read-only arrays (a
memory-mapped model file) are fine wherever the kernel only reads.

Instruction-set paths: kernel_path() names the active one, available_paths() lists the
ones this CPU supports, use_path(name) switches; DLLAMA_KERNELS=<name> picks one at
import. Compiles with Cython 0.29 (Debian bookworm) and Cython 3.x.
"""
import logging
import os

import numpy as np

from libc.stdint cimport int64_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc

log = logging.getLogger(__name__)

cdef extern from "dl_kernels.h":
    ctypedef struct dl_isa:
        const char *name

    const dl_isa *dl_isa_best() noexcept nogil
    const dl_isa *dl_isa_by_name(const char *name) noexcept nogil
    int dl_isa_supported(const dl_isa *isa) noexcept nogil
    const dl_isa *dl_isa_all[]

    int dl_matmul(const dl_isa *isa, int type, int64_t k,
                  const void *w, int64_t ldw, int64_t nr,
                  const void *x, int64_t ldx, int64_t nc,
                  float *y, int64_t ldy, int n_threads) noexcept nogil
    void dl_quantize_rows_q8_0(const dl_isa *isa, const float *x, int64_t ldx,
                               void *y, int64_t ldy, int64_t n, int64_t k,
                               int n_threads) noexcept nogil
    void dl_rmsnorm_f32(const float *x, int64_t ldx, const float *w, float *out,
                        int64_t ldo, int64_t n, int64_t dim, float eps) noexcept nogil
    void dl_rope_f32(float *x, int64_t ldx, int64_t n, const int64_t *pos,
                     int64_t n_heads, int64_t head_dim,
                     const float *inv_freq) noexcept nogil
    void dl_softmax_f32(float *x, int64_t ldx, int64_t n, int64_t m) noexcept nogil
    void dl_silu_mul_f32(float *gate, int64_t ldg, const float *up, int64_t ldu,
                         int64_t n, int64_t m) noexcept nogil
    void dl_attention_f32(const float *q, int64_t ldq, int64_t n, int64_t start_pos,
                          const float *k_cache, const float *v_cache, int64_t ldkv,
                          int64_t n_heads, int64_t head_dim, int64_t kv_group,
                          int64_t q_head0, int64_t kv_head0,
                          float *out, int64_t ldo, float *scratch,
                          int n_threads) noexcept nogil

cdef extern from "dl_kernels.h":
    void dl_ops_use_isa(const dl_isa *isa) noexcept nogil
    ctypedef struct dl_matmul_arg:
        int type
        int64_t k
        const void *w
        int64_t ldw, nr
        const void *x
        int64_t ldx, nc
        float *y
        int64_t ldy
    enum: DL_MULTI_MAX
    int dl_matmul_multi(const dl_isa *isa, int n_mats, const dl_matmul_arg *mats,
                        int n_threads) noexcept nogil

# GGML type ids of the weights (as in model/quants.py).
F32 = 0
F16 = 1
Q4_0 = 2
Q8_0 = 8
_TYPE_NAMES = {F32: "f32", F16: "f16", Q4_0: "q4_0", Q8_0: "q8_0"}
_BLOCK_BYTES = {Q4_0: 18, Q8_0: 34}
cdef enum:
    QK = 32
    Q8_0_BYTES = 34

_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)
_U8 = np.dtype(np.uint8)
_I64 = np.dtype(np.int64)

cdef const dl_isa *_isa = dl_isa_best()
dl_ops_use_isa(_isa)


# ---------------------------------------------------------------- paths

def kernel_path():
    """Name of the active instruction-set path ("avx512vnni", "avx2", "scalar", ...)."""
    return _isa.name.decode()


def available_paths():
    """Names of the paths this CPU supports, slowest first (the best one is last)."""
    cdef int i = 0
    names = []
    while dl_isa_all[i] != NULL:
        if dl_isa_supported(dl_isa_all[i]):
            names.append(dl_isa_all[i].name.decode())
        i += 1
    return names


def use_path(name):
    """Make `name` the active path; ValueError if this CPU does not support it."""
    global _isa
    cdef const dl_isa *isa = NULL
    if isinstance(name, str):
        isa = dl_isa_by_name(name.encode())
    if isa == NULL:
        raise ValueError(f"kernel path {name!r} is not available here; "
                         f"available: {', '.join(available_paths())}")
    _isa = isa
    dl_ops_use_isa(isa)
    log.debug("kernel path: %s", kernel_path())


# ---------------------------------------------------------------- checks

cdef _check_array(str fn, str name, a, dtype, int ndim, bint writable=False):
    """Raise ValueError unless `a` is a numpy array of `dtype` with `ndim` axes, its
    last axis contiguous and its row stride a non-negative multiple of the item size."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{fn}: {name} must be a numpy array, found {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{fn}: {name} has dtype {a.dtype}, expected {dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{fn}: {name} has {a.ndim} dimensions {a.shape}, expected {ndim}")
    if writable and not a.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only, it must be writable")
    cdef Py_ssize_t itemsize = a.itemsize
    if a.shape[ndim - 1] > 1 and a.strides[ndim - 1] != itemsize:
        raise ValueError(f"{fn}: {name}'s last axis must be contiguous: its stride is "
                         f"{a.strides[ndim - 1]} bytes, expected {itemsize}")
    if ndim == 2 and a.shape[0] > 1 and (a.strides[0] < 0 or a.strides[0] % itemsize):
        raise ValueError(f"{fn}: {name}'s row stride is {a.strides[0]} bytes, expected a "
                         f"non-negative multiple of {itemsize}")


cdef inline int64_t _ld(a):
    """Distance between rows of a 2-D array, in items."""
    if a.shape[0] > 1:
        return a.strides[0] // a.itemsize
    return a.shape[1]


cdef int _check_threads(str fn, int n_threads) except -1:
    if n_threads < 1:
        raise ValueError(f"{fn}: n_threads is {n_threads}, expected 1 or more")
    return 0


cdef _check_same_shape(str fn, str name_a, a, str name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{fn}: {name_a} has shape {a.shape} but {name_b} has {b.shape}; "
                         f"they must match")


# ---------------------------------------------------------------- matmul

def quantize_q8_0(x, out, int n_threads=1):
    """x float32 (n, k), k a multiple of 32 -> out uint8 (n, k // 32 * 34), q8_0 blocks."""
    _check_array("quantize_q8_0", "x", x, _F32, 2)
    _check_array("quantize_q8_0", "out", out, _U8, 2, writable=True)
    _check_threads("quantize_q8_0", n_threads)
    cdef int64_t n = x.shape[0], k = x.shape[1]
    if k % QK:
        raise ValueError(f"quantize_q8_0: x has {k} columns, expected a multiple of {QK}")
    if out.shape[0] != n or out.shape[1] != k // QK * Q8_0_BYTES:
        raise ValueError(f"quantize_q8_0: out has shape {out.shape}, expected ({n}, "
                         f"{k // QK * Q8_0_BYTES}) for x of shape {x.shape}")
    if n == 0 or k == 0:
        return
    cdef const float[:, :] xv = x
    cdef uint8_t[:, :] ov = out
    cdef int64_t ldx = _ld(x), ldo = _ld(out)
    with nogil:
        dl_quantize_rows_q8_0(_isa, &xv[0, 0], ldx, &ov[0, 0], ldo, n, k, n_threads)


cdef int _matmul_arg(str fn, w, int wtype, x, out, dl_matmul_arg *a) except -1:
    """Check the arrays of one matmul (shapes as matmul documents them) and fill `a`.
    Returns 1 when there is nothing to compute (no rows or tokens; k == 0 zeroes out),
    else 0. The pointers stay valid while the caller holds the arrays."""
    if wtype not in _TYPE_NAMES:
        raise ValueError(f"{fn}: weight type {wtype} is not one of "
                         f"F32=0, F16=1, Q4_0=2, Q8_0=8")
    cdef str tname = _TYPE_NAMES[wtype]
    cdef int64_t k, rows, n, row_bytes, block_bytes
    _check_array(fn, "out", out, _F32, 2, writable=True)
    if wtype in _BLOCK_BYTES:
        block_bytes = _BLOCK_BYTES[wtype]
        _check_array(fn, "w", w, _U8, 2)
        _check_array(fn, "x", x, _U8, 2)
        if x.shape[1] % Q8_0_BYTES:
            raise ValueError(f"{fn}: x has {x.shape[1]} bytes per row, expected q8_0 "
                             f"blocks: a multiple of {Q8_0_BYTES}")
        k = x.shape[1] // Q8_0_BYTES * QK
        row_bytes = k // QK * block_bytes
        if w.shape[1] != row_bytes:
            raise ValueError(f"{fn}: x holds {x.shape[1]} bytes of q8_0 per row (k = {k}); "
                             f"{tname} weights need {k} // {QK} * {block_bytes} = "
                             f"{row_bytes} bytes per row, found {w.shape[1]}")
    else:
        _check_array(fn, "w", w, _F32 if wtype == F32 else _F16, 2)
        _check_array(fn, "x", x, _F32, 2)
        k = x.shape[1]
        if w.shape[1] != k:
            raise ValueError(f"{fn}: x has {k} columns, {tname} weights need {k} "
                             f"columns per row, found {w.shape[1]}")
    rows, n = w.shape[0], x.shape[0]
    if out.shape[0] != n or out.shape[1] != rows:
        raise ValueError(f"{fn}: out has shape {out.shape}, expected ({n}, {rows}) "
                         f"for {n} tokens and {rows} weight rows")
    if rows == 0 or n == 0:
        return 1
    if k == 0:
        out[...] = 0
        return 1

    cdef const uint8_t[:, :] wq
    cdef const uint16_t[:, :] wh
    cdef const float[:, :] wf
    cdef const uint8_t[:, :] xq
    cdef const float[:, :] xf
    cdef float[:, :] ov = out
    if wtype in _BLOCK_BYTES:
        wq = w
        xq = x
        a.w = &wq[0, 0]
        a.x = &xq[0, 0]
    else:
        if wtype == F16:
            wh = w.view(np.uint16)
            a.w = &wh[0, 0]
        else:
            wf = w
            a.w = &wf[0, 0]
        xf = x
        a.x = &xf[0, 0]
    a.type = wtype
    a.k = k
    a.ldw = w.strides[0] if rows > 1 else w.shape[1] * w.itemsize
    a.nr = rows
    a.ldx = x.strides[0] if n > 1 else x.shape[1] * x.itemsize
    a.nc = n
    a.y = &ov[0, 0]
    a.ldy = _ld(out)
    return 0


def matmul(w, int wtype, x, out, int n_threads=1):
    """out[t, r] = dot(w[r], x[t]).

    w    F32: float32 (rows, k); F16: float16 (rows, k);
         Q4_0 / Q8_0: uint8 (rows, k // 32 * block_bytes) (18 and 34 bytes a block)
    x    q8_0 activations, uint8 (n, k // 32 * 34), for Q4_0 / Q8_0 weights;
         float32 (n, k) for F32 / F16 weights
    out  float32 (n, rows)
    """
    cdef dl_matmul_arg a
    _check_threads("matmul", n_threads)
    if _matmul_arg("matmul", w, wtype, x, out, &a):
        return
    cdef int rc
    with nogil:
        rc = dl_matmul(_isa, a.type, a.k, a.w, a.ldw, a.nr, a.x, a.ldx, a.nc, a.y, a.ldy,
                       n_threads)
    if rc != 0:
        raise ValueError(f"matmul: the {kernel_path()} path has no kernel for "
                         f"{_TYPE_NAMES[wtype]}")


def matmul_multi(items, x, xq, int n_threads=1):
    """matmul for several weights that share one input, in one parallel call.

    items  a sequence of (w, wtype, out), at most 16; each as matmul's arguments
    x      float32 (n, k), the input of F32 / F16 weights (None if there are none)
    xq     uint8 (n, k // 32 * 34), its q8_0 blocks, for Q4_0 / Q8_0 weights (None if
           there are none)
    Each out gets the bits matmul(w, wtype, x or xq, out, n_threads) gives it.
    """
    cdef dl_matmul_arg args[DL_MULTI_MAX]
    cdef int n_mats = 0, rc
    _check_threads("matmul_multi", n_threads)
    items = list(items)
    if len(items) > DL_MULTI_MAX:
        raise ValueError(f"matmul_multi: {len(items)} weights, at most {DL_MULTI_MAX}")
    for i, item in enumerate(items):
        if len(item) != 3:
            raise ValueError(f"matmul_multi: item {i} has {len(item)} values, expected "
                             f"(w, wtype, out)")
        w, wtype, out = item
        xi = xq if wtype in _BLOCK_BYTES else x
        if _matmul_arg(f"matmul_multi: item {i}", w, wtype, xi, out, &args[n_mats]) == 0:
            n_mats += 1
    if n_mats == 0:
        return
    with nogil:
        rc = dl_matmul_multi(_isa, n_mats, args, n_threads)
    if rc != 0:
        raise ValueError(f"matmul_multi: the {kernel_path()} path has no kernel for one "
                         f"of the weight types {[item[1] for item in items]}")


# ---------------------------------------------------------------- small kernels

def rmsnorm(x, weight, float eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight, per row. x, out float32 (n, dim);
    weight float32 (dim,)."""
    _check_array("rmsnorm", "x", x, _F32, 2)
    _check_array("rmsnorm", "weight", weight, _F32, 1)
    _check_array("rmsnorm", "out", out, _F32, 2, writable=True)
    _check_same_shape("rmsnorm", "x", x, "out", out)
    cdef int64_t n = x.shape[0], dim = x.shape[1]
    if weight.shape[0] != dim:
        raise ValueError(f"rmsnorm: weight has {weight.shape[0]} values, expected dim = {dim}")
    if n == 0 or dim == 0:
        return
    cdef const float[:, :] xv = x
    cdef const float[:] wv = weight
    cdef float[:, :] ov = out
    cdef int64_t ldx = _ld(x), ldo = _ld(out)
    with nogil:
        dl_rmsnorm_f32(&xv[0, 0], ldx, &wv[0], &ov[0, 0], ldo, n, dim, eps)


def rope(x, positions, int64_t head_dim, inv_freq):
    """In place. x float32 (n, n_heads * head_dim); pairs (2i, 2i+1) of each head
    rotate by positions[t] * inv_freq[i]. positions: n integers; inv_freq float32
    (head_dim // 2,)."""
    _check_array("rope", "x", x, _F32, 2, writable=True)
    _check_array("rope", "inv_freq", inv_freq, _F32, 1)
    pos = np.asarray(positions)
    if pos.dtype.kind not in "iu" or pos.ndim != 1:
        raise ValueError(f"rope: positions must be a 1-D array of integers, found "
                         f"{pos.ndim}-D {pos.dtype}")
    pos = np.ascontiguousarray(pos, dtype=_I64)
    cdef int64_t n = x.shape[0], width = x.shape[1]
    if pos.shape[0] != n:
        raise ValueError(f"rope: {pos.shape[0]} positions for {n} rows of x")
    if head_dim <= 0 or head_dim % 2 or width % head_dim:
        raise ValueError(f"rope: head_dim {head_dim} must be even and divide x's "
                         f"{width} columns")
    if inv_freq.shape[0] != head_dim // 2:
        raise ValueError(f"rope: inv_freq has {inv_freq.shape[0]} values, expected "
                         f"head_dim // 2 = {head_dim // 2}")
    if n == 0 or width == 0:
        return
    cdef float[:, :] xv = x
    cdef const int64_t[:] pv = pos
    cdef const float[:] fv = inv_freq
    cdef int64_t ldx = _ld(x), n_heads = width // head_dim
    with nogil:
        dl_rope_f32(&xv[0, 0], ldx, n, &pv[0], n_heads, head_dim, &fv[0])


def softmax(x):
    """In place, per row of a float32 (n, m) array."""
    _check_array("softmax", "x", x, _F32, 2, writable=True)
    cdef int64_t n = x.shape[0], m = x.shape[1]
    if n == 0 or m == 0:
        return
    cdef float[:, :] xv = x
    cdef int64_t ldx = _ld(x)
    with nogil:
        dl_softmax_f32(&xv[0, 0], ldx, n, m)


def silu_mul(gate, up):
    """In place: gate = silu(gate) * up. Both float32 (n, hidden_dim)."""
    _check_array("silu_mul", "gate", gate, _F32, 2, writable=True)
    _check_array("silu_mul", "up", up, _F32, 2)
    _check_same_shape("silu_mul", "gate", gate, "up", up)
    cdef int64_t n = gate.shape[0], m = gate.shape[1]
    if n == 0 or m == 0:
        return
    cdef float[:, :] gv = gate
    cdef const float[:, :] uv = up
    cdef int64_t ldg = _ld(gate), ldu = _ld(up)
    with nogil:
        dl_silu_mul_f32(&gv[0, 0], ldg, &uv[0, 0], ldu, n, m)


def attention(q, k_cache, v_cache, int64_t start_pos, int64_t head_dim, int64_t kv_group,
              out, int64_t q_head0=0, int64_t kv_head0=0, int n_threads=1):
    """Causal attention for n tokens at positions start_pos .. start_pos + n - 1.

    q       float32 (n, n_heads * head_dim): global query heads q_head0 .. + n_heads - 1
    k_cache float32 (seq_len, n_local_kv * head_dim), rows [0, start_pos + n) filled;
    v_cache the same shape. Global query head g reads local KV head g // kv_group - kv_head0.
    out     float32 (n, n_heads * head_dim)
    """
    fn = "attention"
    _check_array(fn, "q", q, _F32, 2)
    _check_array(fn, "k_cache", k_cache, _F32, 2)
    _check_array(fn, "v_cache", v_cache, _F32, 2)
    _check_array(fn, "out", out, _F32, 2, writable=True)
    _check_same_shape(fn, "q", q, "out", out)
    _check_same_shape(fn, "k_cache", k_cache, "v_cache", v_cache)
    _check_threads(fn, n_threads)
    if k_cache.shape[0] > 1 and k_cache.strides[0] != v_cache.strides[0]:
        raise ValueError(f"attention: k_cache's row stride is {k_cache.strides[0]} bytes "
                         f"but v_cache's is {v_cache.strides[0]}; they must match")
    cdef int64_t n = q.shape[0], seq_len = k_cache.shape[0]
    if head_dim <= 0 or q.shape[1] % head_dim or k_cache.shape[1] % head_dim:
        raise ValueError(f"attention: head_dim {head_dim} must divide q's {q.shape[1]} "
                         f"and the caches' {k_cache.shape[1]} columns")
    if kv_group < 1:
        raise ValueError(f"attention: kv_group is {kv_group}, expected 1 or more")
    if start_pos < 0 or start_pos + n > seq_len:
        raise ValueError(f"attention: positions [{start_pos}, {start_pos + n}) do not fit "
                         f"the caches' {seq_len} rows")
    cdef int64_t n_heads = q.shape[1] // head_dim, n_kv = k_cache.shape[1] // head_dim
    if n == 0 or n_heads == 0:
        return
    cdef int64_t kv_first = q_head0 // kv_group - kv_head0
    cdef int64_t kv_last = (q_head0 + n_heads - 1) // kv_group - kv_head0
    if q_head0 < 0 or kv_head0 < 0 or kv_first < 0 or kv_last >= n_kv:
        raise ValueError(f"attention: query heads [{q_head0}, {q_head0 + n_heads}) read "
                         f"local KV heads [{kv_first}, {kv_last + 1}) with kv_head0 "
                         f"{kv_head0}, but the caches hold {n_kv} KV heads")
    if n_threads > n * n_heads:
        n_threads = <int>(n * n_heads)
    cdef const float[:, :] qv = q
    cdef const float[:, :] kv = k_cache
    cdef const float[:, :] vv = v_cache
    cdef float[:, :] ov = out
    cdef int64_t ldq = _ld(q), ldkv = _ld(k_cache), ldo = _ld(out)
    cdef float *scratch = <float *>malloc(n_threads * (start_pos + n) * sizeof(float))
    if scratch == NULL:
        raise MemoryError(f"attention: no memory for {n_threads} x {start_pos + n} scores")
    try:
        with nogil:
            dl_attention_f32(&qv[0, 0], ldq, n, start_pos, &kv[0, 0], &vv[0, 0], ldkv,
                             n_heads, head_dim, kv_group, q_head0, kv_head0,
                             &ov[0, 0], ldo, scratch, n_threads)
    finally:
        free(scratch)


# ---------------------------------------------------------------- the mesh all-reduce's sum

cdef extern from "wire_sum.h":
    void dl_sum_parts_q8_0(const uint8_t *x, int64_t ld_part, int64_t ld_row,
                           int64_t n_parts, int64_t n, int64_t dim, float *out,
                           int64_t ldo) noexcept nogil


def sum_parts_q8_0(parts, out):
    """parts uint8 (n_parts, n, dim // 32 * 34): q8_0 rows of n_parts partial outputs
    (any non-negative strides on the first two axes, the last contiguous) -> out float32
    (n, dim) = the decoded parts added in part order, every product and sum rounded to
    float on its own: the bits of cluster/wire.py's sum_parts_into on every CPU."""
    if not isinstance(parts, np.ndarray) or parts.dtype != _U8 or parts.ndim != 3:
        raise ValueError(f"sum_parts_q8_0: parts must be a uint8 array of 3 dimensions, "
                         f"found {getattr(parts, 'dtype', type(parts).__name__)} "
                         f"{getattr(parts, 'shape', '')}")
    _check_array("sum_parts_q8_0", "out", out, _F32, 2, writable=True)
    cdef int64_t n_parts = parts.shape[0], n = parts.shape[1], width = parts.shape[2]
    if width % Q8_0_BYTES:
        raise ValueError(f"sum_parts_q8_0: parts have {width} bytes per row, expected "
                         f"q8_0 blocks: a multiple of {Q8_0_BYTES}")
    cdef int64_t dim = width // Q8_0_BYTES * QK
    if out.shape[0] != n or out.shape[1] != dim:
        raise ValueError(f"sum_parts_q8_0: out has shape {out.shape}, expected ({n}, {dim}) "
                         f"for parts of shape {parts.shape}")
    if n_parts < 1:
        raise ValueError("sum_parts_q8_0: parts holds no part, expected 1 or more")
    if n == 0 or dim == 0:
        return
    if (width > 1 and parts.strides[2] != 1) or parts.strides[0] < 0 or parts.strides[1] < 0:
        raise ValueError(f"sum_parts_q8_0: parts have strides {parts.strides}, expected "
                         f"non-negative ones and a contiguous last axis")
    cdef const uint8_t[:, :, :] pv = parts
    cdef float[:, :] ov = out
    cdef int64_t ld_part = parts.strides[0], ld_row = parts.strides[1], ldo = _ld(out)
    with nogil:
        dl_sum_parts_q8_0(&pv[0, 0, 0], ld_part, ld_row, n_parts, n, dim, &ov[0, 0], ldo)


# ---------------------------------------------------------------- import-time choice

def _path_from_env():
    name = os.environ.get("DLLAMA_KERNELS", "")
    if name:
        try:
            use_path(name)
        except ValueError as e:
            raise ValueError(f"DLLAMA_KERNELS={name}: {e}") from None
    log.debug("kernel path: %s (available: %s)", kernel_path(), ", ".join(available_paths()))


_path_from_env()
