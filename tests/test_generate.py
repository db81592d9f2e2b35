"""The random test-model generator: tokenizer, weights, presets, progress, stability."""
from __future__ import annotations

import time

import numpy as np
import pytest

from dllama_node.kernels import reference
from dllama_node.model import ModelConfig, llama_tensor_shapes, open_model, quants
from dllama_node.model.convert import dequantize
from dllama_node.model.generate import (PRESETS, TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL,
                                        TOKEN_UNKNOWN, WORD_PREFIX, synthetic_vocab,
                                        write_random_model)

gguf = pytest.importorskip("gguf")

SMALL = ModelConfig(arch="llama", dim=96, hidden_dim=160, n_layers=2, n_heads=3, n_kv_heads=1,
                    head_dim=32, vocab_size=400, seq_len=64)


def test_synthetic_vocab():
    tokens, scores, types = synthetic_vocab(32000)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 32000
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3] == "<0x00>" and tokens[3 + 255] == "<0xFF>" and tokens[3 + 0x41] == "<0x41>"
    assert list(types[:3]) == [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL]
    assert (types[3:259] == TOKEN_BYTE).all() and (types[259:] == TOKEN_NORMAL).all()
    normal = tokens[259:]
    assert WORD_PREFIX in normal
    for c in "aZ7.":
        assert c in normal and WORD_PREFIX + c in normal
    assert "th" in normal and WORD_PREFIX + "the" in normal
    assert all(len(t) <= 4 for t in normal)
    assert (np.diff(scores[259:]) < 0).all() and (scores[:259] == 0).all()
    with pytest.raises(ValueError, match="vocab_size 259 leaves no room"):
        synthetic_vocab(259)
    big, _, _ = synthetic_vocab(128256)
    assert len(set(big)) == 128256


