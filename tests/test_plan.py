"""The shard plan: byte accounting against hand arithmetic and real GGUF files, and the edge
cases of placing slices (1 node, 3 nodes on 4 KV heads, 5/6/7 nodes, more nodes than heads,
a node 10x faster, a node too small, tied classifier, vocab 32001, 12 and 20 heads, swap,
memlock, coordinator-only root, --split), the errors and their advice, the table and JSON."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from dllama_node.common.errors import MemoryPlanError, ModelFileError, UsageError
from dllama_node.common.units import GiB, MiB
from dllama_node.model.config import ModelConfig
from dllama_node.plan import (ModelLayout, NodeCapacity, PlanError, PlanOptions, SliceCounts, format_plan,
                              memory_need, plan_shards)
from dllama_node.plan.layout import F16, F32, Q4_0, Q8_0, slice_row_bytes

TINYLLAMA = ModelConfig("llama", dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4,
                        head_dim=64, vocab_size=32000, seq_len=2048)
LLAMA32_1B = ModelConfig("llama", dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8,
                         head_dim=64, vocab_size=128256, seq_len=131072, tied_embeddings=True)
Q4_ROW_2048 = 2048 // 32 * 18          # 1152 bytes: one q4_0 row of 2048 values


def node(node_id, ram, speed=1.0, swap=0, memlock=-1, coordinator_only=False):
    return NodeCapacity(node_id, int(ram), int(swap), int(memlock), 4, float(speed), coordinator_only)


def nodes(n, ram=1 * GiB, speed=1.0):
    return [node(f"n{i}", ram, speed) for i in range(n)]


def tiny(**changes):
    return ModelLayout.uniform(dataclasses.replace(TINYLLAMA, **changes))


def assert_tiles(ranges, n):
    """Half-open ranges, in node order, cover [0, n) exactly once."""
    start = 0
    for lo, hi in ranges:
        if hi > lo:
            assert lo == start, ranges
            start = hi
    assert start == n, ranges


def assert_well_formed(plan):
    c = plan.layout.config
    sliced = plan.slice_nodes
    assert_tiles([s.spec.q_heads for s in sliced], c.n_heads)
    assert_tiles([s.spec.ffn_rows for s in sliced], c.hidden_dim)
    assert_tiles([s.spec.vocab_rows for s in sliced], c.vocab_size)
    for s in sliced:
        if s.spec.n_q_heads:
            h0, h1 = s.spec.q_heads
            assert s.spec.kv_heads == (h0 // c.kv_group, (h1 - 1) // c.kv_group + 1)
        else:
            assert s.spec.n_kv_heads == 0 and s.memory.kv_cache == 0
    for s in plan.nodes:
        m = s.memory
        assert m.total == m.weights + m.kv_cache + m.buffers + m.reserve
        assert m.total <= m.available + m.swap_allowed
        assert m.headroom == m.available + m.swap_allowed - m.total >= 0
    assert plan.nodes[0].node_index == 0 and plan.nodes[0].role in ("root", "coordinator")


# -- accounting --------------------------------------------------------------------------------

def test_tinyllama_on_one_node_matches_hand_arithmetic():
    plan = plan_shards(tiny(), [node("solo", 2 * GiB)])
    (s,) = plan.nodes
    assert (s.role, s.spec.q_heads, s.spec.kv_heads, s.spec.ffn_rows, s.spec.vocab_rows) == (
        "root", (0, 32), (0, 4), (0, 5632), (0, 32000))
    assert plan.max_seq_len == 2048
    w = s.memory.weights_by_group
    per_layer = {"attn_q": 2048 * Q4_ROW_2048, "attn_k": 256 * Q4_ROW_2048, "attn_v": 256 * Q4_ROW_2048,
                 "attn_output": 2048 * Q4_ROW_2048, "ffn_gate": 5632 * Q4_ROW_2048,
                 "ffn_up": 5632 * Q4_ROW_2048, "ffn_down": 2048 * (5632 // 32 * 18)}
    for group, n_bytes in per_layer.items():
        assert w[group] == 22 * n_bytes, group
    assert w["attn_q"] == 51_904_512 and w["ffn_down"] == 142_737_408
    assert w["output"] == 32000 * Q4_ROW_2048 == 36_864_000
    assert w["norms"] == (2 * 22 + 1) * 2048 * 4
    assert s.memory.kv_cache == 2 * 22 * 2048 * 4 * 64 * 4 == 92_274_688
    b = s.memory.buffers_by_name
    assert b["att"] == 32 * 2048 * 4
    assert b["xq"] == b["sync_send"] == 64 * 34
    assert b["sync_recv"] == 0                       # nobody to receive from
    assert b["hb"] == b["hb2"] == 5632 * 4 and b["hb_q"] == 176 * 34
    assert b["logits"] == b["logits_all"] == 32000 * 4 and b["sampler"] == 32000 * 8
    assert b["embed_row"] == Q4_ROW_2048             # one row from the memmap, not the table
    assert s.memory.reserve == 64 * MiB


def test_slice_row_bytes_agree_with_the_gguf_package():
    gguf = pytest.importorskip("gguf")
    for t in (F32, F16, Q4_0, Q8_0):
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
        for k in (32, 64, 2048, 5632, 8192):
            assert slice_row_bytes(t, k) == k // block * size
    with pytest.raises(ValueError, match="not whole blocks"):
        slice_row_bytes(Q4_0, 80)


@pytest.mark.parametrize("weight_type", ["q4_0", "q8_0", "f16"])
def test_weights_of_all_nodes_sum_to_the_tensors_in_a_gguf_file(tmp_path, weight_type):
    """The oracle is the file: each matrix's nbytes as our writer laid it out."""
    from dllama_node.model import open_model
    from dllama_node.model.generate import write_random_model

    config = ModelConfig("llama", dim=64, hidden_dim=160, n_layers=2, n_heads=6, n_kv_heads=2,
                         head_dim=16, vocab_size=301, seq_len=64)
    path = str(tmp_path / "m.gguf")
    write_random_model(path, config, weight_type)
    with open_model(path) as m:
        layout = ModelLayout.from_tensors(m.config, m.tensors)
        file_bytes = {g: sum(t.nbytes for name, t in m.tensors.items() if name.endswith(f".{g}.weight")
                             and name.startswith("blk.")) for g in ("attn_q", "attn_output", "ffn_gate",
                                                                    "ffn_up", "ffn_down")}
        file_bytes["output"] = m.tensors["output.weight"].nbytes
        file_bytes["norms"] = sum(t.nbytes for name, t in m.tensors.items() if "norm" in name)
    for n_nodes in (1, 3):
        plan = plan_shards(layout, nodes(n_nodes, 256 * MiB), PlanOptions(reserve_bytes=MiB))
        assert_well_formed(plan)
        for group, n_bytes in file_bytes.items():
            total = sum(s.memory.weights_by_group[group] for s in plan.nodes)
            assert total == (n_bytes if group != "norms" else n_bytes * n_nodes), (group, n_nodes)


