"""How long a context this node can hold: the max-seq-len default and its check.

The default fits the memory this node has, never the model card's 131072 blindly, and
says why it is what it is: a single node is a one-node plan, so the lengths, the search
and the reason are the plan's (plan/seq_len.py). Pure: the memory reading is an argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dllama_node.common.errors import MemoryPlanError, UsageError
from dllama_node.common.units import format_bytes
from dllama_node.plan.seq_len import (DEFAULT_MAX_SEQ_LEN_CAP, LIMIT_ASKED, default_lengths,
                                      limit_of, longest_fitting, seq_len_reason)

DEFAULT_RESERVE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ContextChoice:
    seq_len: int
    reason: str
    kv_bytes: int
    model_seq_len: Optional[int] = None    # the model's own context
    memory_seq_len: Optional[int] = None   # the longest context this node's memory holds

    @property
    def advice(self) -> str:
        """What to do about a prompt that does not fit (longer_context_advice)."""
        return longer_context_advice(self.seq_len, self.model_seq_len or self.seq_len,
                                     self.memory_seq_len)


def longer_context_advice(seq_len: int, model_seq_len: int,
                          memory_seq_len: Optional[int]) -> str:
    """What would let a prompt longer than a context of `seq_len` through, true to what
    limits it: the model's own context (shorten the prompt), this node's memory (shorten
    it, or more nodes), or only the max-seq-len chosen (raise it, to at most what both
    allow). memory_seq_len None: not known (a cluster's plan made at an asked length)."""
    if seq_len >= model_seq_len:
        return "that is the model's own context: shorten the prompt"
    if memory_seq_len is None:
        return (f"shorten the prompt, or raise --max-seq-len if memory allows (the model's "
                f"context is {model_seq_len})")
    longest = min(model_seq_len, memory_seq_len)
    if longest > seq_len:
        return f"shorten the prompt, or raise --max-seq-len (up to {longest} here)"
    return (f"that is all this node's memory holds (the model's context is {model_seq_len}): "
            "shorten the prompt, or run the model on more nodes")


def choose_max_seq_len(model_seq_len: int, kv_bytes_per_position: int, fixed_bytes: int,
                       available_bytes: int, requested: Optional[int] = None,
                       reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                       cap: int = DEFAULT_MAX_SEQ_LEN_CAP) -> ContextChoice:
    """The context of a one-node plan, by the plan's rule (plan/seq_len.py): the longest
    default length this node's memory holds, at most `cap`. fixed_bytes: weights + buffers
    this node holds whatever the context.

    Raises UsageError for a request outside [1, model_seq_len], MemoryPlanError when
    the request (or even the shortest default) does not fit.
    """
    budget = available_bytes - fixed_bytes - reserve_bytes
    fits = max(0, budget // kv_bytes_per_position) if kv_bytes_per_position else model_seq_len
    mem_note = (f"{format_bytes(available_bytes)} available, {format_bytes(fixed_bytes)} for "
                f"weights and buffers, {format_bytes(reserve_bytes)} reserve, "
                f"{format_bytes(kv_bytes_per_position)} of KV cache per position")
    if requested is not None:
        if requested < 1:
            raise UsageError(f"max-seq-len {requested}: expected at least 1")
        if requested > model_seq_len:
            raise UsageError(f"max-seq-len {requested} is longer than the model's context "
                             f"{model_seq_len}: use at most {model_seq_len}")
        if requested > fits:
            raise MemoryPlanError(
                f"max-seq-len {requested} needs {format_bytes(requested * kv_bytes_per_position)} "
                f"of KV cache, but only {format_bytes(max(budget, 0))} is left on this node "
                f"({mem_note}): use --max-seq-len {fits} or less" if fits >= 1 else
                f"max-seq-len {requested} does not fit: the weights alone leave no room ({mem_note})")
        return ContextChoice(requested, seq_len_reason(requested, model_seq_len, LIMIT_ASKED),
                             requested * kv_bytes_per_position, model_seq_len, fits)
    if fits < 1:
        raise MemoryPlanError(f"this node cannot hold the model: {mem_note}; it needs "
                              f"{format_bytes(fixed_bytes + reserve_bytes - available_bytes)} more, "
                              "or a smaller quantization, or more nodes")
    seq_len, ok = longest_fitting(default_lengths(model_seq_len, cap), lambda s: s <= fits)
    if not ok:
        raise MemoryPlanError(f"this node's memory holds a context of {fits} tokens, less than "
                              f"the shortest default {seq_len} ({mem_note}): use --max-seq-len "
                              f"{fits} or less, or more nodes")
    # how far --max-seq-len could go, in the plan's lengths (what a plan can say, too)
    longest = longest_fitting(default_lengths(model_seq_len), lambda s: s <= fits)[0]
    reason = seq_len_reason(seq_len, model_seq_len,
                            limit_of(seq_len, model_seq_len, longest, cap),
                            why_memory=f"what memory allows ({mem_note})", longest=longest,
                            memory_limits_longest=fits < model_seq_len)
    return ContextChoice(seq_len, reason, seq_len * kv_bytes_per_position, model_seq_len, fits)
