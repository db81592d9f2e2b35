"""Small random Llama models from Hugging Face transformers, written to GGUF with the
`gguf` package the way llama.cpp's converter does (Q/K rows permuted for GGML's
adjacent-pair RoPE, Llama 3 rope scaling as a rope_freqs tensor).

transformers is the reference nobody here wrote; the `gguf` package is the writer
nobody here wrote. Test-only: neither is a runtime dependency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from dllama_node.model.generate import synthetic_vocab

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")
gguf = __import__("pytest").importorskip("gguf")

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Shape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5


SHAPES = [
    # Llama 2 style: multi-head attention, untied classifier
    Shape("llama2-mha", 64, 160, 2, 4, 4, 320),
    # TinyLlama style: grouped-query attention (3 query heads per KV head), 6 heads
    Shape("tinyllama-gqa", 96, 224, 2, 6, 2, 300),
    # Llama 3.2 style: GQA, large rope theta, llama3 rope scaling, tied embeddings
    Shape("llama3-scaled-tied", 128, 352, 3, 8, 2, 384, max_position_embeddings=512,
          rope_theta=500000.0, tie_word_embeddings=True,
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
]


def make_hf_llama(shape: Shape, seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta, rope_scaling=shape.rope_scaling,
        tie_word_embeddings=shape.tie_word_embeddings, initializer_range=0.08,
        attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1.0, so a missing norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.6, 1.4)
    return model


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate_half layout -> GGML's adjacent pairs (llama.cpp convert_hf_to_gguf)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _llama3_rope_factors(shape: Shape) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for rope_type llama3."""
    s = shape.rope_scaling
    head_dim = shape.hidden_size // shape.num_attention_heads
    freqs = 1.0 / (shape.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s["factor"])
        else:
            smooth = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                      / (s["high_freq_factor"] - s["low_freq_factor"]))
            factors.append(1.0 / ((1 - smooth) / s["factor"] + smooth))
    return np.asarray(factors, dtype=np.float32)


def _gguf_tensors(model, shape: Shape):
    """(gguf name, float32 array) in llama.cpp's naming and layout."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        yield f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", permute_qk(sd[p + "self_attn.q_proj.weight"],
                                                   shape.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", permute_qk(sd[p + "self_attn.k_proj.weight"],
                                                   shape.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"]
        yield f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    if not shape.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]


def write_gguf(model, shape: Shape, path: str, weight_type: str = "f32") -> None:
    """Write `model` as GGUF; matrices in weight_type (f32, f16, q8_0, q4_0), norms f32."""
    qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[weight_type]
    w = gguf.GGUFWriter(path, "llama")
    head_dim = shape.hidden_size // shape.num_attention_heads
    w.add_context_length(shape.max_position_embeddings)
    w.add_embedding_length(shape.hidden_size)
    w.add_block_count(shape.num_hidden_layers)
    w.add_feed_forward_length(shape.intermediate_size)
    w.add_head_count(shape.num_attention_heads)
    w.add_head_count_kv(shape.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(shape.rms_norm_eps)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_file_type(0)
    tokens, scores, types = synthetic_vocab(shape.vocab_size)
    scores, types = [float(v) for v in scores], [int(v) for v in types]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    for name, arr in _gguf_tensors(model, shape):
        if arr.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    if shape.rope_scaling:
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequantized_copy(model, weight_type: str):
    """A copy of `model` whose matrices went through weight_type and back: the reference
    for a quantized file (norms stay float32, as in the file)."""
    import copy

    ref = copy.deepcopy(model)
    if weight_type == "f32":
        return ref
    qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[weight_type]
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2:
                a = p.detach().float().numpy()
                if qtype == Q.F16:
                    back = a.astype(np.float16).astype(np.float32)
                else:
                    back = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
                p.copy_(torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)))
    return ref


def hf_last_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long))
    return out.logits[0, -1].float().numpy()


def hf_greedy(model, ids, n: int) -> list:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids], dtype=torch.long)).logits[0, -1]
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            ids.append(nxt)
    return out
