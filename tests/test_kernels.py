"""The compiled kernels against the numpy contract (kernels/reference.py), on every path.

Each test runs once per instruction-set path this CPU supports (scalar, AVX2,
AVX-512 VNNI, NEON ...). Oracles: kernels/reference.py (float64 numpy) for every kernel,
model/quants.py and the `gguf` package's quantizer for q8_0 quantization (bit-exact).
Shapes avoid powers of two on purpose (k = 32 * odd, rows 1, 3, 37, ...), weights are
also column slices of wider matrices, and thread counts 1, 2 and 3 are all used.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

from dllama_node import kernels as K
from dllama_node.kernels import reference as R
from dllama_node.model import quants

PATHS = K.available_paths()

# Tolerances: |got - want| <= RTOL * (|W| @ |X|.T) + ATOL for the matmuls (the bound
# scales with the magnitude of the summed terms, not of the result, which may cancel),
# and |got - want| <= RTOL * |want| + ATOL for the rest. The reference is float64.
TOL = {
    # kernel:          (rtol, atol)
    "matmul_q4_0": (2e-5, 1e-6),  # exact int32 block sums, float sums of blocks
    "matmul_q8_0": (2e-5, 1e-6),
    "matmul_f16": (5e-5, 1e-6),   # float32 sums of k products
    "matmul_f32": (5e-5, 1e-6),
    "rmsnorm": (2e-6, 1e-6),
    "rope": (2e-6, 2e-6),
    "softmax": (2e-6, 1e-9),
    "silu_mul": (2e-6, 1e-7),
    "attention": (2e-5, 2e-6),
}


@pytest.fixture(params=PATHS)
def path(request):
    """Run the test on one kernel path, then restore the default."""
    before = K.kernel_path()
    K.use_path(request.param)
    yield request.param
    K.use_path(before)


def assert_close(got, want, kernel, scale=None):
    rtol, atol = TOL[kernel]
    bound = rtol * (np.abs(want) if scale is None else scale) + atol
    err = np.abs(got.astype(np.float64) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (
        f"{kernel}: {int((err > bound).sum())} of {err.size} values off; worst at {worst}: "
        f"got {got[worst]!r}, want {want[worst]!r}, bound {bound[worst]:.3g}")


def rng_for(*key):
    """A generator seeded by the key (stable across runs: not hash(), which is salted)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ---------------------------------------------------------------- quantize_q8_0

def special_blocks() -> np.ndarray:
    """Blocks that separate roundf (halves away from zero) from round-to-even, zeros,
    tiny scales (f16 subnormal or zero d) and large values."""
    b = np.zeros((6, 32), np.float32)
    b[0, :] = np.arange(32) - 15.5          # amax 15.5: d = 15.5/127, halves after scaling
    b[1, 0] = 127.0
    b[1, 1:8] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]  # d = 1: exact halves
    b[2, :] = 0.0                           # d = 0 -> all q = 0
    b[3, :] = np.linspace(-1e-6, 1e-6, 32)  # d below the smallest normal f16
    b[4, :] = np.linspace(-3e4, 6e4, 32)
    b[5, ::2] = -7.0                        # amax on a negative value
    b[5, 1::2] = 3.25
    return b.reshape(1, -1)


# (67, 4160) is big enough for the driver to use every thread asked for
@pytest.mark.parametrize("n,k", [(1, 32), (3, 96), (5, 2080), (2, 32 * 67), (67, 4160)])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_quantize_q8_0_bit_exact(path, n, k, n_threads):
    x = (rng_for(n, k).standard_normal((n, k)) * 3).astype(np.float32)
    want = quants.quantize_q8_0(x)
    out = np.zeros_like(want)
    K.quantize_q8_0(x, out, n_threads)
    np.testing.assert_array_equal(out, want)


