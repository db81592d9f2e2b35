"""How long a context to reserve: the one max_seq_len rule, and the sentence that says why.

The KV cache grows with max_seq_len on every node, so the model card's context (131072 for
Llama 3.2) is reserved only when it fits. Every place that picks or suggests a length asks
this module -- the shard plan (plan/shard_plan.py), the default of a single node, which is a
one-node plan (engine/context.py), the plan's advice (plan/advice.py) and the shorter
length suggested after an OOM kill (daemon/oom_diagnosis.py):

    lengths = default_lengths(model_seq_len, cap)      # the lengths a default may take
    seq_len, result = longest_fitting(lengths, attempt, fits)
    shorter_lengths(seq_len)                           # what a suggestion may take
    seq_len_reason(seq_len, model_seq_len, limit, ...) # "max_seq_len 2048: the model's context"

The lengths: the model's own, the multiples of SEQ_STEP below it, and below SEQ_STEP the
SHORTER_SEQ_LENS; a default is never shorter than SEQ_FLOOR (a shorter context must be
asked for). A default is at most `cap` when one is given (a single node's
DEFAULT_MAX_SEQ_LEN_CAP). Pure: whether a length fits is the caller's `attempt`.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

SEQ_STEP = 256                          # a chosen max_seq_len is a multiple of this ...
SHORTER_SEQ_LENS = (128, 64, 32, 16)    # ... or one of these below it
SEQ_FLOOR = 128                         # the shortest default

# Without --max-seq-len, a single node reserves no longer context than this even when
# memory allows: attention over a long context is slow on a small board, and the cache is
# better left as free memory. --max-seq-len raises it up to the model's context.
DEFAULT_MAX_SEQ_LEN_CAP = 4096

LIMIT_ASKED = "asked"        # the user's --max-seq-len
LIMIT_MODEL = "model"        # the model's own context fits
LIMIT_CAP = "cap"            # the default cap, below what memory and the model allow
LIMIT_MEMORY = "memory"      # the longest length that fits the node(s)

R = TypeVar("R")


def seq_len_steps(below: int, floor: int = SHORTER_SEQ_LENS[-1]) -> List[int]:
    """Ascending: the multiples of SEQ_STEP and the SHORTER_SEQ_LENS that are >= floor
    and < below."""
    steps = set(range(SEQ_STEP, below, SEQ_STEP)) | set(SHORTER_SEQ_LENS)
    return sorted(s for s in steps if floor <= s < below)


def default_lengths(model_seq_len: int, cap: Optional[int] = None) -> List[int]:
    """Ascending: the lengths a default max_seq_len may take -- the steps from SEQ_FLOOR
    (or the model's context, when shorter) up to the model's context, at most `cap`."""
    top = model_seq_len if cap is None else min(cap, model_seq_len)
    return sorted(set(seq_len_steps(top, min(SEQ_FLOOR, model_seq_len))) | {top})


def shorter_lengths(seq_len: int) -> List[int]:
    """Ascending: the lengths, shorter than seq_len, that advice may suggest."""
    return seq_len_steps(seq_len)


def longest_fitting(lengths: Sequence[int], attempt: Callable[[int], R],
                    fits: Callable[[R], bool] = bool) -> Tuple[int, R]:
    """The largest of ascending `lengths` whose attempt fits, with that attempt's result;
    else the first length with its (failed) result. Fits are taken to be monotone (what
    fits at n fits at any shorter length): log2(len(lengths)) + 2 attempts at most."""
    top = attempt(lengths[-1])
    if fits(top):
        return lengths[-1], top
    first = attempt(lengths[0]) if len(lengths) > 1 else top
    if not fits(first):
        return lengths[0], first
    best: Tuple[int, R] = (lengths[0], first)
    lo, hi = 0, len(lengths) - 1               # invariant: lengths[lo] fits, lengths[hi] fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result = attempt(lengths[mid])
        if fits(result):
            lo, best = mid, (lengths[mid], result)
        else:
            hi = mid
    return best


def limit_of(seq_len: int, model_seq_len: int, longest: Optional[int] = None,
             cap: Optional[int] = None, asked: bool = False) -> str:
    """Which limit a length stands at. longest: the longest context memory and the model
    allow (None: not known)."""
    if asked:
        return LIMIT_ASKED
    if seq_len >= model_seq_len:
        return LIMIT_MODEL
    if cap is not None and seq_len == min(cap, model_seq_len) and (longest or 0) > seq_len:
        return LIMIT_CAP
    return LIMIT_MEMORY


def seq_len_reason(seq_len: int, model_seq_len: int, limit: str, why_memory: str = "",
                   notes: Sequence[str] = (), longest: Optional[int] = None,
                   memory_limits_longest: bool = False) -> str:
    """Why max_seq_len is `seq_len`, in one line:
    LIMIT_ASKED   "max_seq_len 512 (asked for; model card 2048)"
    LIMIT_MODEL   "max_seq_len 2048: the model's context"
    LIMIT_CAP     "max_seq_len 4096: the default cap 4096 (the model's context is 131072);
                   --max-seq-len raises it up to 15360, what memory allows"  (longest; the
                   last words when memory_limits_longest)
    LIMIT_MEMORY  "max_seq_len 2816 (model card 131072): " + why_memory
    notes, when any, follow in parentheses ("with swap on b2")."""
    note = f" ({'; '.join(notes)})" if notes else ""
    if limit == LIMIT_ASKED:
        return f"max_seq_len {seq_len} (asked for; model card {model_seq_len}){note}"
    if limit == LIMIT_MODEL:
        return f"max_seq_len {seq_len}: the model's context{note}"
    if limit == LIMIT_CAP:
        return (f"max_seq_len {seq_len}: the default cap {seq_len} (the model's context is "
                f"{model_seq_len}); --max-seq-len raises it up to {longest}"
                + (", what memory allows" if memory_limits_longest else "") + note)
    return f"max_seq_len {seq_len} (model card {model_seq_len}): {why_memory}{note}"
