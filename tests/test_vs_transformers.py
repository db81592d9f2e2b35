"""The engine against Hugging Face transformers on small random Llama models.

For each shape (MHA and GQA; Llama-2 style and Llama-3 style with rope scaling; tied and
untied classifier) the model is written to GGUF by the `gguf` package as F32, F16, Q8_0
and Q4_0, run by our engine, and compared with transformers:
- F32: last-position logits within a tight tolerance, and 32 greedy tokens equal;
- quantized: against transformers run on the dequantized weights; the engine also
  quantizes activations to q8_0, so the tolerance is looser.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests import hf_models
from tests.hf_models import SHAPES

pytestmark = pytest.mark.reference

# max |ours - reference| / max |reference| over the logits. F32 and F16 weights meet
# float32 activations (measured about 1e-6); Q8_0/Q4_0 weights meet q8_0-quantized
# activations, as in llama.cpp (measured 0.02-0.035 on these shapes).
TOLERANCE = {"f32": 2e-5, "f16": 1e-4, "q8_0": 0.06, "q4_0": 0.06}
MIN_COSINE = {"f32": 0.999999, "f16": 0.99999, "q8_0": 0.999, "q4_0": 0.999}
PROMPT = [1, 17, 203, 99, 5, 42, 77, 150, 8, 260, 31]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.name)
def hf_model(request):
    return request.param, hf_models.make_hf_llama(request.param, seed=SHAPES.index(request.param))


def _session(path, batch=4, threads=2):
    from dllama_node.engine.forward import Transformer
    from dllama_node.engine.generate import Session
    from dllama_node.engine.weights import NodeWeights
    from dllama_node.model import open_model

    model = open_model(path)
    weights = NodeWeights.bind(model)
    # batch 4 < prompt length: the prompt runs in several batches
    return model, Session(Transformer(weights, seq_len=64, n_threads=threads, batch=batch))


@pytest.mark.parametrize("weight_type", ["f32", "f16", "q8_0", "q4_0"])
def test_last_logits_match_transformers(hf_model, weight_type, tmp_path):
    shape, model = hf_model
    path = str(tmp_path / f"{shape.name}-{weight_type}.gguf")
    hf_models.write_gguf(model, shape, path, weight_type)
    reference = hf_models.hf_last_logits(hf_models.dequantized_copy(model, weight_type), PROMPT)

    gguf_model, session = _session(path)
    try:
        logits = session._eval_prompt(PROMPT).copy()
    finally:
        gguf_model.close()
    err = np.abs(logits - reference).max() / np.abs(reference).max()
    cosine = float(logits @ reference / np.linalg.norm(logits) / np.linalg.norm(reference))
    assert logits.shape == reference.shape
    assert err < TOLERANCE[weight_type], f"{shape.name} {weight_type}: relative error {err:.2e}"
    assert cosine > MIN_COSINE[weight_type], f"{shape.name} {weight_type}: cosine {cosine:.6f}"


def test_greedy_tokens_match_transformers(hf_model, tmp_path):
    from dllama_node.engine.sampler import Sampler, SamplerSettings

    shape, model = hf_model
    path = str(tmp_path / f"{shape.name}.gguf")
    hf_models.write_gguf(model, shape, path, "f32")
    expected = hf_models.hf_greedy(model, PROMPT, 32)

    gguf_model, session = _session(path, batch=3, threads=1)
    try:
        ours = list(session.generate(PROMPT, 32, Sampler(SamplerSettings(temperature=0))))
    finally:
        gguf_model.close()
    assert ours == expected


def test_first_token_follows_last_prompt_token(hf_model, tmp_path):
    """The first generated token is the argmax after the whole prompt (a peer gets this
    wrong by sampling from the second-to-last position or re-feeding the last token)."""
    from dllama_node.engine.sampler import Sampler, SamplerSettings

    shape, model = hf_model
    path = str(tmp_path / f"{shape.name}.gguf")
    hf_models.write_gguf(model, shape, path, "f32")
    reference = hf_models.hf_last_logits(model, PROMPT)
    gguf_model, session = _session(path)
    try:
        first = next(iter(session.generate(PROMPT, 1, Sampler(SamplerSettings(temperature=0)))))
        assert session.cached == PROMPT  # the last prompt token ran exactly once
    finally:
        gguf_model.close()
    assert first == int(np.argmax(reference))


def test_chat_turns_reuse_the_cache(hf_model, tmp_path):
    """A second request that extends the first evaluates only the new tokens and gives the
    same tokens as a fresh run."""
    from dllama_node.engine.sampler import Sampler, SamplerSettings

    shape, model = hf_model
    path = str(tmp_path / f"{shape.name}.gguf")
    hf_models.write_gguf(model, shape, path, "f32")
    greedy = Sampler(SamplerSettings(temperature=0))
    gguf_model, session = _session(path)
    try:
        first = list(session.generate(PROMPT, 5, greedy))
        follow = PROMPT + first + [40, 41]
        second = list(session.generate(follow, 5, greedy))
        assert session.timings.prompt_tokens == 2   # only the 2 new tokens
    finally:
        gguf_model.close()
    assert second == hf_models.hf_greedy(model, follow, 5)
