import pytest

from dllama_node.common.errors import MemoryPlanError, UsageError
from dllama_node.common.units import GiB, MiB
from dllama_node.engine.context import choose_max_seq_len, longer_context_advice

# Llama 3.2 1B: 16 layers, 8 KV heads of 64 -> 2 * 16 * 512 * 4 bytes per position
PER_POS = 2 * 16 * 512 * 4


def test_default_is_not_the_model_card_when_memory_is_short():
    c = choose_max_seq_len(131072, PER_POS, fixed_bytes=800 * MiB, available_bytes=1 * GiB)
    assert 0 < c.seq_len < 131072
    assert c.kv_bytes + 800 * MiB + 64 * MiB <= 1 * GiB
    assert "memory allows" in c.reason and "131072" in c.reason


def test_default_caps_when_memory_is_ample_and_says_so():
    c = choose_max_seq_len(131072, PER_POS, fixed_bytes=1 * GiB, available_bytes=20 * GiB)
    assert c.seq_len == 4096
    # 19 GiB less 64 MiB of reserve at 64 KiB a position: 303104 positions, more than the model's
    assert c.reason == ("max_seq_len 4096: the default cap 4096 (the model's context is "
                        "131072); --max-seq-len raises it up to 131072")
    c = choose_max_seq_len(131072, PER_POS, fixed_bytes=1 * GiB, available_bytes=2 * GiB)
    assert c.reason == ("max_seq_len 4096: the default cap 4096 (the model's context is "
                        "131072); --max-seq-len raises it up to 15360, what memory allows")


def test_default_is_the_model_context_when_it_is_small_and_memory_goes_unsaid():
    c = choose_max_seq_len(2048, PER_POS, fixed_bytes=1 * GiB, available_bytes=20 * GiB)
    assert c.seq_len == 2048 and c.reason == "max_seq_len 2048: the model's context"
    assert c.advice == "that is the model's own context: shorten the prompt"


def test_advice_for_a_prompt_longer_than_the_context_is_true_to_the_limit():
    # the model's own context is the limit: no flag would help
    assert longer_context_advice(256, 256, 6_000_000) == ("that is the model's own context: "
                                                          "shorten the prompt")
    # only the user's --max-seq-len is: raising it helps, up to what memory and model allow
    assert longer_context_advice(128, 256, 6_000_000) == ("shorten the prompt, or raise "
                                                          "--max-seq-len (up to 256 here)")
    assert longer_context_advice(1024, 131072, 3000).endswith("(up to 3000 here)")
    # memory is the limit: raising --max-seq-len would not fit
    advice = longer_context_advice(3000, 131072, 3000)
    assert "--max-seq-len" not in advice and "memory" in advice and "more nodes" in advice
    # a cluster planned at an asked length: whether memory allows more is not known
    assert "if memory allows" in longer_context_advice(1024, 4096, None)


def test_the_choice_carries_its_advice():
    asked = choose_max_seq_len(2048, PER_POS, 0, 20 * GiB, requested=512)
    assert asked.advice == "shorten the prompt, or raise --max-seq-len (up to 2048 here)"
    short = choose_max_seq_len(131072, PER_POS, fixed_bytes=800 * MiB, available_bytes=1 * GiB)
    assert short.memory_seq_len == short.seq_len and "memory holds" in short.advice


def test_request_larger_than_memory_names_the_numbers():
    with pytest.raises(MemoryPlanError, match=r"max-seq-len 131072 needs 8\.0 GiB .* "
                                              r"use --max-seq-len \d+ or less"):
        choose_max_seq_len(131072, PER_POS, 700 * MiB, 3 * GiB, requested=131072)


def test_request_beyond_the_model_context_is_refused():
    with pytest.raises(UsageError, match="longer than the model's context 2048"):
        choose_max_seq_len(2048, PER_POS, 0, 20 * GiB, requested=4096)
    with pytest.raises(UsageError, match="max-seq-len 0"):
        choose_max_seq_len(2048, PER_POS, 0, 20 * GiB, requested=0)


def test_weights_that_do_not_fit_say_how_much_more():
    with pytest.raises(MemoryPlanError, match="needs .* more"):
        choose_max_seq_len(2048, PER_POS, fixed_bytes=2 * GiB, available_bytes=1 * GiB)