def test_tokenizer_metadata_read_by_gguf_reader(tmp_path):
    path = tmp_path / "t.gguf"
    write_random_model(path, SMALL, "q8_0")
    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents()          # noqa: E731
    assert f("tokenizer.ggml.model") == "llama"
    assert f("tokenizer.ggml.tokens") == synthetic_vocab(400)[0]
    assert f("tokenizer.ggml.token_type")[:4] == [2, 3, 3, 6]
    assert f("tokenizer.ggml.scores")[259:262] == [0.0, -1.0, -2.0]
    assert (f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id"),
            f("tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    assert f("tokenizer.ggml.add_bos_token") is True
    assert f("general.architecture") == "llama" and f("general.file_type") == 7
    assert f("llama.block_count") == 2 and f("llama.attention.head_count_kv") == 1


def test_presets():
    tl = PRESETS["tinyllama-1.1b"]
    assert (tl.dim, tl.hidden_dim, tl.n_layers, tl.n_heads, tl.n_kv_heads, tl.head_dim,
            tl.vocab_size, tl.seq_len, tl.rope_theta, tl.norm_eps) == \
        (2048, 5632, 22, 32, 4, 64, 32000, 2048, 10000.0, 1e-5)

    def q4_bytes(cfg):
        return sum(quants.row_bytes(quants.GGML_Q4_0 if len(s) == 2 else quants.GGML_F32, s[-1])
                   * (s[0] if len(s) == 2 else 1) for s in llama_tensor_shapes(cfg).values())
    assert 1.0e9 < sum(np.prod(s) for s in llama_tensor_shapes(tl).values()) < 1.2e9
    assert 1e6 < q4_bytes(PRESETS["tiny"]) < 5e6
    assert 40e6 < q4_bytes(PRESETS["small"]) < 60e6


def test_progress_and_determinism(tmp_path):
    calls = []
    a = tmp_path / "a.gguf"
    size = write_random_model(a, SMALL, "q4_0", seed=11, progress=lambda d, t: calls.append((d, t)))
    total = calls[0][1]
    assert len(calls) > 5 and all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] == total
    with open_model(a) as m:
        assert total == sum(t.nbytes for t in m.tensors.values()) and m.file_size == size
    b = tmp_path / "b.gguf"
    write_random_model(b, SMALL, "q4_0", seed=11)
    assert a.read_bytes() == b.read_bytes()
    write_random_model(b, SMALL, "q4_0", seed=12)
    assert a.read_bytes() != b.read_bytes()


@pytest.mark.parametrize("weight_type", ["q4_0", "q8_0", "f16", "f32"])
def test_weights_have_the_intended_spread(tmp_path, weight_type):
    cfg = ModelConfig(arch="llama", dim=256, hidden_dim=512, n_layers=1, n_heads=4, n_kv_heads=4,
                      head_dim=64, vocab_size=300, seq_len=64)
    path = tmp_path / "w.gguf"
    write_random_model(path, cfg, weight_type)
    with open_model(path) as m:
        w, kt = m.tensor("blk.0.ffn_up.weight")
        values = dequantize(np.ascontiguousarray(w).view(np.uint8), kt) if kt in (2, 8) else w.astype(np.float32)
        assert abs(values.mean()) < 0.002 and 0.015 < values.std() < 0.025
        norm, _ = m.tensor("blk.0.ffn_norm.weight")
        assert 0.9 < norm.mean() < 1.1 and norm.std() < 0.1


def _forward(m, tokens):
    """A plain numpy llama forward pass over the prompt: the hidden states of each layer
    and the last token's logits."""
    c = m.config

    def w(name):
        arr, kt = m.tensor(name)
        return dequantize(np.ascontiguousarray(arr).view(np.uint8), kt) if kt in (2, 8) else arr.astype(np.float32)
    n = len(tokens)
    x = w("token_embd.weight")[tokens]
    k_cache = np.zeros((n, c.kv_dim), np.float32)
    v_cache = np.zeros((n, c.kv_dim), np.float32)
    rms = []
    for i in range(c.n_layers):
        b = f"blk.{i}."
        h = np.empty_like(x)
        reference.rmsnorm(x, w(b + "attn_norm.weight"), c.norm_eps, h)
        q = h @ w(b + "attn_q.weight").T
        k = h @ w(b + "attn_k.weight").T
        reference.rope(q, np.arange(n), c.head_dim, c.rope_inv_freq())
        reference.rope(k, np.arange(n), c.head_dim, c.rope_inv_freq())
        k_cache[:] = k
        v_cache[:] = h @ w(b + "attn_v.weight").T
        att = np.empty_like(q)
        reference.attention(q, k_cache, v_cache, 0, c.head_dim, c.kv_group, att)
        x = x + att @ w(b + "attn_output.weight").T
        reference.rmsnorm(x, w(b + "ffn_norm.weight"), c.norm_eps, h)
        gate = h @ w(b + "ffn_gate.weight").T
        reference.silu_mul(gate, h @ w(b + "ffn_up.weight").T)
        x = x + gate @ w(b + "ffn_down.weight").T
        rms.append(float(np.sqrt((x * x).mean())))
    h = np.empty_like(x)
    reference.rmsnorm(x, w("output_norm.weight"), c.norm_eps, h)
    return rms, h[-1] @ w("output.weight").T


def test_activations_stay_finite_over_many_layers(tmp_path):
    cfg = ModelConfig(arch="llama", dim=128, hidden_dim=352, n_layers=24, n_heads=4, n_kv_heads=2,
                      head_dim=32, vocab_size=512, seq_len=64)
    path = tmp_path / "deep.gguf"
    write_random_model(path, cfg, "q4_0", seed=5)
    with open_model(path) as m:
        rms, logits = _forward(m, [1, 300, 301, 17, 42, 260, 261, 262])
    assert np.isfinite(rms).all() and np.isfinite(logits).all()
    assert 0.005 < rms[0] and rms[-1] < 20 * max(rms[0], 0.02)      # grows slowly, no blow-up
    assert 0.1 < logits.std() < 10 and len(set(np.argsort(logits)[-5:])) == 5


@pytest.mark.slow
def test_tinyllama_q4_0_writes_in_well_under_a_minute(tmp_path):
    path = tmp_path / "tinyllama.gguf"
    try:
        t0 = time.monotonic()
        size = write_random_model(path, PRESETS["tinyllama-1.1b"], "q4_0")
        elapsed = time.monotonic() - t0
        assert elapsed < 60, f"{elapsed:.1f} s"
        with open_model(path) as m:
            assert m.config == PRESETS["tinyllama-1.1b"] and m.file_size == size
            assert 600e6 < size < 650e6
    finally:
        path.unlink(missing_ok=True)        # pytest keeps old tmp dirs: do not leave 620 MB
