import numpy as np
import pytest

from dllama_node.common.errors import UsageError
from dllama_node.engine.sampler import Sampler, SamplerSettings


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], np.float32)
    assert Sampler(SamplerSettings(temperature=0)).sample(logits) == 1


def test_same_seed_same_tokens_other_seed_differs():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=500).astype(np.float32)
    st = SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, seed=7)
    a = [Sampler(st).sample(logits) for _ in range(1)]
    s1, s2 = Sampler(st), Sampler(st)
    seq1 = [s1.sample(logits) for _ in range(50)]
    seq2 = [s2.sample(logits) for _ in range(50)]
    assert seq1 == seq2 and a[0] == seq1[0]
    s3 = Sampler(SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, seed=8))
    assert [s3.sample(logits) for _ in range(50)] != seq1


def test_top_k_limits_candidates():
    logits = np.arange(100, dtype=np.float32)
    s = Sampler(SamplerSettings(temperature=5.0, top_k=3, top_p=1.0, seed=0))
    seen = {s.sample(logits) for _ in range(300)}
    assert seen == {97, 98, 99}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p).astype(np.float32)
    s = Sampler(SamplerSettings(temperature=1.0, top_k=0, top_p=0.75, seed=0))
    seen = {s.sample(logits) for _ in range(400)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    p = np.array([0.7, 0.2, 0.1])
    s = Sampler(SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, seed=3))
    draws = np.bincount([s.sample(np.log(p)) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(draws, p, atol=0.03)


def test_repetition_penalty_moves_greedy_off_a_recent_token():
    logits = np.array([2.0, 1.9, -3.0], np.float32)
    st = SamplerSettings(temperature=0, repetition_penalty=1.2)
    assert Sampler(st).sample(logits, recent=[0]) == 1
    assert Sampler(st).sample(logits, recent=[2]) == 0
    # negative logits are pushed further down, not up
    neg = np.array([-1.0, -1.1], np.float32)
    assert Sampler(st).sample(neg, recent=[0]) == 1


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.5}, "temperature -0.5"),
    ({"temperature": float("nan")}, "temperature nan"),
    ({"top_k": -1}, "top-k -1"),
    ({"top_p": 0.0}, "top-p 0.0"),
    ({"top_p": 1.5}, "top-p 1.5"),
    ({"repetition_penalty": 0.0}, "repetition penalty 0.0"),
    ({"seed": -4}, "seed -4"),
])
def test_out_of_range_values_are_named(kwargs, words):
    with pytest.raises(UsageError, match=words):
        Sampler(SamplerSettings(**kwargs))
