import pytest

from dllama_node.common.errors import MemoryPlanError, UsageError
from dllama_node.common.units import GiB, MiB
from dllama_node.engine.context import choose_max_seq_len

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
    assert "--max-seq-len" in c.reason


def test_default_is_the_model_context_when_it_is_small():
    c = choose_max_seq_len(2048, PER_POS, fixed_bytes=1 * GiB, available_bytes=20 * GiB)
    assert c.seq_len == 2048 and "model's context" in c.reason


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
