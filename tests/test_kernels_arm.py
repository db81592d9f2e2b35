"""The ARM kernel paths, cross-compiled and run under qemu-user.

kernels/harness/Makefile builds kernel_harness (every kernels/src/*.c file plus a small
C driver) for aarch64 (armv8-a) and armhf (Debian's armv7-a VFPv3-D16 baseline, no NEON).
Each test runs it under qemu with the CPU model of a real board, so run-time dispatch
sees that board's HWCAP bits, and compares the outputs with kernels/reference.py (the
numpy oracle): the gemms within a float32 rounding bound, quantize_q8_0 bit for bit.

    Raspberry Pi 3  cortex-a53  aarch64 "neon"          (armv8.0: no SDOT)
    Raspberry Pi 4  cortex-a72  aarch64 "neon"
    Raspberry Pi 5  cortex-a76  aarch64 "neon-dotprod"
    Pi 2, armhf     cortex-a7 / cortex-a15  "armhf-neon"
    no NEON         cortex-r5f  armhf "scalar"          (the baseline binary still runs)

qemu checks correctness, never speed. Without the cross compilers or qemu these tests
skip, naming the Debian packages to install.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dllama_node.model import quants

pytestmark = pytest.mark.arm

ROOT = Path(__file__).resolve().parents[1]
HARNESS_DIR = ROOT / "kernels" / "harness"

# The oracle, loaded from its file: importing dllama_node.kernels would need the host's
# compiled extension, which these tests do not use.
_spec = importlib.util.spec_from_file_location("_kernels_reference",
                                               ROOT / "kernels" / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

TARGETS = {
    # target: (cross compiler, qemu-user binary, Debian packages)
    "aarch64": ("aarch64-linux-gnu-gcc", "qemu-aarch64-static",
                "gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static"),
    "armhf": ("arm-linux-gnueabihf-gcc", "qemu-arm-static",
              "gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user-static"),
}

# (target, qemu CPU model, the path dispatch must pick there)
BOARDS = [
    ("aarch64", "cortex-a53", "neon"),
    ("aarch64", "cortex-a72", "neon"),
    ("aarch64", "cortex-a76", "neon-dotprod"),
    ("armhf", "cortex-a7", "armhf-neon"),
    ("armhf", "cortex-a15", "armhf-neon"),
    ("armhf", "cortex-r5f", "scalar"),
]
NEON_BOARDS = [b for b in BOARDS if b[2] != "scalar"]
# one CPU per path, for the multi-kernel checks; on cortex-r5f a NEON instruction is
# SIGILL, so running there shows the armhf baseline code (dispatch, matmul.c, ops.c,
# the scalar path) has none
ONE_PER_PATH = [("aarch64", "cortex-a72", "neon"), ("aarch64", "cortex-a76", "neon-dotprod"),
                ("armhf", "cortex-a15", "armhf-neon"), ("armhf", "cortex-r5f", "scalar")]
OPS_CPUS = [("aarch64", "cortex-a72"), ("armhf", "cortex-a15"), ("armhf", "cortex-r5f")]

EXIT_UNSUPPORTED = 3  # kernel_harness: the named path is not supported on this CPU
Y_SENTINEL = np.float32(-12345.0)  # fills output padding the kernels must not touch


def _board_id(board):
    return f"{board[1]}-{board[2]}"


class Harness:
    """Builds kernel_harness for a target once, and runs it under qemu."""

    def __init__(self):
        self._built = {}

    def binary(self, target: str) -> Path:
        if target not in self._built:
            cc, qemu, packages = TARGETS[target]
            missing = [tool for tool in (cc, qemu, "make") if shutil.which(tool) is None]
            if missing:
                self._built[target] = f"{' '.join(missing)} not found: apt-get install {packages} make"
            else:
                proc = subprocess.run(["make", "-C", str(HARNESS_DIR), target],
                                      capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, f"building the {target} harness failed:\n{proc.stderr}"
                self._built[target] = HARNESS_DIR / "build" / f"kernel_harness-{target}"
        built = self._built[target]
        if isinstance(built, str):
            pytest.skip(built)
        return built

    def run(self, target: str, cpu: str, *args, expect_rc: int = 0) -> str:
        qemu = TARGETS[target][1]
        cmd = [qemu, "-cpu", cpu, str(self.binary(target)), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == expect_rc, (
            f"{' '.join(cmd)}: exit {proc.returncode}, expected {expect_rc}\n{proc.stderr}")
        return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def harness():
    return Harness()


# ---- inputs -------------------------------------------------------------------------

def _f16_bytes(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)


def random_blocks(rng, n_rows: int, k: int, wtype: int) -> np.ndarray:
    """uint8 (n_rows, row bytes) of random q4_0 / q8_0 blocks: every nibble and every
    int8 (a block of -128 included), scales of both signs, a zero scale, and a row of
    f16 subnormal scales."""
    n_blocks = k // quants.QK
    payload = 16 if wtype == quants.GGML_Q4_0 else 32
    scales = rng.uniform(-0.08, 0.08, size=n_rows * n_blocks).astype(np.float32)
    scales[-1] = 0.0
    if n_rows > 2:
        scales[2 * n_blocks:3 * n_blocks] = rng.uniform(1e-7, 5e-5, size=n_blocks)
    qs = rng.integers(0, 256, size=(n_rows * n_blocks, payload), dtype=np.uint8)
    qs[0] = 0x80  # all -128 for q8_0: two such products overflow an int16 lane
    blocks = np.concatenate([_f16_bytes(scales), qs], axis=1)
    return blocks.reshape(n_rows, n_blocks * (2 + payload))


def random_activations_q8_0(rng, n: int, k: int) -> np.ndarray:
    n_blocks = k // quants.QK
    scales = rng.uniform(0.001, 0.1, size=n * n_blocks).astype(np.float32)
    scales[-1] = 0.0
    qs = rng.integers(-128, 128, size=(n * n_blocks, 32), dtype=np.int8).view(np.uint8)
    qs[0] = 0x80
    return np.concatenate([_f16_bytes(scales), qs], axis=1).reshape(n, n_blocks * 34)


def random_weights(rng, wtype: int, nr: int, k: int) -> np.ndarray:
    if wtype in (quants.GGML_Q4_0, quants.GGML_Q8_0):
        return random_blocks(rng, nr, k, wtype)
    w = (rng.standard_normal((nr, k)) * 0.1).astype(np.float32)
    if wtype == quants.GGML_F32:
        return w
    w16 = w.astype(np.float16)
    if nr > 1:  # a row of f16 subnormals: a denormal-flushing conversion would zero it
        w16[1] = rng.uniform(-5e-5, 5e-5, size=k).astype(np.float16)
    return w16


def padded(rows: np.ndarray, pad_bytes: int, rng) -> tuple[np.ndarray, int]:
    """The rows as bytes, pad_bytes of random filler between them; and the stride.
    The buffer ends with the last row, as a slice of a larger matrix may."""
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(rows.shape[0], -1)
    filler = rng.integers(0, 256, size=(raw.shape[0], pad_bytes), dtype=np.uint8)
    out = np.concatenate([raw, filler], axis=1)
    return out.reshape(-1)[:out.size - pad_bytes], out.shape[1]


WTYPES = {"q4_0": quants.GGML_Q4_0, "q8_0": quants.GGML_Q8_0,
          "f16": quants.GGML_F16, "f32": quants.GGML_F32}
# (k, nr, nc): decode (nc == 1) and prompt batches; nothing a power of two or a
# multiple of the register tiles
BLOCK_SHAPES = [(96, 37, 1), (320, 13, 7), (64, 6, 10), (32, 1, 3)]
FLOAT_SHAPES = BLOCK_SHAPES + [(67, 9, 5), (3, 5, 2), (130, 3, 1)]


def gemm_case(rng, tmp_path: Path, type_name: str, k: int, nr: int, nc: int):
    """Writes w.bin, x.bin and a sentinel-filled y.bin; returns the harness arguments
    after the command and path, and a check(y_file) function."""
    wtype = WTYPES[type_name]
    w = random_weights(rng, wtype, nr, k)
    if wtype in (quants.GGML_Q4_0, quants.GGML_Q8_0):
        x = random_activations_q8_0(rng, nc, k)
    else:
        x = rng.standard_normal((nc, k)).astype(np.float32)
    w_bytes, ldw = padded(w, 10 if w.dtype == np.uint8 else 12, rng)
    x_bytes, ldx = padded(x, 12, rng)
    ldy = nr + 5
    w_bytes.tofile(tmp_path / "w.bin")
    x_bytes.tofile(tmp_path / "x.bin")
    np.full((nc, ldy), Y_SENTINEL, dtype=np.float32).tofile(tmp_path / "y.bin")

    expected = np.zeros((nc, nr), dtype=np.float32)
    reference.matmul(w, wtype, x, expected)
    # float32 rounding bound: a few ulps of the sum of |products|
    w_abs = np.abs(reference.dequantize_weights(w, wtype).astype(np.float64))
    x_abs = np.abs(quants.dequantize_q8_0(x) if x.dtype == np.uint8 else x).astype(np.float64)
    bound = 1e-5 * (x_abs @ w_abs.T) + 1e-37

    def check(label: str):
        y = np.fromfile(tmp_path / "y.bin", dtype=np.float32).reshape(nc, ldy)
        assert np.all(y[:, nr:] == Y_SENTINEL), f"{label}: wrote outside [0, nr) of a row"
        err = np.abs(y[:, :nr].astype(np.float64) - expected)
        worst = np.unravel_index(np.argmax(err / bound), err.shape)
        assert np.all(err <= bound), (
            f"{label}: y[{worst[0]}, {worst[1]}] = {y[worst]}, reference {expected[worst]}, "
            f"bound {bound[worst]:.3g}")

    return [type_name, k, nr, nc, ldw, ldx, ldy, tmp_path / "w.bin", tmp_path / "x.bin",
            tmp_path / "y.bin"], check


# ---- dispatch -----------------------------------------------------------------------

@pytest.mark.parametrize("board", BOARDS, ids=_board_id)
def test_dispatch_picks_the_best_path_for_the_cpu(harness, board):
    target, cpu, path = board
    lines = harness.run(target, cpu, "info").splitlines()
    assert f"best {path}" in lines
    supported = {line.split()[1] for line in lines if line.startswith("supported ")}
    assert "scalar" in supported and path in supported


@pytest.mark.parametrize("target, cpu, path", [
    ("aarch64", "cortex-a53", "neon-dotprod"),
    ("aarch64", "cortex-a72", "neon-dotprod"),
    ("armhf", "cortex-r5f", "armhf-neon"),
])
def test_path_the_cpu_lacks_is_refused(harness, target, cpu, path):
    out = harness.run(target, cpu, "gemm", path, "f32", 4, 1, 1, 16, 16, 1, "-", "-", "-",
                      expect_rc=EXIT_UNSUPPORTED)
    assert f"path {path} is not supported on this CPU" in out


def test_only_the_dotprod_path_uses_sdot(harness):
    """SDOT inlined into the neon-dotprod gemms, and nowhere else (it is SIGILL on a Pi 3
    or 4)."""
    binary = harness.binary("aarch64")
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.skip("aarch64-linux-gnu-objdump not found: apt-get install binutils-aarch64-linux-gnu")
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(binary)],
                             capture_output=True, text=True, check=True).stdout
    with_sdot = set()
    function = None
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[1][:-2]
        elif "\tsdot\t" in line:
            with_sdot.add(function)
    assert {"gemm_q4_0_q8_0_dotprod", "gemm_q8_0_q8_0_dotprod"} <= with_sdot
    assert all("dotprod" in f or "sdot" in f for f in with_sdot), with_sdot


# ---- the dl_isa members -------------------------------------------------------------

@pytest.mark.parametrize("type_name", list(WTYPES))
@pytest.mark.parametrize("board", NEON_BOARDS, ids=_board_id)
def test_gemm_matches_reference(harness, tmp_path, board, type_name):
    target, cpu, path = board
    rng = np.random.default_rng(1234)
    shapes = BLOCK_SHAPES if type_name in ("q4_0", "q8_0") else FLOAT_SHAPES
    for k, nr, nc in shapes:
        args, check = gemm_case(rng, tmp_path, type_name, k, nr, nc)
        out = harness.run(target, cpu, "gemm", path, *args)
        assert f"path {path}" in out
        check(f"{path} on {cpu}, {type_name} k={k} nr={nr} nc={nc}")


def quantize_input(rng, k: int) -> np.ndarray:
    """float32 (n, k) rows of 32-value blocks chosen to hit every rounding edge."""
    blocks = [rng.standard_normal(32) * scale for scale in (1.0, 1e-3, 300.0, 1e30)]
    blocks.append(np.zeros(32))
    # d = 1 and d = 1/8 exactly: x / d lands on halves, which round away from zero
    halves = np.array([127, 2.5, -3.5, 0.5, -0.5, 1.5, -1.5, 126.5] * 4)
    blocks += [halves, halves / 8, -halves / 8]
    blocks.append(rng.standard_normal(32) * 1e-6)      # d below the f16 range: stored 0
    # Tiny blocks: a normal maximum, denormal values around it. With amax = 4e-37,
    # id = 127 / amax is about 3e38 and a denormal 1e-38 quantizes to 3: AArch32 NEON,
    # which flushes denormals, must not turn it into 0. (A block whose maximum is
    # itself below about 3.7e-37 has 1 / d = inf: undefined, as in GGML; not tested.)
    for amax in (2.0 ** -110, 4e-37):
        tiny = rng.uniform(-1.1e-38, 1.1e-38, size=32)
        tiny[5] = -amax
        blocks.append(tiny)
    while len(blocks) * 32 % k:
        blocks.append(rng.standard_normal(32) * rng.uniform(0.01, 10))
    return np.concatenate(blocks).astype(np.float32).reshape(-1, k)


@pytest.mark.parametrize("board", NEON_BOARDS, ids=_board_id)
def test_quantize_q8_0_is_bit_exact(harness, tmp_path, board):
    target, cpu, path = board
    rng = np.random.default_rng(99)
    k = 5 * 32
    x = quantize_input(rng, k)
    n = x.shape[0]
    x_padded = np.concatenate([x, np.full((n, 3), np.nan, np.float32)], axis=1)
    ldx = x_padded.shape[1]
    row_bytes = k // 32 * 34
    ldy = row_bytes + 4
    x_padded.reshape(-1)[:-3].tofile(tmp_path / "x.bin")  # ends with the last row
    np.full((n - 1) * ldy + row_bytes, 0xA5, dtype=np.uint8).tofile(tmp_path / "y.bin")
    for n_threads in (1, 2):
        harness.run(target, cpu, "quantize", path, n, k, ldx, ldy, n_threads,
                    tmp_path / "x.bin", tmp_path / "y.bin")
        raw = np.fromfile(tmp_path / "y.bin", dtype=np.uint8)
        got = np.stack([raw[i * ldy:i * ldy + row_bytes] for i in range(n)])
        with np.errstate(over="ignore"):  # the 1e30 block: d overflows f16 to inf
            expected = quants.quantize_q8_0(x)
        bad = np.argwhere(got != expected)
        assert bad.size == 0, f"{path} on {cpu}: {len(bad)} bytes differ, first at {bad[0]}"
        for i in range(n - 1):
            assert np.all(raw[i * ldy + row_bytes:(i + 1) * ldy] == 0xA5), "wrote into padding"


# ---- the threaded driver and the small ops, compiled for ARM -------------------------

@pytest.mark.parametrize("board", ONE_PER_PATH, ids=_board_id)
def test_matmul_driver_with_threads(harness, tmp_path, board):
    target, cpu, path = board
    rng = np.random.default_rng(7)
    for type_name in WTYPES:
        for k, nr, nc in [(96, 70, 1), (64, 45, 11)]:
            args, check = gemm_case(rng, tmp_path, type_name, k, nr, nc)
            harness.run(target, cpu, "matmul", path, *args[:7], 3, *args[7:])
            check(f"dl_matmul {path} on {cpu}, 3 threads, {type_name} nr={nr} nc={nc}")


def _run_op(harness, target, cpu, tmp_path, op, ints, arrays, out_shape):
    files = []
    for i, a in enumerate(arrays):
        f = tmp_path / f"in{i}.bin"
        np.ascontiguousarray(a).tofile(f)
        files.append(f)
    out_file = tmp_path / "out.bin"
    out_file.unlink(missing_ok=True)
    harness.run(target, cpu, op, *ints, *files, out_file)
    return np.fromfile(out_file, dtype=np.float32).reshape(out_shape)


@pytest.mark.parametrize("target, cpu", OPS_CPUS)
def test_ops_match_reference(harness, tmp_path, target, cpu):
    rng = np.random.default_rng(5)
    n, dim = 3, 77
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    got = _run_op(harness, target, cpu, tmp_path, "rmsnorm", [n, dim, "1e-5"], [x, w], (n, dim))
    want = np.empty_like(x)
    reference.rmsnorm(x, w, 1e-5, want)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg="rmsnorm")

    n_heads, head_dim = 3, 10
    q = rng.standard_normal((n, n_heads * head_dim)).astype(np.float32)
    pos = np.array([0, 17, 1000], dtype=np.int64)
    inv_freq = (10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    got = _run_op(harness, target, cpu, tmp_path, "rope", [n, n_heads, head_dim],
                  [q, pos, inv_freq], q.shape)
    want = q.copy()
    reference.rope(want, pos, head_dim, inv_freq)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg="rope")

    s = (rng.standard_normal((n, 41)) * 5).astype(np.float32)
    got = _run_op(harness, target, cpu, tmp_path, "softmax", list(s.shape), [s], s.shape)
    want = s.copy()
    reference.softmax(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg="softmax")

    gate = (rng.standard_normal((n, 45)) * 4).astype(np.float32)
    up = rng.standard_normal((n, 45)).astype(np.float32)
    got = _run_op(harness, target, cpu, tmp_path, "silu_mul", list(gate.shape), [gate, up],
                  gate.shape)
    want = gate.copy()
    reference.silu_mul(want, up)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg="silu_mul")


@pytest.mark.parametrize("target, cpu", OPS_CPUS)
def test_attention_matches_reference(harness, tmp_path, target, cpu):
    """A node's slice: global query heads 2..5 of a model with kv_group 2, so local KV
    heads 0..1 are global KV heads 1..2; 3 new tokens after 6 cached ones."""
    rng = np.random.default_rng(11)
    n, start_pos, n_heads, head_dim, kv_group = 3, 6, 4, 12, 2
    q_head0, kv_head0, n_local_kv, seq_len = 2, 1, 2, 13
    q = rng.standard_normal((n, n_heads * head_dim)).astype(np.float32)
    k_cache = rng.standard_normal((seq_len, n_local_kv * head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((seq_len, n_local_kv * head_dim)).astype(np.float32)
    k_cache[start_pos + n:] = np.nan  # rows past the causal window must not be read
    v_cache[start_pos + n:] = np.nan
    ints = [n, start_pos, n_heads, head_dim, kv_group, q_head0, kv_head0, n_local_kv,
            seq_len, 2]
    got = _run_op(harness, target, cpu, tmp_path, "attention", ints, [q, k_cache, v_cache],
                  q.shape)
    want = np.empty_like(q)
    reference.attention(q, k_cache, v_cache, start_pos, head_dim, kv_group, want,
                        q_head0=q_head0, kv_head0=kv_head0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg="attention")


@pytest.mark.parametrize("target, cpu", OPS_CPUS)
def test_the_mesh_sum_has_numpys_bits(harness, tmp_path, target, cpu):
    """kernels/src/wire_sum.h: every node of a mixed x86/ARM cluster holds the same sum, so
    the ARM build must round each product and each sum on its own (no fused multiply-add,
    which aarch64 compilers use by default) and match numpy bit for bit."""
    rng = np.random.default_rng(11)
    n_parts, n, dim = 5, 3, 96                           # 3 blocks a row, not a power of two
    scales = (rng.standard_normal((n_parts, n, dim // 32)) * 0.05).astype(np.float16)
    qs = rng.integers(-127, 128, size=(n_parts, n, dim // 32, 32), dtype=np.int8)
    blocks = np.zeros((n_parts, n, dim // 32, 34), np.uint8)
    blocks[..., :2] = scales.view(np.uint8).reshape(n_parts, n, dim // 32, 2)
    blocks[..., 2:] = qs.view(np.uint8)
    got = _run_op(harness, target, cpu, tmp_path, "sum_parts_q8_0", [n_parts, n, dim],
                  [blocks], (n, dim))
    decoded = (qs.astype(np.float32) * scales.astype(np.float32)[..., None]).reshape(
        n_parts, n, dim)
    want = decoded[0].copy()
    for p in range(1, n_parts):
        want += decoded[p]                               # node order, float32 each step
    assert got.tobytes() == want.tobytes(), np.abs(got - want).max()