def test_from_tensors_maps_types_checks_shapes_and_sees_tied_output():
    from types import SimpleNamespace as T

    from dllama_node.model.loader import llama_tensor_shapes

    config = dataclasses.replace(TINYLLAMA, n_layers=2)
    shapes = llama_tensor_shapes(config)
    types = {name: (12 if "ffn_down" in name else 30 if "attn_v" in name else Q4_0) for name in shapes}
    tensors = {name: T(ggml_type=types[name], shape=shape) for name, shape in shapes.items()}
    layout = ModelLayout.from_tensors(config, tensors)
    assert layout.layers[1]["ffn_down"] == Q8_0         # Q4_K is loaded as Q8_0
    assert layout.layers[0]["attn_v"] == Q8_0           # BF16 too
    assert layout.layers[0]["attn_q"] == Q4_0 and layout.output_type == Q4_0
    del tensors["output.weight"]
    tensors["token_embd.weight"] = T(ggml_type=F16, shape=(32000, 2048))
    tied = ModelLayout.from_tensors(config, tensors)
    assert tied.config.tied_embeddings and tied.output_type == F16
    tensors["blk.1.attn_q.weight"] = T(ggml_type=Q4_0, shape=(2048, 2000))
    expected = r"blk\.1\.attn_q\.weight: expected shape 2048x2048, found 2048x2000"
    with pytest.raises(ModelFileError, match=expected):
        ModelLayout.from_tensors(config, tensors)
    del tensors["blk.1.attn_q.weight"]
    with pytest.raises(ModelFileError, match="blk.1.attn_q.weight: missing"):
        ModelLayout.from_tensors(config, tensors)


