"""The wire formats: q8_0 decoding through strided views equals the numpy reference
exactly, and the mesh's all-reduce arithmetic against an independent oracle built from
model/quants.py."""
import numpy as np
import pytest

from dllama_node.cluster.wire import check_wire, decode, encode, reduce_parts, row_bytes
from dllama_node.common.errors import UsageError
from dllama_node.model import quants


@pytest.mark.parametrize("n, dim", [(1, 32), (1, 2048), (5, 96), (3, 4096)])
def test_q8_0_decode_is_the_reference_bit_for_bit(n, dim):
    x = np.random.default_rng(dim).normal(size=(n, dim)).astype(np.float32) * 3
    x[0, :32] = 0                                   # a zero block
    wire = encode(x, "q8_0")
    assert wire.shape == (n, dim // 32 * 34)
    ref = quants.dequantize_q8_0(wire)
    np.testing.assert_array_equal(decode(wire, "q8_0"), ref)
    out = np.full((n, dim), np.nan, np.float32)
    assert decode(wire, "q8_0", out) is out
    np.testing.assert_array_equal(out, ref)


def _parts(n_nodes, n=2, dim=64, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, dim)).astype(np.float32) for _ in range(n_nodes)]


@pytest.mark.parametrize("n_nodes", [2, 3, 5])
def test_mesh_sums_every_part_as_it_crossed_the_wire_in_node_order(n_nodes):
    parts = _parts(n_nodes, n=3, dim=96, seed=n_nodes)
    # the oracle: the reference quantizer and dequantizer, added left to right
    crossed = [quants.dequantize_q8_0(quants.quantize_q8_0(p)).reshape(p.shape) for p in parts]
    oracle = crossed[0].copy()
    for c in crossed[1:]:
        oracle = oracle + c
    np.testing.assert_array_equal(reduce_parts(parts, "q8_0"), oracle)
    assert reduce_parts(parts, "q8_0").dtype == np.float32


def test_mesh_on_an_exact_wire_adds_the_parts_left_to_right():
    parts = _parts(4, n=5, dim=40)
    np.testing.assert_array_equal(reduce_parts(parts, "f32"),
                                  ((parts[0] + parts[1]) + parts[2]) + parts[3])
    parts = _parts(3, n=2, dim=64)
    q = reduce_parts(parts, "q8_0")
    assert np.abs(q - reduce_parts(parts, "f32")).max() < 0.05 * np.abs(q).max()



def test_wire_format_checks():
    with pytest.raises(UsageError, match="multiple of 32"):
        check_wire("q8_0", 100)
    with pytest.raises(UsageError, match="'f16'"):
        check_wire("f16", 64)
    assert check_wire("f32", 100) == "f32"
    assert row_bytes(2048, "q8_0") == 2176 and row_bytes(100, "f32") == 400
