"""The tensor table (model/tensors.py): llama's tensors, their order in both file formats,
the cuts a slice makes, and that every kind has a home in the node's weights."""
import dataclasses

import pytest

from dllama_node.common.errors import UsageError
from dllama_node.engine.weights import LayerWeights, NodeWeights
from dllama_node.model.config import ModelConfig
from dllama_node.model.tensors import (LLAMA, TABLES, SliceSpec, dllama_m_tensors, file_shapes,
                                       model_tensors)

CFG = ModelConfig(arch="llama", dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, vocab_size=100, seq_len=32)
LAYER = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
         "ffn_up", "ffn_down"]


def test_llama_file_shapes_in_gguf_order():
    shapes = file_shapes(CFG, optional=("rope_freqs.weight",))
    names = ["token_embd", "rope_freqs"] + [f"blk.{i}.{p}" for i in range(2) for p in LAYER] + [
        "output_norm", "output"]
    assert list(shapes) == [n + ".weight" for n in names]
    assert shapes["blk.1.attn_q.weight"] == (64, 64) and shapes["blk.1.attn_k.weight"] == (32, 64)
    assert shapes["blk.0.ffn_down.weight"] == (64, 96) and shapes["rope_freqs.weight"] == (8,)
    tied = file_shapes(dataclasses.replace(CFG, tied_embeddings=True))
    assert "output.weight" not in tied and "rope_freqs.weight" not in tied


def test_tied_classifier_is_read_from_token_embd():
    out = model_tensors(dataclasses.replace(CFG, tied_embeddings=True))[-1]
    assert (out.name, out.source, out.shape) == ("output.weight", "token_embd.weight", (100, 64))


def test_dllama_m_order():
    names = [name.replace(".weight", "") for _, name, _ in dllama_m_tensors(CFG)]
    layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up",
             "attn_norm", "ffn_norm"]
    assert names == ["token_embd"] + [f"blk.{i}.{p}" for i in range(2) for p in layer] + [
        "output_norm", "output"]


def test_cuts_follow_the_units():
    spec = SliceSpec((1, 3), (0, 2), (32, 64), (10, 20))
    cuts = {t.name: t.kind.cut_ranges(CFG, spec) for t in model_tensors(CFG) if t.kind.in_slice}
    assert cuts["blk.0.attn_q.weight"] == ((16, 48), None)
    assert cuts["blk.0.attn_k.weight"] == ((0, 32), None)
    assert cuts["blk.0.attn_output.weight"] == ((0, 64), (16, 48))
    assert cuts["blk.0.ffn_down.weight"] == ((0, 64), (32, 64))
    assert cuts["blk.0.attn_norm.weight"] == (None, None)
    assert cuts["output.weight"] == ((10, 20), None)


def test_every_kind_has_a_place_in_the_node_weights():
    for table in TABLES.values():
        layer_fields = {f.name for f in dataclasses.fields(LayerWeights)}
        assert {k.key for k in table.layer} <= layer_fields
        assert {k.key for k in table.tail} <= {f.name for f in dataclasses.fields(NodeWeights)}
    assert LLAMA.layer_groups == ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                  "ffn_up", "ffn_down")


def test_slice_spec_round_trip_and_bounds():
    spec = SliceSpec([0, 4], (0, 2), (0, 96), (0, 100))
    assert spec == SliceSpec.full(CFG) and SliceSpec.from_dict(spec.to_dict()) == spec
    assert (spec.n_q_heads, spec.n_kv_heads, spec.n_ffn_rows, spec.n_vocab_rows) == (4, 2, 96, 100)
    spec.check(CFG)
    with pytest.raises(UsageError, match=r"ffn_rows \[0, 97\) is not inside \[0, 96\)"):
        SliceSpec((0, 4), (0, 2), (0, 97), (0, 100)).check(CFG)
