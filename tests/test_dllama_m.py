"""distributed-llama .m files.

The oracle is a test-local writer that follows distributed-llama's converter
(converter/writer.py writeHeader / writeQuantizedQ40Tensor, converter/convert-hf.py's
plan and permute()) step by step, from Hugging Face-layout weights: it shares no code
with dllama_node.model.dllama_m."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from dllama_node.common.errors import ModelFileError, UnsupportedModelError
from dllama_node.kernels import reference
from dllama_node.model import ModelConfig, RopeScaling, open_model, quants
from dllama_node.model.dllama_m import read_dllama_m, write_dllama_m
from dllama_node.model.generate import random_tensor, write_random_model

CFG = ModelConfig(arch="llama", dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, vocab_size=100, seq_len=256, rope_theta=10000.0)

# The converter's header key ids (converter/writer.py writeHeader).
KEYS = {"version": 0, "arch_type": 1, "dim": 2, "hidden_dim": 3, "n_layers": 4, "n_heads": 5,
        "n_kv_heads": 6, "n_experts": 7, "n_active_experts": 8, "vocab_size": 9,
        "max_seq_len": 10, "hidden_act": 11, "rope_theta": 12, "weights_float_type": 13,
        "rope_scaling_factor": 14, "rope_scaling_low_freq_factor": 15,
        "rope_scaling_high_freq_factory": 16, "rope_scaling_orig_max_seq_len": 17,
        "rope_type": 18, "head_dim": 19, "norm_epsilon": 20}


def converter_header(params):
    data = b"".join(struct.pack("ii", KEYS[k], v) for k, v in params.items())
    header = struct.pack("i", 0xA00ABCD)
    return header + struct.pack("i", len(header) * 2 + len(data)) + data


def converter_q40(x):
    """writeQuantizedQ40Tensor, vectorised the same way as the converter's numpy code."""
    groups = x.astype(np.float32).reshape(-1, 32)
    gmax, gmin = groups.max(axis=1), groups.min(axis=1)
    deltas = np.divide(np.where(-gmin > gmax, gmin, gmax), -8)
    deltas16 = deltas.astype(np.float16)
    ids = np.where(deltas != 0, 1.0 / deltas, 0)
    groups = np.clip(np.add(groups * ids[:, np.newaxis], 8.5), 0, 15).astype(int)
    packed = (groups[:, :16] & 0xF) | ((groups[:, 16:] & 0xF) << 4)
    return b"".join(struct.pack("e16B", d, *row) for d, row in zip(deltas16, packed))


def converter_permute(w, n_heads, n_kv_heads):
    if n_heads != n_kv_heads:
        n_heads = n_kv_heads
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(cfg, seed=0):
    """Random weights named and shaped as in a Hugging Face LlamaForCausalLM."""
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)   # noqa: E731
    c = cfg
    out = {"model.embed_tokens.weight": w(c.vocab_size, c.dim), "model.norm.weight": 1 + w(c.dim),
           "lm_head.weight": w(c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": w(c.q_dim, c.dim),
                    p + "self_attn.k_proj.weight": w(c.kv_dim, c.dim),
                    p + "self_attn.v_proj.weight": w(c.kv_dim, c.dim),
                    p + "self_attn.o_proj.weight": w(c.dim, c.q_dim),
                    p + "mlp.gate_proj.weight": w(c.hidden_dim, c.dim),
                    p + "mlp.down_proj.weight": w(c.dim, c.hidden_dim),
                    p + "mlp.up_proj.weight": w(c.hidden_dim, c.dim),
                    p + "input_layernorm.weight": 1 + w(c.dim),
                    p + "post_attention_layernorm.weight": 1 + w(c.dim)})
    return out


