"""The wire formats: q8_0 decoding through strided views equals the numpy reference
exactly, and the all-reduce arithmetic is the same for every node."""
import numpy as np
import pytest

from dllama_node.cluster.wire import check_wire, decode, encode, reduce_parts
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


def test_reduce_adds_in_node_order_and_round_trips_the_sum():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(2, 64)).astype(np.float32) for _ in range(3)]
    exact = reduce_parts(parts, "f32")
    np.testing.assert_allclose(exact, parts[0] + parts[1] + parts[2], rtol=1e-6)
    q = reduce_parts(parts, "q8_0")
    assert np.abs(q - exact).max() < 0.05 * np.abs(exact).max()
    # what travels back is exactly what the root keeps
    np.testing.assert_array_equal(q, decode(encode(q, "q8_0"), "q8_0"))


def test_wire_format_checks():
    with pytest.raises(UsageError, match="multiple of 32"):
        check_wire("q8_0", 100)
    with pytest.raises(UsageError, match="'f16'"):
        check_wire("f16", 64)
    assert check_wire("f32", 100) == "f32"
