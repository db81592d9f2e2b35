"""plan/seq_len.py: the one max_seq_len rule -- the lengths, the search, the limits and the
reason -- and that a single node (engine/context.py) is a one-node plan."""
from __future__ import annotations

import pytest

from dllama_node.common.errors import MemoryPlanError
from dllama_node.common.units import GiB, MiB
from dllama_node.engine.context import choose_max_seq_len
from dllama_node.plan import PlanOptions, plan_shards
from dllama_node.plan.accounting import ROLE_ROOT, SliceCounts, memory_need
from dllama_node.plan.seq_len import (LIMIT_ASKED, LIMIT_CAP, LIMIT_MEMORY, LIMIT_MODEL,
                                      default_lengths, limit_of, longest_fitting,
                                      seq_len_reason, shorter_lengths)
from dllama_node.plan import ModelLayout
from tests.test_plan import LLAMA32_1B, node, tiny


def test_the_lengths_a_default_and_a_suggestion_take():
    assert default_lengths(2048) == [128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert default_lengths(300) == [128, 256, 300]
    assert default_lengths(100) == [100]                     # never more than the model's
    assert default_lengths(131072, cap=4096)[-1] == 4096
    assert default_lengths(2048, cap=4096)[-1] == 2048
    assert shorter_lengths(600) == [16, 32, 64, 128, 256, 512]
    assert shorter_lengths(16) == []


@pytest.mark.parametrize("fit_up_to", [0, 15, 16, 100, 128, 300, 4095, 4096, 9000])
def test_longest_fitting_is_the_largest_length_that_fits(fit_up_to):
    lengths = shorter_lengths(8192)
    tried = []

    def attempt(s):
        tried.append(s)
        return s <= fit_up_to
    seq, ok = longest_fitting(lengths, attempt)
    fitting = [s for s in lengths if s <= fit_up_to]
    assert (seq, ok) == ((fitting[-1], True) if fitting else (lengths[0], False))
    assert len(tried) <= 2 + len(lengths).bit_length()


def test_the_limit_a_length_stands_at():
    assert limit_of(512, 2048, asked=True) == LIMIT_ASKED
    assert limit_of(2048, 2048, longest=2048) == LIMIT_MODEL
    assert limit_of(4096, 131072, longest=15360, cap=4096) == LIMIT_CAP
    assert limit_of(4096, 131072, longest=4096, cap=4096) == LIMIT_MEMORY
    assert limit_of(2816, 131072, longest=3000, cap=4096) == LIMIT_MEMORY


def test_the_reason_texts():
    assert seq_len_reason(512, 2048, LIMIT_ASKED) == "max_seq_len 512 (asked for; model card 2048)"
    assert seq_len_reason(2048, 2048, LIMIT_MODEL) == "max_seq_len 2048: the model's context"
    assert seq_len_reason(2048, 2048, LIMIT_MODEL, notes=["with swap on a"]) == (
        "max_seq_len 2048: the model's context (with swap on a)")
    assert seq_len_reason(4096, 131072, LIMIT_CAP, longest=15360, memory_limits_longest=True) == (
        "max_seq_len 4096: the default cap 4096 (the model's context is 131072); --max-seq-len "
        "raises it up to 15360, what memory allows")
    assert seq_len_reason(1024, 2048, LIMIT_MEMORY, why_memory="the KV cache would need more") == (
        "max_seq_len 1024 (model card 2048): the KV cache would need more")


# ---- a single node is a one-node plan ---------------------------------------------------------
LAYOUT = tiny()                                   # a 2048-token context: the cap does not bind
RESERVE = 64 * MiB


def one_node_costs(layout=LAYOUT):
    """What the plan counts for one node holding everything: (fixed bytes, bytes per position)."""
    c = layout.config
    everything = SliceCounts(c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size)

    def total(seq):
        return memory_need(layout, everything, seq_len=seq, role=ROLE_ROOT, n_slice_nodes=1,
                           reserve_bytes=0).total
    return total(0), total(1) - total(0)


@pytest.mark.parametrize("ram", [600 * MiB, 620 * MiB, 630 * MiB, 640 * MiB, 650 * MiB,
                                 700 * MiB, 2 * GiB])
def test_one_node_plan_and_the_single_node_choose_the_same_length(ram):
    fixed, per_pos = one_node_costs()
    try:
        plan = plan_shards(LAYOUT, [node("solo", ram)], PlanOptions(reserve_bytes=RESERVE))
    except MemoryPlanError:                     # nothing fits: the single node says so too
        with pytest.raises(MemoryPlanError):
            choose_max_seq_len(2048, per_pos, fixed, ram, reserve_bytes=RESERVE)
        return
    single = choose_max_seq_len(2048, per_pos, fixed, ram, reserve_bytes=RESERVE)
    assert plan.max_seq_len == single.seq_len
    if single.seq_len == 2048:
        assert plan.seq_len_reason == single.reason == "max_seq_len 2048: the model's context"
    else:
        assert plan.seq_len_reason.startswith(f"max_seq_len {single.seq_len} (model card 2048): ")
        assert single.reason.startswith(f"max_seq_len {single.seq_len} (model card 2048): "
                                        "what memory allows (")


@pytest.mark.parametrize("ram", [8 * GiB, 24 * GiB])
def test_one_node_plan_and_the_single_node_stop_at_the_same_cap(ram):
    """A model card of 131072 tokens and memory for more than 4096: both stop at the cap
    and say the same, up to how far --max-seq-len goes."""
    layout = ModelLayout.uniform(LLAMA32_1B)
    fixed, per_pos = one_node_costs(layout)
    plan = plan_shards(layout, [node("solo", ram)], PlanOptions(reserve_bytes=RESERVE))
    single = choose_max_seq_len(131072, per_pos, fixed, ram, reserve_bytes=RESERVE)
    assert plan.max_seq_len == single.seq_len == 4096
    assert plan.seq_len_reason == single.reason
    assert single.reason.startswith("max_seq_len 4096: the default cap 4096 (the model's "
                                    "context is 131072); --max-seq-len raises it up to ")


def test_one_node_asked_length_has_the_same_reason():
    fixed, per_pos = one_node_costs()
    plan = plan_shards(LAYOUT, [node("solo", 2 * GiB)], PlanOptions(max_seq_len=512,
                                                                      reserve_bytes=RESERVE))
    single = choose_max_seq_len(2048, per_pos, fixed, 2 * GiB, 512, reserve_bytes=RESERVE)
    assert plan.seq_len_reason == single.reason == "max_seq_len 512 (asked for; model card 2048)"


def test_single_node_default_is_a_plan_length_below_what_memory_holds():
    per_pos = 64 * 1024
    c = choose_max_seq_len(131072, per_pos, 800 * MiB, 800 * MiB + RESERVE + 3000 * per_pos)
    assert c.seq_len == 2816 and c.memory_seq_len == 3000       # a multiple of 256
    assert c.advice == "shorten the prompt, or raise --max-seq-len (up to 3000 here)"
    # memory for less than the shortest default: an error that names what would run
    with pytest.raises(MemoryPlanError, match=r"holds a context of 100 tokens, less than the "
                                              r"shortest default 128 .*--max-seq-len 100 or less"):
        choose_max_seq_len(131072, per_pos, 800 * MiB, 800 * MiB + RESERVE + 100 * per_pos)