def converter_write(path, cfg, hf, extra_header=None, weight_type="q40"):
    """convert-hf.py: header, then the plan (embedding F32; q k v o gate down up; norms)."""
    params = {"version": 0, "arch_type": 0xABCD00, "hidden_act": 1, "dim": cfg.dim,
              "hidden_dim": cfg.hidden_dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
              "n_kv_heads": cfg.n_kv_heads, "weights_float_type": {"f32": 0, "q40": 2}[weight_type],
              "max_seq_len": cfg.seq_len, "vocab_size": cfg.vocab_size, "n_experts": 0,
              "n_active_experts": 0, "rope_theta": int(cfg.rope_theta), "norm_epsilon": 5}
    params.update(extra_header or {})
    wt = converter_q40 if weight_type == "q40" else (lambda x: x.astype("<f4").tobytes())
    f32 = lambda x: x.astype("<f4").tobytes()                              # noqa: E731
    plan = [(f32, "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        plan += [(lambda x: wt(converter_permute(x, cfg.n_heads, cfg.n_heads)), p + "self_attn.q_proj.weight"),
                 (lambda x: wt(converter_permute(x, cfg.n_heads, cfg.n_kv_heads)), p + "self_attn.k_proj.weight"),
                 (wt, p + "self_attn.v_proj.weight"), (wt, p + "self_attn.o_proj.weight"),
                 (wt, p + "mlp.gate_proj.weight"), (wt, p + "mlp.down_proj.weight"),
                 (wt, p + "mlp.up_proj.weight"),
                 (f32, p + "input_layernorm.weight"), (f32, p + "post_attention_layernorm.weight")]
    plan += [(f32, "model.norm.weight"), (wt, "lm_head.weight")]
    with open(path, "wb") as f:
        f.write(converter_header(params))
        for fn, name in plan:
            f.write(fn(hf[name]))
    return path


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
              "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def test_converter_files_read_with_canonical_names_and_zero_copy(tmp_path):
    hf = hf_weights(CFG)
    path = converter_write(tmp_path / "m.m", CFG, hf)
    with open_model(path) as m:
        assert m.format == "dllama-m"
        assert m.config == CFG
        assert m.metadata["llama.embedding_length"] == 64 and m.metadata["dllama.arch_type"] == 0xABCD00
        assert m.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-5
        embd, kt = m.tensor("token_embd.weight")
        assert kt == quants.GGML_F32
        np.testing.assert_array_equal(embd, hf["model.embed_tokens.weight"])
        for i in range(CFG.n_layers):
            for hf_part, name in HF_TO_GGUF.items():
                x = hf[f"model.layers.{i}.{hf_part}.weight"]
                arr, kt = m.tensor(f"blk.{i}.{name}.weight")
                assert np.shares_memory(arr, m._map)
                if x.ndim == 1:
                    np.testing.assert_array_equal(arr, x)
                    continue
                if name == "attn_q":
                    x = converter_permute(x, CFG.n_heads, CFG.n_heads)
                if name == "attn_k":
                    x = converter_permute(x, CFG.n_heads, CFG.n_kv_heads)
                assert kt == quants.GGML_Q4_0 and arr.shape == (x.shape[0], x.shape[1] // 32 * 18)
                assert arr.tobytes() == converter_q40(x)
                # and the converter's q40 is GGML's q4_0, byte for byte
                assert arr.tobytes() == quants.quantize_q4_0(x).tobytes()
        out, _ = m.tensor("output.weight")
        assert out.tobytes() == converter_q40(hf["lm_head.weight"])
        np.testing.assert_array_equal(m.tensor("output_norm.weight")[0], hf["model.norm.weight"])


def test_q_and_k_use_adjacent_pair_rope(tmp_path):
    """The .m Q rows, rotated by our GGML-normal rope (pairs 2i, 2i+1), equal Hugging
    Face's rotate_half rope (halves i, i + head_dim/2) of the unpermuted weights."""
    cfg = CFG
    hf = hf_weights(cfg, seed=1)
    path = converter_write(tmp_path / "f.m", cfg, hf, weight_type="f32")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, cfg.dim)).astype(np.float32)
    positions = np.array([0, 5, 17])
    inv = cfg.rope_inv_freq()
    with open_model(path) as m:
        for name, hf_name, n_heads in (("attn_q", "q_proj", cfg.n_heads), ("attn_k", "k_proj", cfg.n_kv_heads)):
            w, kt = m.tensor(f"blk.0.{name}.weight")
            ours = (x @ w.T).astype(np.float32)
            reference.rope(ours, positions, cfg.head_dim, inv)
            # Hugging Face: rotate_half on each head, then compare in the interleaved order
            q = (x @ hf[f"model.layers.0.self_attn.{hf_name}.weight"].T).reshape(3, n_heads, cfg.head_dim)
            half = cfg.head_dim // 2
            ang = positions[:, None] * inv[None, :].astype(np.float64)
            cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
            a, b = q[..., :half], q[..., half:]
            rot = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
            interleaved = np.stack([rot[..., :half], rot[..., half:]], axis=-1).reshape(3, -1)
            np.testing.assert_allclose(ours, interleaved, rtol=1e-4, atol=1e-5)


