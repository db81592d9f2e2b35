"""Loading a slice with pread gives exactly the bytes of the zero-copy views, for whole
models and for slices with row and column cuts, and the loaded memory is not the map's."""
import numpy as np
import pytest

from dllama_node.engine.load import load_weights
from dllama_node.engine.weights import NodeWeights
from dllama_node.model.tensors import SliceSpec
from dllama_node.model import open_model
from dllama_node.model.generate import PRESETS, write_random_model


@pytest.fixture(scope="module", params=["q4_0", "q8_0", "f16", "f32"])
def model_path(request, tmp_path_factory):
    p = str(tmp_path_factory.mktemp("load") / f"tiny-{request.param}.gguf")
    write_random_model(p, PRESETS["tiny"], weight_type=request.param, seed=3)
    return p


def _pairs(a: NodeWeights, b: NodeWeights):
    for la, lb in zip(a.layers, b.layers):
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            yield name, getattr(la, name), getattr(lb, name)
        yield "attn_norm", (la.attn_norm, 0), (lb.attn_norm, 0)
    yield "output", a.output, b.output


@pytest.mark.parametrize("spec", [None, SliceSpec((2, 6), (0, 2), (64, 416), (512, 1536)),
                                  SliceSpec((7, 8), (1, 2), (640, 672), (2000, 2048))],
                         ids=["whole", "middle", "last"])
def test_loaded_slice_equals_the_views(model_path, spec):
    with open_model(model_path) as m:
        views = NodeWeights.bind(m, spec)
        seen = []
        loaded = load_weights(m, spec, progress=lambda done, total: seen.append((done, total)))
        for name, (va, ta), (la, tb) in _pairs(views, loaded):
            assert ta == tb and va.shape == la.shape, name
            np.testing.assert_array_equal(va, la, err_msg=name)
            assert la.flags.c_contiguous, name
            assert not np.shares_memory(va, la), name
        assert seen[-1][0] == seen[-1][1] == views.nbytes()
        assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
