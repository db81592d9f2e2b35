"""N nodes in one process (the synchronizer's fake) against one node: the slicing,
planning and all-reduce arithmetic, without sockets."""
import numpy as np
import pytest

from dllama_node.cluster.fake import InProcessCluster
from dllama_node.cluster.planning import local_capacities, make_plan
from dllama_node.engine.forward import Transformer
from dllama_node.engine.generate import Session
from dllama_node.engine.load import load_weights
from dllama_node.engine.sampler import Sampler, SamplerSettings
from dllama_node.model import open_model
from tests import hf_models

PROMPT = [1, 17, 203, 99, 5, 42, 77, 150, 8, 260, 31]
GREEDY = Sampler(SamplerSettings(temperature=0))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    shape = hf_models.SHAPES[1]            # 6 query heads, 2 KV heads: GQA, not a power of two
    path = str(tmp_path_factory.mktemp("fake") / "gqa.gguf")
    hf_models.write_gguf(hf_models.make_hf_llama(shape, seed=5), shape, path, "f32")
    return path


def _single(model):
    return Session(Transformer(load_weights(model), 96, 1, 8))


@pytest.mark.parametrize("n_nodes, split", [(2, None), (3, None), (4, None), (5, None),
                                            (3, (5, 1, 2))])
def test_n_nodes_equal_one_node(model_path, n_nodes, split):
    with open_model(model_path) as m:
        expected = list(_single(m).generate(PROMPT, 24, GREEDY))
        ref_logits = _single(m)._eval_prompt(PROMPT).copy()
        plan = make_plan(m, local_capacities(n_nodes), max_seq_len=96, split=split)
        assert len(plan.slice_nodes) == n_nodes
        weights = [load_weights(m, node.spec) for node in plan.slice_nodes]
        for wire in ("f32", "q8_0"):
            cluster = InProcessCluster(weights, 96, batch=8, wire=wire)
            try:
                logits = Session(cluster)._eval_prompt(PROMPT).copy()
                tokens = list(Session(cluster).generate(PROMPT, 24, GREEDY))
            finally:
                cluster.close()
            err = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
            if wire == "f32":
                assert err < 1e-5
                assert tokens == expected
            else:
                assert err < 0.05