def test_header_keys_map_to_the_config(tmp_path):
    cfg = ModelConfig(arch="llama", dim=64, hidden_dim=96, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=64, vocab_size=100, seq_len=131072, norm_eps=1e-6,
                      rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192))
    extra = {"head_dim": 64, "norm_epsilon": 6, "rope_type": 2, "rope_scaling_factor": 32,
             "rope_scaling_low_freq_factor": 1, "rope_scaling_high_freq_factory": 4,
             "rope_scaling_orig_max_seq_len": 8192, "rope_theta": 500000}
    path = converter_write(tmp_path / "l3.m", cfg, hf_weights(cfg), extra_header=extra)
    with open_model(path) as m:
        assert m.config == cfg
        np.testing.assert_array_equal(m.rope_inv_freq(), cfg.rope_inv_freq())
    # our writer produces the same header and the same bytes
    ours = tmp_path / "ours.m"
    hf = hf_weights(cfg)
    tensors = {"token_embd.weight": hf["model.embed_tokens.weight"], "output.weight": hf["lm_head.weight"],
               "output_norm.weight": hf["model.norm.weight"]}
    for hf_part, name in HF_TO_GGUF.items():
        x = hf[f"model.layers.0.{hf_part}.weight"]
        if name == "attn_q":
            x = converter_permute(x, cfg.n_heads, cfg.n_heads)
        if name == "attn_k":
            x = converter_permute(x, cfg.n_heads, cfg.n_kv_heads)
        tensors[f"blk.0.{name}.weight"] = x
    write_dllama_m(ours, cfg, quants.GGML_Q4_0, tensors)
    a, b = read_dllama_m(path), read_dllama_m(ours)
    assert a.header == b.header
    assert ours.read_bytes()[b.header_size:] == path.read_bytes()[a.header_size:]


@pytest.mark.parametrize("weight_type", ["q4_0", "q8_0", "f16", "f32"])
def test_generated_m_files_round_trip(tmp_path, weight_type):
    path = tmp_path / "r.m"
    size = write_random_model(path, CFG, weight_type, seed=3, file_format="dllama-m")
    wt = {"q4_0": quants.GGML_Q4_0, "q8_0": quants.GGML_Q8_0, "f16": quants.GGML_F16,
          "f32": quants.GGML_F32}[weight_type]
    with open_model(path) as m:
        assert m.file_size == size and m.config == CFG
        assert m.metadata["dllama.weights_float_type"] == {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 3}[weight_type]
        q, kt = m.tensor("blk.1.attn_q.weight")
        assert kt == wt
        np.testing.assert_array_equal(q, random_tensor("blk.1.attn_q.weight", (64, 64), wt, seed=3).reshape(q.shape))
        embd, kt = m.tensor("token_embd.weight")
        assert kt == quants.GGML_F32 and embd.shape == (100, 64)
        offsets = sorted((t.offset, t.nbytes) for t in m.tensors.values())
        for (o1, n1), (o2, _) in zip(offsets, offsets[1:]):
            assert o1 + n1 == o2            # back to back, no padding
        assert offsets[-1][0] + offsets[-1][1] == size


# -- errors -------------------------------------------------------------------------

def _m(tmp_path, extra=None, drop=(), cfg=CFG, cut=0, append=b""):
    hf = hf_weights(cfg)
    path = converter_write(tmp_path / "e.m", cfg, hf, extra_header=extra)
    if drop:
        blob = path.read_bytes()
        size = int.from_bytes(blob[4:8], "little")
        pairs = [blob[i:i + 8] for i in range(8, size, 8)]
        keep = [p for p in pairs if int.from_bytes(p[:4], "little") not in [KEYS[k] for k in drop]]
        removed = len(pairs) - len(keep)
        body = b"".join(keep)
        blob = blob[:4] + (8 + len(body)).to_bytes(4, "little") + body + blob[size:]
        assert removed == len(drop)
        path.write_bytes(blob)
    if cut:
        blob = path.read_bytes()
        path.write_bytes(blob[:-cut])
    if append:
        with open(path, "ab") as f:
            f.write(append)
    return path