# -- placing slices ----------------------------------------------------------------------------

def test_three_nodes_on_four_kv_heads_share_the_kv_heads_they_straddle():
    plan = plan_shards(tiny(), nodes(3))
    assert_well_formed(plan)
    assert [s.spec.q_heads for s in plan.nodes] == [(0, 11), (11, 22), (22, 32)]
    assert [s.spec.kv_heads for s in plan.nodes] == [(0, 2), (1, 3), (2, 4)]
    one_kv_head = 2 * 22 * 2048 * 64 * 4
    assert [s.memory.kv_cache for s in plan.nodes] == [2 * one_kv_head] * 3
    assert [s.memory.weights_by_group["attn_k"] for s in plan.nodes] == [2 * 22 * 64 * Q4_ROW_2048] * 3
    assert [s.spec.n_ffn_rows for s in plan.nodes] == [1888, 1888, 1856]       # 59, 59, 58 blocks


@pytest.mark.parametrize("n_nodes", [2, 5, 6, 7, 8])
def test_equal_nodes_get_equal_slices_to_one_unit(n_nodes):
    plan = plan_shards(tiny(), nodes(n_nodes))
    assert_well_formed(plan)
    assert plan.n_nodes == n_nodes
    for count in ("n_q_heads", "n_ffn_rows", "n_vocab_rows"):
        sizes = [getattr(s.spec, count) for s in plan.nodes]
        unit = 1 if count == "n_q_heads" else 32
        assert max(sizes) - min(sizes) <= unit, (count, sizes)


def test_more_nodes_than_query_heads_leaves_some_without_attention():
    layout = ModelLayout.uniform(ModelConfig("llama", dim=256, hidden_dim=1024, n_layers=2, n_heads=4,
                                             n_kv_heads=2, head_dim=64, vocab_size=512, seq_len=256))
    plan = plan_shards(layout, nodes(6, 256 * MiB))
    assert_well_formed(plan)
    assert plan.n_nodes == 6 and not plan.excluded
    assert [s.spec.n_q_heads for s in plan.nodes] == [1, 1, 1, 1, 0, 0]
    headless = plan.nodes[4:]
    assert all(s.spec.n_kv_heads == 0 and s.memory.kv_cache == 0 and s.spec.n_ffn_rows > 0
               for s in headless)
    assert all(s.memory.weights_by_group["attn_q"] == 0 for s in headless)


def test_eight_nodes_on_four_kv_heads():
    plan = plan_shards(tiny(), nodes(8))
    assert_well_formed(plan)
    assert [s.spec.kv_heads for s in plan.nodes] == [(k, k + 1) for k in range(4) for _ in range(2)]


def test_a_node_ten_times_faster_gets_ten_times_the_rows():
    caps = nodes(4)
    caps[2] = node("fast", 4 * GiB, speed=10.0)
    plan = plan_shards(tiny(), caps)
    assert_well_formed(plan)
    fast, slow = plan.node("fast"), plan.node("n0")
    assert fast.spec.n_q_heads == 25                                 # 32 * 10/13 = 24.6
    assert fast.spec.n_ffn_rows == 135 * 32                          # 176 blocks * 10/13 = 135.4
    assert abs(fast.spec.n_vocab_rows / slow.spec.n_vocab_rows - 10) < 0.1


def test_when_kv_heads_are_dear_attention_is_cut_at_whole_kv_groups():
    """At 131072 tokens one KV head's cache is 1 GiB: split by speed (8 heads on the first node
    would read 2-3 KV heads), or head by head at the worst case, it does not fit; in whole groups
    of 4 query heads nobody holds a KV head twice, and it does."""
    rams = [1.5, 2, 2.5, 3, 3.5, 4]
    caps = [node(f"n{i}", ram * GiB, speed=s) for i, (ram, s) in enumerate(zip(rams, [3, 1, 2, 3, 1, 2]))]
    plan = plan_shards(ModelLayout.uniform(LLAMA32_1B), caps, PlanOptions(max_seq_len=131072))
    assert_well_formed(plan)
    assert all(s.spec.q_heads[0] % 4 == 0 and s.spec.n_q_heads % 4 == 0 for s in plan.nodes)
    assert sum(s.spec.n_kv_heads for s in plan.nodes) == 8
    assert sum(s.memory.kv_cache for s in plan.nodes) == 8 * GiB