def test_quantize_q8_0_special_values_and_gguf_oracle(path):
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    x = np.concatenate([special_blocks(), special_blocks() * -3.0], axis=0)
    out = np.zeros((x.shape[0], x.shape[1] // 32 * 34), np.uint8)
    K.quantize_q8_0(x, out)
    np.testing.assert_array_equal(out, quants.quantize_q8_0(x))
    np.testing.assert_array_equal(out, gguf_quants.quantize(x, GGMLQuantizationType.Q8_0))
    # the halves of block 1 (d = 1) round away from zero
    q = out[0, 34 + 2:34 + 10].view(np.int8)
    np.testing.assert_array_equal(q, [127, 1, 2, 3, -1, -2, -3, 127])


def test_quantize_q8_0_strided_rows(path):
    x_wide = rng_for("qs").standard_normal((7, 200)).astype(np.float32)
    x = x_wide[:, 8:8 + 160]  # rows 200 floats apart
    out_wide = np.zeros((7, 5 * 34 + 20), np.uint8)
    out = out_wide[:, 10:10 + 5 * 34]
    K.quantize_q8_0(x, out, 2)
    np.testing.assert_array_equal(out, quants.quantize_q8_0(np.ascontiguousarray(x)))
    assert not out_wide[:, :10].any() and not out_wide[:, -10:].any()


# ---------------------------------------------------------------- matmul

TYPES = {"q4_0": K.Q4_0, "q8_0": K.Q8_0, "f16": K.F16, "f32": K.F32}


def make_weights(wtype: int, rows: int, k: int, seed) -> np.ndarray:
    wf = rng_for("w", seed, rows, k).standard_normal((rows, k)).astype(np.float32)
    if wtype == K.Q4_0:
        return quants.quantize_q4_0(wf)
    if wtype == K.Q8_0:
        return quants.quantize_q8_0(wf)
    return wf.astype(np.float16) if wtype == K.F16 else wf


def make_x(wtype: int, n: int, k: int, seed) -> np.ndarray:
    xf = rng_for("x", seed, n, k).standard_normal((n, k)).astype(np.float32)
    return quants.quantize_q8_0(xf) if wtype in (K.Q4_0, K.Q8_0) else xf


def check_matmul(w, wtype, x, n_threads, tname):
    """K.matmul against reference.matmul's float64 sum (before its cast to float32)."""
    n, rows = x.shape[0], w.shape[0]
    wf = R.dequantize_weights(np.ascontiguousarray(w), wtype).astype(np.float64)
    xf = (quants.dequantize_q8_0(x) if wtype in (K.Q4_0, K.Q8_0) else x).astype(np.float64)
    want = xf @ wf.T
    scale = np.abs(xf) @ np.abs(wf).T
    got = np.full((n, rows), np.nan, np.float32)
    K.matmul(w, wtype, x, got, n_threads)
    assert_close(got, want, f"matmul_{tname}", scale)
    return got


@pytest.mark.parametrize("tname", list(TYPES))
# k = 32 * 275 and 32 * 515 span 2 and 3 of the SIMD paths' k chunks (8192 values)
@pytest.mark.parametrize("rows,k,n", [
    (1, 32, 1), (3, 96, 1), (37, 160, 1), (37, 32 * 7, 5), (5, 32 * 9, 4), (70, 32 * 13, 67),
    (11, 32 * 275, 1), (7, 32 * 515, 4),
])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_matmul_against_reference(path, tname, rows, k, n, n_threads):
    wtype = TYPES[tname]
    w = make_weights(wtype, rows, k, 1)
    x = make_x(wtype, n, k, 2)
    check_matmul(w, wtype, x, n_threads, tname)


@pytest.mark.parametrize("tname", list(TYPES))
def test_matmul_large_decode_and_prompt(path, tname):
    """TinyLlama's FFN shapes: rows 5632, k 2048 (decode) and a prompt batch of 19."""
    wtype = TYPES[tname]
    w = make_weights(wtype, 5632, 2048, 3)
    for n in (1, 19):
        x = make_x(wtype, n, 2048, n)
        check_matmul(w, wtype, x, 2, tname)


@pytest.mark.parametrize("tname", list(TYPES))
def test_matmul_column_slice_of_weights(path, tname):
    """Weights that are a column slice w[:, a:b] of a wider matrix (rows far apart)."""
    wtype = TYPES[tname]
    k_total, k0, k = 32 * 11, 32 * 3, 32 * 5
    w_full = make_weights(wtype, 41, k_total, 4)
    if wtype in (K.Q4_0, K.Q8_0):
        bb = 18 if wtype == K.Q4_0 else 34
        w = w_full[:, k0 // 32 * bb:(k0 + k) // 32 * bb]
    else:
        w = w_full[:, k0:k0 + k]
    assert not w.flags.c_contiguous
    for n in (1, 9):
        x = make_x(wtype, n, k, 5)
        got = check_matmul(w, wtype, x, 3, tname)
        again = np.zeros_like(got)
        K.matmul(np.ascontiguousarray(w), wtype, x, again, 1)
        np.testing.assert_array_equal(got, again)


@pytest.mark.parametrize("tname", list(TYPES))
def test_matmul_same_bits_for_any_threads_and_batch(path, tname):
    """A (token, row) result does not depend on the thread count or the batch it is in."""
    wtype = TYPES[tname]
    w = make_weights(wtype, 133, 32 * 37, 6)
    x = make_x(wtype, 70, 32 * 37, 7)
    outs = []
    for n_threads in (1, 2, 3):
        out = np.zeros((70, 133), np.float32)
        K.matmul(w, wtype, x, out, n_threads)
        outs.append(out)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    one = np.zeros((1, 133), np.float32)
    for t in (0, 37, 69):
        K.matmul(w, wtype, x[t:t + 1], one, 2)
        np.testing.assert_array_equal(one[0], outs[0][t])


def test_matmul_reads_memmapped_read_only_weights(path, tmp_path):
    w = make_weights(K.Q4_0, 9, 32 * 3, 8)
    f = tmp_path / "w.bin"
    w.tofile(f)
    wm = np.memmap(f, dtype=np.uint8, mode="r", shape=w.shape)
    x = make_x(K.Q4_0, 2, 32 * 3, 9)
    a, b = np.zeros((2, 9), np.float32), np.zeros((2, 9), np.float32)
    K.matmul(wm, K.Q4_0, x, a)
    K.matmul(w, K.Q4_0, x, b)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_matmul_multi_gives_each_weight_the_bits_of_matmul(path, n, n_threads):
    """Q, K, V-like shapes of every weight type in one call, one with no rows and one
    column slice; each output is bit for bit what matmul gives it, and close to the
    float64 reference."""
    k = 32 * 23
    xf = rng_for("multi-x", n).standard_normal((n, k)).astype(np.float32)
    xq = quants.quantize_q8_0(xf)
    shapes = [("q4_0", 301), ("q8_0", 37), ("f16", 64), ("f32", 3), ("q4_0", 0)]
    items, want = [], []
    for i, (tname, rows) in enumerate(shapes):
        wtype = TYPES[tname]
        w = make_weights(wtype, rows, k, 40 + i)
        out = np.full((n, rows), np.nan, np.float32)
        items.append((w, wtype, out))
        ref = np.zeros_like(out)
        K.matmul(w, wtype, xq if wtype in (K.Q4_0, K.Q8_0) else xf, ref, n_threads)
        want.append(ref)
    wide = make_weights(K.Q4_0, 19, 2 * k, 50)
    items.append((wide[:, 23 * 18:], K.Q4_0, np.zeros((n, 19), np.float32)))
    want.append(np.zeros((n, 19), np.float32))
    K.matmul(np.ascontiguousarray(wide[:, 23 * 18:]), K.Q4_0, xq, want[-1], 1)
    K.matmul_multi(items, xf, xq, n_threads)
    for (w, wtype, out), ref in zip(items, want):
        np.testing.assert_array_equal(out, ref)
    check = [(w, t, np.zeros_like(o)) for w, t, o in items]
    R.matmul_multi(check, xf, xq)
    for (_, tname), (_, _, got), (_, _, ref) in zip(shapes, items, check):
        bound = 1e-3 * (np.abs(ref) + 1)
        assert (np.abs(got - ref) <= bound).all(), tname


def test_matmul_multi_bad_arguments():
    f32 = np.float32
    xq = np.zeros((2, 34), np.uint8)
    w = np.zeros((4, 18), np.uint8)
    with pytest.raises(ValueError, match=msg(17, 16)):
        K.matmul_multi([(w, K.Q4_0, np.zeros((2, 4), f32))] * 17, None, xq)
    with pytest.raises(ValueError, match="item 1.*" + msg(2, 5, 4)):
        K.matmul_multi([(w, K.Q4_0, np.zeros((2, 4), f32)), (w, K.Q4_0, np.zeros((2, 5), f32))],
                       None, xq)
    with pytest.raises(ValueError, match="item 0 has 2 values"):
        K.matmul_multi([(w, K.Q4_0)], None, xq)
    with pytest.raises(ValueError, match="item 0.*NoneType"):
        K.matmul_multi([(np.zeros((4, 32), f32), K.F32, np.zeros((2, 4), f32))], None, xq)


# ---------------------------------------------------------------- small kernels

@pytest.mark.parametrize("n,dim", [(1, 2048), (3, 96), (5, 37)])
def test_rmsnorm(path, n, dim):
    rng = rng_for("rms", n, dim)
    x = (rng.standard_normal((n, dim)) * 4).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    want = np.zeros_like(x)
    R.rmsnorm(x, w, 1e-5, want)
    got = np.zeros_like(x)
    K.rmsnorm(x, w, 1e-5, got)
    assert_close(got, want, "rmsnorm", np.abs(want) + 1e-3)


@pytest.mark.parametrize("head_dim,n_heads", [(64, 3), (6, 5), (128, 1)])
def test_rope(path, head_dim, n_heads):
    rng = rng_for("rope", head_dim)
    positions = np.array([0, 1, 7, 513, 100_003], np.int64)
    x = rng.standard_normal((5, n_heads * head_dim)).astype(np.float32)
    inv_freq = (10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    want = x.copy()
    R.rope(want, positions, head_dim, inv_freq)
    got = x.copy()
    K.rope(got, positions, head_dim, inv_freq)
    assert_close(got, want.astype(np.float64), "rope", np.abs(x).max() * np.ones_like(want))
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity


def test_softmax_and_silu_mul(path):
    rng = rng_for("sm")
    x = (rng.standard_normal((4, 1001)) * 30).astype(np.float32)
    x[1, :] = -1e30  # all equal: uniform
    want, got = x.copy(), x.copy()
    R.softmax(want)
    K.softmax(got)
    assert_close(got, want.astype(np.float64), "softmax")
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)

    g = (rng.standard_normal((3, 5632 + 3)) * 6).astype(np.float32)
    g[0, :3] = [-100.0, 100.0, 0.0]
    up = rng.standard_normal(g.shape).astype(np.float32)
    want, got = g.copy(), g.copy()
    R.silu_mul(want, up)
    K.silu_mul(got, up)
    assert_close(got, want.astype(np.float64), "silu_mul")


# small calls run on one thread whatever is asked; (16, 300) is big enough for 2 or 3
@pytest.mark.parametrize("n,start_pos,n_threads", [
    (1, 0, 1), (1, 40, 2), (7, 0, 3), (5, 19, 2), (16, 300, 3), (1, 900, 2)])
@pytest.mark.parametrize("kv_group,q_head0,kv_head0", [(1, 0, 0), (4, 0, 0), (4, 4, 1)])
def test_attention(path, n, start_pos, n_threads, kv_group, q_head0, kv_head0):
    """GQA (kv_group 4), a node's head slice (q_head0 4 -> global KV head 1, stored as
    local KV head 0), start_pos > 0, prompt batches."""
    head_dim, n_heads, seq_len = 24, 8, start_pos + n + 5
    n_kv = (q_head0 + n_heads - 1) // kv_group - kv_head0 + 1
    rng = rng_for("att", n, start_pos, kv_group)
    q = rng.standard_normal((n, n_heads * head_dim)).astype(np.float32)
    k_cache = np.zeros((seq_len, n_kv * head_dim), np.float32)
    v_cache = np.zeros_like(k_cache)
    k_cache[:start_pos + n] = rng.standard_normal((start_pos + n, n_kv * head_dim)) * 2
    v_cache[:start_pos + n] = rng.standard_normal((start_pos + n, n_kv * head_dim))
    k_cache[start_pos + n:] = np.nan  # rows past the last token must not be read
    v_cache[start_pos + n:] = np.nan
    want = np.zeros_like(q)
    R.attention(q, k_cache, v_cache, start_pos, head_dim, kv_group, want, q_head0, kv_head0)
    got = np.full_like(q, np.nan)
    K.attention(q, k_cache, v_cache, start_pos, head_dim, kv_group, got, q_head0, kv_head0,
                n_threads)
    assert_close(got, want.astype(np.float64), "attention", np.abs(want) + 0.1)


def test_attention_caches_as_column_slices(path):
    """Caches with rows wider than the heads used (ldkv > n_kv * head_dim)."""
    head_dim, n_heads, seq_len = 16, 4, 10
    rng = rng_for("attslice")
    q = rng.standard_normal((3, n_heads * head_dim)).astype(np.float32)
    kf = rng.standard_normal((seq_len, 3 * head_dim)).astype(np.float32)
    vf = rng.standard_normal((seq_len, 3 * head_dim)).astype(np.float32)
    k_cache, v_cache = kf[:, head_dim:], vf[:, head_dim:]
    want, got = np.zeros_like(q), np.zeros_like(q)
    R.attention(q, k_cache, v_cache, 4, head_dim, 2, want)
    K.attention(q, k_cache, v_cache, 4, head_dim, 2, got, n_threads=2)
    assert_close(got, want.astype(np.float64), "attention", np.abs(want) + 0.1)


def attention_case(n, start_pos, n_heads, head_dim, kv_group, q_head0=0, kv_head0=0,
                   seed=0, rising=False):
    """q, caches (NaN past the last token) and the reference output. rising: scores grow
    along the cache, so each later block of the online softmax raises the maximum."""
    n_kv = (q_head0 + n_heads - 1) // kv_group - kv_head0 + 1
    end, seq_len = start_pos + n, start_pos + n + 3
    rng = rng_for("attc", n, start_pos, n_heads, head_dim, kv_group, seed)
    q = rng.standard_normal((n, n_heads * head_dim)).astype(np.float32)
    k_cache = np.full((seq_len, n_kv * head_dim), np.nan, np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    k = rng.standard_normal((end, n_kv * head_dim))
    if rising:  # k_j = q-ish direction times a growing factor
        k = k * 0.1 + np.tile(np.abs(q[:1, :head_dim]), n_kv) * np.linspace(0, 3, end)[:, None]
    k_cache[:end] = k
    v_cache[:end] = rng.standard_normal((end, n_kv * head_dim))
    want = np.zeros_like(q)
    R.attention(q, k_cache, v_cache, start_pos, head_dim, kv_group, want, q_head0, kv_head0)
    return q, k_cache, v_cache, want


# head_dim 7 and 22 leave tails after the 2-wide and 8-wide steps; kv_group 8 and 4 run
# the heads side by side (lanes), 2 and 1 one head at a time; 700 positions are 6 blocks
@pytest.mark.parametrize("head_dim", [7, 22, 64])
@pytest.mark.parametrize("kv_group,n_heads,q_head0,kv_head0", [
    (8, 16, 0, 0), (4, 7, 3, 0), (2, 6, 2, 1), (1, 3, 0, 0)])
@pytest.mark.parametrize("n,start_pos,rising", [(1, 700, True), (3, 130, False)])
def test_attention_groups_tails_and_long_context(path, head_dim, kv_group, n_heads, q_head0,
                                                 kv_head0, n, start_pos, rising):
    q, k_cache, v_cache, want = attention_case(n, start_pos, n_heads, head_dim, kv_group,
                                               q_head0, kv_head0, rising=rising)
    got = np.full_like(q, np.nan)
    K.attention(q, k_cache, v_cache, start_pos, head_dim, kv_group, got, q_head0, kv_head0, 2)
    assert_close(got, want.astype(np.float64), "attention", np.abs(want) + 0.1)


@pytest.mark.parametrize("kv_group,n_heads", [(8, 32), (8, 8), (1, 4)])
@pytest.mark.parametrize("n,start_pos", [(1, 300), (5, 40)])
def test_attention_same_bits_for_any_threads(path, kv_group, n_heads, n, start_pos):
    """Threads split the heads that share a KV head into smaller groups when there are
    few groups (8 heads, one KV head, 4 threads: groups of 2): no result moves a bit."""
    q, k_cache, v_cache, _ = attention_case(n, start_pos, n_heads, 64, kv_group, seed=1)
    outs = []
    for n_threads in (1, 2, 3, 4):
        out = np.zeros_like(q)
        K.attention(q, k_cache, v_cache, start_pos, 64, kv_group, out, n_threads=n_threads)
        outs.append(out)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_silu_mul_and_softmax_over_the_whole_exp_range(path):
    """The polynomial exp: every magnitude from underflow to overflow, and NaN."""
    g = np.linspace(-100.0, 100.0, 20001).astype(np.float32)[None, :]
    g[0, :4] = [-88.5, 88.5, -87.25, 87.75]
    up = np.ones_like(g)
    want, got = g.copy(), g.copy()
    R.silu_mul(want, up)
    K.silu_mul(got, up)
    assert_close(got, want.astype(np.float64), "silu_mul")
    x = np.linspace(-90.0, 5.0, 4001).astype(np.float32)[None, :]
    want, got = x.copy(), x.copy()
    R.softmax(want)
    K.softmax(got)
    assert_close(got, want.astype(np.float64), "softmax")
    nan = np.array([[np.nan, 1.0, -1.0]], np.float32)
    K.silu_mul(nan, np.ones_like(nan))
    assert np.isnan(nan[0, 0]) and np.isfinite(nan[0, 1:]).all()


# ---------------------------------------------------------------- the thread pool

def test_concurrent_callers_get_the_same_bits():
    """Python threads calling threaded kernels at once (the GIL is released): one owns
    the pool, the others run on their own thread; every result is bit for bit the
    single-threaded one."""
    import threading

    w = make_weights(K.Q4_0, 517, 32 * 40, 20)
    xs = [make_x(K.Q4_0, n, 32 * 40, 30 + n) for n in (1, 1, 3, 1, 9, 1)]
    want = []
    for x in xs:
        out = np.zeros((x.shape[0], 517), np.float32)
        K.matmul(w, K.Q4_0, x, out, 1)
        want.append(out)
    errors = []

    def work(i):
        try:
            for _ in range(40):
                out = np.zeros_like(want[i])
                K.matmul(w, K.Q4_0, xs[i], out, 2 + i % 3)
                np.testing.assert_array_equal(out, want[i])
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a kernel call hung"
    assert not errors, errors[0]


def test_threaded_kernels_work_in_a_forked_child():
    """After fork() the pool's workers are gone: the child starts its own (it would
    wait forever on the parent's)."""
    code = (
        "import os, numpy as np\n"
        "from dllama_node import kernels as K\n"
        "from dllama_node.model import quants\n"
        "rng = np.random.default_rng(0)\n"
        "w = quants.quantize_q4_0(rng.standard_normal((999, 512)).astype(np.float32))\n"
        "x = quants.quantize_q8_0(rng.standard_normal((1, 512)).astype(np.float32))\n"
        "a = np.zeros((1, 999), np.float32); b = np.zeros_like(a)\n"
        "K.matmul(w, K.Q4_0, x, a, 2)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    K.matmul(w, K.Q4_0, x, b, 2)\n"
        "    os._exit(0 if (a == b).all() else 1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child', os.waitstatus_to_exitcode(status))\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "child 0"


def test_idle_workers_sleep_and_wake_for_bigger_jobs():
    """Between calls the workers spin only briefly, then sleep: an idle process uses no
    CPU. A worker left out of smaller jobs still joins (and wakes for) a bigger one."""
    import time

    w = make_weights(K.Q4_0, 640, 32 * 64, 23)
    x = make_x(K.Q4_0, 1, 32 * 64, 24)
    want = np.zeros((1, 640), np.float32)
    K.matmul(w, K.Q4_0, x, want, 1)
    for n_threads in (4, 2, 2, 4, 1, 3):
        got = np.zeros_like(want)
        K.matmul(w, K.Q4_0, x, got, n_threads)
        np.testing.assert_array_equal(got, want)
    time.sleep(0.05)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(0.3)
    cpu = time.process_time() - cpu0
    assert cpu < 0.05, f"{cpu:.3f} s of CPU in {time.perf_counter() - wall0:.3f} s idle"


def test_more_threads_than_cores_and_rows():
    w = make_weights(K.Q8_0, 45, 32 * 70, 21)
    x = make_x(K.Q8_0, 2, 32 * 70, 22)
    want = np.zeros((2, 45), np.float32)
    K.matmul(w, K.Q8_0, x, want, 1)
    for n_threads in (5, 16, 64):
        got = np.zeros_like(want)
        K.matmul(w, K.Q8_0, x, got, n_threads)
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- checks and paths

def msg(*numbers):
    """A regex that requires each number in the message."""
    return "".join(f"(?=.*\\b{re.escape(str(v))}\\b)" for v in numbers)


def test_bad_shapes_raise_value_error_with_the_numbers():
    f32 = np.float32
    x = np.zeros((2, 2048), f32)
    xq = np.zeros((2, 2176), np.uint8)
    with pytest.raises(ValueError, match=msg(2176, 2048, 1152, 1150)):
        K.matmul(np.zeros((8, 1150), np.uint8), K.Q4_0, xq, np.zeros((2, 8), f32))
    with pytest.raises(ValueError, match=msg(2, 7, 8)):
        K.matmul(np.zeros((8, 1152), np.uint8), K.Q4_0, xq, np.zeros((2, 7), f32))
    with pytest.raises(ValueError, match=msg(2150, 34)):
        K.matmul(np.zeros((8, 1152), np.uint8), K.Q4_0, np.zeros((2, 2150), np.uint8),
                 np.zeros((2, 8), f32))
    with pytest.raises(ValueError, match=msg(2048, 2047)):
        K.matmul(np.zeros((8, 2047), f32), K.F32, x, np.zeros((2, 8), f32))
    with pytest.raises(ValueError, match="float16"):
        K.matmul(np.zeros((8, 2048), f32), K.F16, x, np.zeros((2, 8), f32))
    with pytest.raises(ValueError, match=msg(5)):
        K.matmul(np.zeros((8, 2048), f32), 5, x, np.zeros((2, 8), f32))
    with pytest.raises(ValueError, match="contiguous"):
        K.matmul(np.zeros((8, 4096), f32)[:, ::2], K.F32, x, np.zeros((2, 8), f32))
    with pytest.raises(ValueError, match="read-only"):
        out = np.zeros((2, 8), f32)
        out.flags.writeable = False
        K.matmul(np.zeros((8, 2048), f32), K.F32, x, out)
    with pytest.raises(ValueError, match=msg(0)):
        K.matmul(np.zeros((8, 2048), f32), K.F32, x, np.zeros((2, 8), f32), 0)
    with pytest.raises(ValueError, match=msg(40, 32)):
        K.quantize_q8_0(np.zeros((2, 40), f32), np.zeros((2, 35), np.uint8))
    with pytest.raises(ValueError, match=msg(64, 3, 34)):
        K.quantize_q8_0(np.zeros((3, 64), f32), np.zeros((3, 34), np.uint8))
    with pytest.raises(ValueError, match=msg(95, 96)):
        K.rmsnorm(np.zeros((1, 96), f32), np.zeros(95, f32), 1e-5, np.zeros((1, 96), f32))
    with pytest.raises(ValueError, match=msg(3, 2)):
        K.rope(np.zeros((2, 64), f32), np.arange(3), 32, np.zeros(16, f32))
    with pytest.raises(ValueError, match=msg(15, 16)):
        K.rope(np.zeros((2, 64), f32), np.arange(2), 32, np.zeros(15, f32))
    with pytest.raises(ValueError, match="integers"):
        K.rope(np.zeros((2, 64), f32), np.zeros(2, f32), 32, np.zeros(16, f32))
    with pytest.raises(ValueError, match=msg(5, 3)):
        K.silu_mul(np.zeros((2, 5), f32), np.zeros((2, 3), f32))
    with pytest.raises(ValueError, match="dtype float64"):
        K.softmax(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="list"):
        K.softmax([[1.0, 2.0]])


def test_attention_bad_arguments():
    f32 = np.float32
    q, out = np.zeros((2, 64), f32), np.zeros((2, 64), f32)
    cache = np.zeros((10, 32), f32)
    with pytest.raises(ValueError, match=msg(9, 11, 10)):
        K.attention(q, cache, cache, 9, 16, 2, out)
    with pytest.raises(ValueError, match=msg(4, 8, 2, 4, 0)):  # heads [4, 8) -> kv [2, 4) of 2
        K.attention(q, cache, cache, 0, 16, 2, out, q_head0=4, kv_head0=0)
    with pytest.raises(ValueError, match=msg(24, 64)):
        K.attention(q, cache, cache, 0, 24, 2, out)
    with pytest.raises(ValueError, match=msg(0)):
        K.attention(q, cache, cache, 0, 16, 0, out)


def test_paths_and_switching():
    assert PATHS[0] == "scalar"
    assert K.kernel_path() in PATHS
    with pytest.raises(ValueError, match="no-such-path.*scalar"):
        K.use_path("no-such-path")
    before = K.kernel_path()
    K.use_path("scalar")
    try:
        assert K.kernel_path() == "scalar"
    finally:
        K.use_path(before)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_env_var_chooses_the_path_at_import():
    code = "from dllama_node import kernels; print(kernels.kernel_path())"
    for name in PATHS:
        r = run_python(code, DLLAMA_KERNELS=name)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == name
    r = run_python(code, DLLAMA_KERNELS="bogus")
    assert r.returncode != 0
    assert "DLLAMA_KERNELS=bogus" in r.stderr and "scalar" in r.stderr


def test_gil_is_released_during_matmul():
    """A pure-Python thread keeps counting while a long matmul runs: the kernel call
    releases the GIL (holding it, the counter would stand still until it returns)."""
    import threading
    import time

    w = make_weights(K.Q8_0, 2048, 32 * 64, 10)
    x = make_x(K.Q8_0, 16, 32 * 64, 11)
    out = np.zeros((16, 2048), np.float32)
    count = 0
    done = threading.Event()

    def spin():
        nonlocal count
        while not done.is_set():
            count += 1

    before = K.kernel_path()
    K.use_path("scalar")  # slow enough to take a while
    try:
        t = threading.Thread(target=spin)
        t.start()
        time.sleep(0.01)
        start = count
        K.matmul(w, K.Q8_0, x, out, 1)
        during = count - start
        done.set()
        t.join()
    finally:
        K.use_path(before)
    assert during > 100, f"the counter advanced {during} times during the matmul"


def test_the_compiled_api_has_the_reference_signatures():
    import inspect

    for name in ("kernel_path", "quantize_q8_0", "dequantize_weights", "matmul", "matmul_multi",
                 "rmsnorm", "rope", "softmax", "silu_mul", "attention"):
        want = inspect.signature(getattr(R, name))
        got = inspect.signature(getattr(K, name))
        assert [(p.name, p.default) for p in got.parameters.values()] == \
            [(p.name, p.default) for p in want.parameters.values()], name


# ---------------------------------------------------------------- sum_parts_q8_0

def _q8_0_parts(n_parts, n, dim, seed):
    """n_parts q8_0 encodings of (n, dim) rows spanning many magnitudes, with a zero
    block and blocks whose f16 scale is subnormal."""
    rng = rng_for("sum", seed, n_parts, n, dim)
    parts = []
    for p in range(n_parts):
        scale = np.float32(10.0 ** rng.uniform(-3, 3))
        x = rng.standard_normal((n, dim)).astype(np.float32) * scale
        x[0, :32] = 0
        if dim >= 64:                              # d about 2e-6: a subnormal f16
            x[-1, 32:64] = rng.standard_normal(32).astype(np.float32) * np.float32(1e-4)
        q = quants.quantize_q8_0(x).reshape(n, dim // 32 * 34)
        if dim >= 64:
            d = q[-1, 34:36].copy().view(np.float16)[0]
            assert 0 < d < np.finfo(np.float16).tiny
        parts.append(q)
    return parts


@pytest.mark.parametrize("n_parts,n,dim", [(1, 1, 32), (2, 1, 2048), (3, 4, 96), (5, 2, 64),
                                           (4, 7, 4160)])
def test_sum_parts_q8_0_is_the_numpy_sum_in_part_order_bit_for_bit(n_parts, n, dim):
    from dllama_node.kernels import _kernels

    parts = _q8_0_parts(n_parts, n, dim, "exact")
    # the oracle: the reference dequantizer, parts added left to right in float32
    want = quants.dequantize_q8_0(parts[0]).reshape(n, dim).astype(np.float32)
    for p in parts[1:]:
        want = want + quants.dequantize_q8_0(p).reshape(n, dim).astype(np.float32)
    # laid out as the mesh holds them: one frame per part, a 16-byte header before the rows
    width = dim // 32 * 34
    frames = np.zeros((n_parts, 16 + (n + 2) * width), np.uint8)
    view = np.ndarray((n_parts, n, width), np.uint8, buffer=frames, offset=16,
                      strides=(frames.shape[1], width, 1))
    view[...] = np.stack(parts)
    out_wide = np.full((n, dim + 8), np.nan, np.float32)
    out = out_wide[:, 4:4 + dim]                    # rows dim + 8 floats apart
    _kernels.sum_parts_q8_0(view, out)
    np.testing.assert_array_equal(out, want)
    assert np.isnan(out_wide[:, :4]).all() and np.isnan(out_wide[:, -4:]).all()


def test_sum_parts_q8_0_bad_arguments():
    from dllama_node.kernels import _kernels

    parts = np.zeros((2, 3, 68), np.uint8)
    with pytest.raises(ValueError, match=r"out has shape \(3, 32\), expected \(3, 64\)"):
        _kernels.sum_parts_q8_0(parts, np.zeros((3, 32), np.float32))
    with pytest.raises(ValueError, match="67 bytes per row"):
        _kernels.sum_parts_q8_0(np.zeros((2, 3, 67), np.uint8), np.zeros((3, 64), np.float32))
    with pytest.raises(ValueError, match="uint8 array of 3 dimensions"):
        _kernels.sum_parts_q8_0(parts[0], np.zeros((3, 64), np.float32))
    with pytest.raises(ValueError, match="contiguous last axis"):
        _kernels.sum_parts_q8_0(np.zeros((2, 3, 136), np.uint8)[:, :, ::2],
                                np.zeros((3, 64), np.float32))