def test_old_format_and_wrong_magic(tmp_path):
    path = tmp_path / "old.m"
    path.write_bytes(struct.pack("10i", 0xABCD00, 64, 96, 2, 4, 2, 0, 0, 100, 256))
    with pytest.raises(UnsupportedModelError, match="old distributed-llama format \\(magic 0xabcd00\\)"):
        open_model(path)
    path.write_bytes(b"\x00\x01\x02\x03" + b"\0" * 100)
    with pytest.raises(ModelFileError, match="magic 0x03020100, expected 0x0a00abcd"):
        read_dllama_m(path)
    path.write_bytes(struct.pack("i", 0xA00ABCD) + b"\x01")
    with pytest.raises(ModelFileError, match="truncated header: reading the header size at byte 4"):
        open_model(path)


def test_truncated_and_oversized_files(tmp_path):
    path = _m(tmp_path, cut=10)
    size = path.stat().st_size
    with pytest.raises(ModelFileError, match=f"tensor output.weight: data ends at byte {size + 10}, "
                                             f"file has {size} bytes \\(truncated\\?\\)"):
        open_model(path)
    path = _m(tmp_path, append=b"\0" * 7)
    size = path.stat().st_size
    with pytest.raises(ModelFileError, match=f"the header describes {size - 7} bytes, the file has "
                                             f"{size} bytes \\(7 extra\\)"):
        open_model(path)


def test_bad_header_size(tmp_path):
    path = _m(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[4:8] = (13).to_bytes(4, "little")
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match="header size 13 is not 8 plus a whole number"):
        open_model(path)
    blob[4:8] = (2 ** 30).to_bytes(4, "little")
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match=f"needs {2 ** 30} bytes, the file has {len(blob)} bytes"):
        open_model(path)


@pytest.mark.parametrize("extra, error, message", [
    ({"arch_type": 0xABCD01}, UnsupportedModelError, r"architecture qwen3 \(0xabcd01\) is not supported; llama"),
    ({"n_experts": 8, "n_active_experts": 2}, UnsupportedModelError, r"mixture of experts \(8 experts\)"),
    ({"hidden_act": 0}, UnsupportedModelError, "hidden_act 0 \\(gelu\\) is not supported"),
    ({"weights_float_type": 7}, UnsupportedModelError, "weight float type 7 is unknown"),
    ({"norm_epsilon": 4}, UnsupportedModelError, "norm_epsilon code 4 is unknown"),
    ({"rope_type": 1}, UnsupportedModelError, "rope type 1 is not supported for llama"),
    ({"rope_type": 2}, ModelFileError, "rope type llama3.1 without header key rope_scaling_factor"),
    ({"dim": 0}, ModelFileError, "header dim is 0, expected a positive number"),
])
def test_header_values_we_cannot_run(tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        open_model(_m(tmp_path, extra=extra))


def test_missing_and_unknown_header_keys(tmp_path):
    with pytest.raises(ModelFileError, match="header key weights_float_type is missing"):
        open_model(_m(tmp_path, drop=("weights_float_type",)))
    with pytest.raises(ModelFileError, match="header key n_layers is missing"):
        open_model(_m(tmp_path, drop=("n_layers",)))
    path = _m(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[8:12] = (99).to_bytes(4, "little")          # the first key becomes 99
    path.write_bytes(bytes(blob))
    with pytest.raises(UnsupportedModelError, match="header key 99 is unknown"):
        open_model(path)


def test_block_rows_must_be_whole_blocks(tmp_path):
    path = tmp_path / "odd.m"           # dim 48: q40 blocks would straddle rows
    params = {"version": 0, "arch_type": 0xABCD00, "dim": 48, "hidden_dim": 96, "n_layers": 1,
              "n_heads": 3, "n_kv_heads": 3, "vocab_size": 10, "max_seq_len": 16, "weights_float_type": 2}
    path.write_bytes(converter_header(params) + b"\0" * 100000)
    with pytest.raises(ModelFileError, match="tensor blk.0.attn_q.weight: row length 48 is not a "
                                             "multiple of the Q4_0 block size 32"):
        open_model(path)