@pytest.mark.parametrize("n_heads,n_kv_heads", [(12, 4), (20, 4), (20, 20), (12, 3)])
def test_head_counts_that_are_not_powers_of_two(n_heads, n_kv_heads):
    config = ModelConfig("llama", dim=n_heads * 64, hidden_dim=3456, n_layers=4, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, head_dim=64, vocab_size=1000, seq_len=512)
    for n_nodes in (3, 5, 7):
        plan = plan_shards(ModelLayout.uniform(config), nodes(n_nodes, 512 * MiB))
        assert_well_formed(plan)


def test_head_dim_80_cuts_a_quantized_attn_output_at_whole_blocks():
    config = ModelConfig("llama", dim=2560, hidden_dim=6912, n_layers=2, n_heads=32, n_kv_heads=32,
                         head_dim=80, vocab_size=1000, seq_len=512)
    q4 = plan_shards(ModelLayout.uniform(config, Q4_0), nodes(3))
    assert_well_formed(q4)
    assert q4.layout.heads_per_unit == 2                        # 2 * 80 = 160 = 5 blocks of 32
    assert [s.spec.n_q_heads for s in q4.nodes] == [12, 10, 10]      # 16 units: 6, 5, 5
    f32 = plan_shards(ModelLayout.uniform(config, F32), nodes(3, 2 * GiB))
    assert [s.spec.n_q_heads for s in f32.nodes] == [11, 11, 10]


def test_vocab_32001_leaves_a_short_last_block():
    plan = plan_shards(tiny(vocab_size=32001), nodes(3))
    assert_well_formed(plan)
    *first, last = plan.nodes
    assert all(s.spec.n_vocab_rows % 32 == 0 for s in first)
    assert last.spec.vocab_rows[1] == 32001 and last.spec.n_vocab_rows % 32 == 1
    assert last.memory.weights_by_group["output"] == last.spec.n_vocab_rows * Q4_ROW_2048


