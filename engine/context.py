"""How long a context this node can hold: the max-seq-len default and its check.

The default fits the memory this node has, never the model card's 131072 blindly, and
says why it is what it is. Pure: the memory reading is an argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dllama_node.common.errors import MemoryPlanError, UsageError
from dllama_node.common.units import format_bytes

# Without --max-seq-len, contexts longer than this are not reserved even when memory
# allows: attention over a long context is slow on a small board, and the cache is
# better left as free memory. --max-seq-len raises it up to the model's context.
DEFAULT_MAX_SEQ_LEN_CAP = 4096
DEFAULT_RESERVE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ContextChoice:
    seq_len: int
    reason: str
    kv_bytes: int


def choose_max_seq_len(model_seq_len: int, kv_bytes_per_position: int, fixed_bytes: int,
                       available_bytes: int, requested: Optional[int] = None,
                       reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                       cap: int = DEFAULT_MAX_SEQ_LEN_CAP) -> ContextChoice:
    """fixed_bytes: weights + buffers this node holds whatever the context.

    Raises UsageError for a request outside [1, model_seq_len], MemoryPlanError when
    the request (or even a context of 1) does not fit.
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
        return ContextChoice(requested, f"max_seq_len {requested} (as asked)",
                             requested * kv_bytes_per_position)
    if fits < 1:
        raise MemoryPlanError(f"this node cannot hold the model: {mem_note}; it needs "
                              f"{format_bytes(fixed_bytes + reserve_bytes - available_bytes)} more, "
                              "or a smaller quantization, or more nodes")
    seq_len = min(model_seq_len, fits, cap)
    if seq_len == model_seq_len:
        why = f"the model's context; memory would allow {fits}"
    elif seq_len == cap:
        why = (f"the default cap {cap} (model's context {model_seq_len}, memory would allow "
               f"{fits}); raise it with --max-seq-len")
    else:
        why = f"what memory allows ({mem_note}); the model's context is {model_seq_len}"
    return ContextChoice(seq_len, f"max_seq_len {seq_len}: {why}", seq_len * kv_bytes_per_position)