def test_tied_classifier_uses_the_embedding_type():
    layout = ModelLayout.uniform(LLAMA32_1B, Q4_0, token_embd_type=Q8_0)
    assert layout.output_type == Q8_0
    plan = plan_shards(layout, nodes(2, 2 * GiB), PlanOptions(max_seq_len=4096))
    assert_well_formed(plan)
    for s in plan.nodes:
        assert s.memory.weights_by_group["output"] == s.spec.n_vocab_rows * (2048 // 32 * 34)
    assert sum(s.spec.n_vocab_rows for s in plan.nodes) == 128256


def test_a_node_too_small_for_one_unit_is_excluded_with_its_numbers():
    caps = nodes(3) + [node("b3", 40 * MiB)]
    plan = plan_shards(tiny(), caps)
    assert_well_formed(plan)
    assert [s.node_id for s in plan.nodes] == ["n0", "n1", "n2"]
    (excluded,) = plan.excluded
    assert excluded.node_id == "b3"
    assert excluded.reason.startswith("has 40 MiB available, its smallest slice needs 95 MiB (weights 9 MiB, "
                                      "KV cache 22 MiB at max_seq_len 2048, buffers 1 MiB, reserve 64 MiB)")


def test_a_small_node_takes_what_fits_and_the_rest_goes_to_the_others():
    caps = [node("a", 1 * GiB), node("b", 100 * MiB), node("c", 1 * GiB)]
    plan = plan_shards(tiny(), caps)
    assert_well_formed(plan)
    b = plan.node("b")
    assert 0 < b.memory.headroom < 8 * MiB and b.spec.n_q_heads < 10       # full, but not a third
    assert plan.node("a").spec.n_ffn_rows > 2 * b.spec.n_ffn_rows


def test_a_root_too_small_for_a_slice_only_coordinates():
    caps = [node("root", 66 * MiB)] + nodes(2)
    plan = plan_shards(tiny(), caps)
    assert_well_formed(plan)
    root = plan.nodes[0]
    assert root.role == "coordinator" and root.memory.weights == 0
    assert root.memory.buffers_by_name["logits_all"] == 32000 * 4
    assert any("only coordinates" in w for w in plan.warnings)


def test_a_coordinator_only_root_holds_no_slice_and_other_coordinators_are_excluded():
    caps = [node("big", 8 * GiB, coordinator_only=True)] + nodes(2) + [node("x", GiB, coordinator_only=True)]
    plan = plan_shards(tiny(), caps)
    assert_well_formed(plan)
    assert [(s.node_id, s.role) for s in plan.nodes] == [
        ("big", "coordinator"), ("n0", "worker"), ("n1", "worker")]
    assert plan.nodes[0].memory.buffers_by_name["sync_recv"] == 2 * 64 * 34   # from both workers
    assert plan.excluded[0].node_id == "x" and "coordinator" in plan.excluded[0].reason


def test_split_overrides_speed_and_zero_excludes():
    plan = plan_shards(tiny(), nodes(3, speed=5.0), PlanOptions(split=(1.0, 3.0, 0.0)))
    assert [s.spec.n_q_heads for s in plan.nodes] == [8, 24]
    assert plan.excluded[0].node_id == "n2" and "split weight is 0" in plan.excluded[0].reason
    with pytest.raises(UsageError, match="split has 2 weights, there are 3 nodes"):
        plan_shards(tiny(), nodes(3), PlanOptions(split=(1.0, 1.0)))


def test_inputs_that_make_no_sense_are_usage_errors():
    with pytest.raises(UsageError, match="max_seq_len 4096 is outside"):
        plan_shards(tiny(), nodes(1), PlanOptions(max_seq_len=4096))
    with pytest.raises(UsageError, match="not unique"):
        plan_shards(tiny(), [node("a", GiB), node("a", GiB)])
    with pytest.raises(UsageError, match="speed is -1"):
        plan_shards(tiny(), [node("a", GiB, speed=-1)])
    with pytest.raises(UsageError, match="empty"):
        plan_shards(tiny(), [])


# -- max_seq_len ---------------------------------------------------------------------------------

def test_default_max_seq_len_fits_the_cluster_not_the_model_card():
    layout = ModelLayout.uniform(LLAMA32_1B)
    caps = [node("b1", 1 * GiB), node("b2", 1 * GiB)]
    plan = plan_shards(layout, caps, PlanOptions(seq_len_cap=None))
    assert_well_formed(plan)
    seq = plan.max_seq_len
    assert seq % 256 == 0 and 4096 < seq < 131072
    # one step longer does not fit, with the same slices or any others
    with pytest.raises(PlanError):
        plan_shards(layout, caps, PlanOptions(max_seq_len=seq + 256))
    assert re.fullmatch(rf"max_seq_len {seq} \(model card 131072\): the KV cache of 131072 tokens would need "
                        r"4\.0 GiB on node b[12], which has 1\.0 GiB available "
                        r"\(slices in proportion to speed\)", plan.seq_len_reason)
    kv_per_token = 2 * 16 * 4 * 64 * 4               # 4 of 8 KV heads each
    assert plan.nodes[0].memory.kv_cache == seq * kv_per_token


def test_default_max_seq_len_is_capped_as_on_a_single_node():
    """Memory for 19968 tokens: the default stays at the cap (4096), and the reason says
    how far --max-seq-len goes."""
    layout = ModelLayout.uniform(LLAMA32_1B)
    caps = [node("b1", 1 * GiB), node("b2", 1 * GiB)]
    longest = plan_shards(layout, caps, PlanOptions(seq_len_cap=None)).max_seq_len
    plan = plan_shards(layout, caps)
    assert plan.max_seq_len == 4096 < longest
    assert plan.seq_len_reason == (
        f"max_seq_len 4096: the default cap 4096 (the model's context is 131072); --max-seq-len "
        f"raises it up to {longest}, what memory allows (slices in proportion to speed)")
    assert plan_shards(layout, caps, PlanOptions(max_seq_len=longest)).max_seq_len == longest
    # a model card below the cap: its own context, as before
    assert plan_shards(tiny(), caps).seq_len_reason == "max_seq_len 2048: the model's context"


def test_default_max_seq_len_keeps_slices_balanced_when_that_leaves_2048_tokens():
    layout = ModelLayout.uniform(LLAMA32_1B)
    caps = [node("small", 1 * GiB), node("big", 16 * GiB)]
    plan = plan_shards(layout, caps)
    assert 2048 <= plan.max_seq_len < 131072
    assert plan.nodes[0].spec.n_ffn_rows == plan.nodes[1].spec.n_ffn_rows            # in proportion to speed
    # the model card's context fits too, if the big node does most of the work: asked for, it is
    long = plan_shards(layout, caps, PlanOptions(max_seq_len=131072))
    assert_well_formed(long)
    assert long.node("small").spec.n_ffn_rows < long.node("big").spec.n_ffn_rows


def test_default_max_seq_len_water_fills_when_balance_would_leave_under_2048_tokens():
    caps = [node("a", 520 * MiB, speed=3.0), node("b", 8 * GiB)]
    plan = plan_shards(tiny(), caps)                    # balanced slices fit only 1536 tokens
    assert plan.max_seq_len == 2048
    assert plan.node("a").spec.n_ffn_rows < 132 * 32 and plan.node("a").memory.headroom < MiB
    roomy = plan_shards(tiny(), [node("a", 560 * MiB, speed=3.0), node("b", 8 * GiB)])
    assert roomy.max_seq_len == 2048 and roomy.node("a").spec.n_ffn_rows == 132 * 32     # 176 * 3/4


def test_default_max_seq_len_is_the_model_cards_when_it_fits():
    plan = plan_shards(tiny(), nodes(2))
    assert plan.max_seq_len == 2048 and plan.seq_len_reason == "max_seq_len 2048: the model's context"


def test_an_explicit_max_seq_len_that_does_not_fit_says_which_would():
    layout = ModelLayout.uniform(LLAMA32_1B)
    caps = nodes(2)
    with pytest.raises(PlanError) as err:
        plan_shards(layout, caps, PlanOptions(max_seq_len=131072))
    assert isinstance(err.value, MemoryPlanError) and err.value.exit_code == 5
    shorter = int(re.search(r"--max-seq-len (\d+)", str(err.value)).group(1))
    plan_shards(layout, caps, PlanOptions(max_seq_len=shorter))          # the advice holds
    assert "\n" not in str(err.value)


# -- errors and their advice -----------------------------------------------------------------------

def test_one_node_too_small_names_it_and_what_would_fit():
    with pytest.raises(PlanError) as err:
        plan_shards(tiny(), [node("solo", 400 * MiB, swap=1 * GiB)])
    message = str(err.value)
    assert message.startswith("node solo has 400 MiB available, the model needs 6")
    assert err.value.node_id == "solo" and err.value.available_bytes == 400 * MiB
    assert "--allow-swap" in message
    extra = int(re.search(r"another node with (\d+) MiB available", message).group(1))
    # both pieces of advice hold
    plan_shards(tiny(), [node("solo", 400 * MiB), node("new", extra * MiB)])
    with pytest.raises(PlanError):
        plan_shards(tiny(), [node("solo", 400 * MiB), node("new", (extra - 2) * MiB)])
    swapped = plan_shards(tiny(), [node("solo", 400 * MiB, swap=1 * GiB)], PlanOptions(allow_swap=True))
    assert_well_formed(swapped)


def test_a_cluster_too_small_suggests_a_smaller_quantization():
    layout = ModelLayout.uniform(TINYLLAMA, Q8_0)
    caps = [node("a", 450 * MiB), node("b", 450 * MiB)]
    with pytest.raises(PlanError) as err:
        plan_shards(layout, caps)
    message = str(err.value)
    assert message.startswith("nodes a (450 MiB), b (450 MiB) have 900 MiB available in all")
    assert "a q4_0 model" in message
    plan_shards(layout.requantized(Q4_0), caps)


def test_the_smallest_slice_error_when_every_node_is_too_small():
    with pytest.raises(PlanError, match=r"^node b has 50 MiB available, its smallest slice needs 75 MiB "
                                        r"\(weights 9 MiB, KV cache 2 MiB at max_seq_len 128"):
        plan_shards(tiny(), [node("a", 30 * MiB), node("b", 50 * MiB)])


# -- swap and locked memory --------------------------------------------------------------------------

def test_swap_is_used_only_when_allowed_and_then_the_node_does_not_lock():
    caps = [node("a", 300 * MiB, swap=2 * GiB), node("b", 300 * MiB)]
    with pytest.raises(PlanError, match="--allow-swap"):
        plan_shards(tiny(), caps)
    plan = plan_shards(tiny(), caps, PlanOptions(allow_swap=True))
    assert_well_formed(plan)
    a, b = plan.nodes
    assert a.memory.swap_used > 0 and not a.memory.lock
    assert b.memory.swap_used == 0 and b.memory.lock
    assert any(w.startswith("node a puts") and "in swap" in w for w in plan.warnings)
    assert plan.seq_len_reason.endswith("(with swap on a)")


def test_swap_is_left_alone_when_ram_suffices():
    plan = plan_shards(tiny(), [node("a", GiB, swap=GiB)], PlanOptions(allow_swap=True))
    assert plan.nodes[0].memory.swap_used == 0 and plan.nodes[0].memory.lock


def test_a_memlock_limit_below_the_total_means_no_lock_and_a_warning():
    plan = plan_shards(tiny(), [node("a", GiB, memlock=8 * MiB), node("b", GiB)])
    a, b = plan.nodes
    assert not a.memory.lockable and not a.memory.lock and b.memory.lock
    assert any("node a" in w and "memlock limit of 8 MiB" in w for w in plan.warnings)


# -- the JSON (the table: tests/test_plan_table.py) -----------------------------------------

def test_to_dict_is_json_and_its_totals_are_the_sums():
    plan = plan_shards(tiny(vocab_size=32001), nodes(3) + [node("tiny", MiB)])
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["max_seq_len"] == 2048 and data["model"]["vocab_size"] == 32001
    assert [n["node_id"] for n in data["nodes"]] == ["n0", "n1", "n2"]
    assert data["excluded"][0]["node_id"] == "tiny"
    for key in ("weights", "kv_cache", "buffers", "reserve", "total", "available", "headroom"):
        assert data["totals"][key] == sum(n["memory"][key] for n in data["nodes"])
    for n in data["nodes"]:
        assert n["memory"]["weights"] == sum(n["memory"]["weights_by_group"].values())
        assert n["memory"]["buffers"] == sum(n["memory"]["buffers_by_name"].values())


def test_memory_need_is_linear_in_blocks():
    layout = tiny()
    base = memory_need(layout, SliceCounts(), seq_len=512, role="worker", n_slice_nodes=3)
    one = memory_need(layout, SliceCounts(n_ffn_rows=32), seq_len=512, role="worker", n_slice_nodes=3)
    ten = memory_need(layout, SliceCounts(n_ffn_rows=320), seq_len=512, role="worker", n_slice_nodes=3)
    assert ten.total - base.total == 10 * (one.total - base.total)
    assert one.total - base.total == 22 * (2 * 32 * Q4_ROW_2048 + 2048 * 18) + 32 * 4 * 2 + 34


def test_the_mesh_frames_are_counted_on_every_node_of_the_exchange():
    """The all-gather mesh (cluster/mesh.py, the default) keeps a frame per node of the
    exchange on every node: n * (header + batch * wire row bytes), the coordinator too."""
    from dllama_node.cluster.protocol import HEADER
    from dllama_node.plan.accounting import MESH_FRAME_HEADER_BYTES

    assert MESH_FRAME_HEADER_BYTES == HEADER.size
    frame = HEADER.size + 64 * 34                       # one q8_0 row of dim 2048, batch 1
    alone = plan_shards(tiny(), nodes(1))
    assert alone.nodes[0].memory.buffers_by_name["sync_mesh"] == 0
    three = plan_shards(tiny(), nodes(3, 2 * GiB))
    assert [s.memory.buffers_by_name["sync_mesh"] for s in three.nodes] == [3 * frame] * 3
    five = plan_shards(tiny(), nodes(5, 2 * GiB))
    assert {s.memory.buffers_by_name["sync_mesh"] for s in five.nodes} == {5 * frame}
    coordinated = plan_shards(tiny(), [node("big", 8 * GiB, coordinator_only=True)] + nodes(2))
    assert [s.role for s in coordinated.nodes] == ["coordinator", "worker", "worker"]
    assert [s.memory.buffers_by_name["sync_mesh"] for s in coordinated.nodes] == [3 * frame] * 3
    batched = plan_shards(tiny(), nodes(2, 2 * GiB), PlanOptions(batch_size=7))
    assert batched.nodes[1].memory.buffers_by_name["sync_mesh"] == 2 * (HEADER.size + 7 * 64 * 34)
