"""What of a conversation, and of its answer, fits the context.

A chat sends the whole conversation each turn; the context (max_seq_len) holds the
rendered prompt and the answer together. As Ollama does, the system prompt stays and the
oldest turns -- a user message with the answers that follow it, never half of one -- are
left out until the prompt leaves room for the answer:

    fit = fit_conversation(messages, count_tokens, context=256, answer_tokens=64)
    fit.messages, fit.dropped_turns, fit.prompt_tokens

`count_tokens(messages)` is the length of the rendered, encoded prompt (the chat template
decides what a message costs). Only when even the system prompt and the last turn leave
no token for the answer is it an error (ContextFullError, naming the token counts).

The answer then gets what it asked for, or what the context leaves when that is less;
AnswerBudget says which limit stopped it, for the finish reason and its note:

    budget = AnswerBudget(asked=512, context=256, prompt_tokens=200)   # budget.tokens == 56
    budget.limit(produced=56)      # "context": "[stopped: the context of 256 tokens is full]"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from dllama_node.common.errors import ContextFullError

Message = Dict[str, str]
CountTokens = Callable[[Sequence[Message]], int]

# When turns must be left out, they are left out until this share of the context (or
# max_tokens, when smaller) is free for the answer: 1/4 of the demo's 256 is 64 tokens.
ANSWER_SHARE = 4

LIMIT_CONTEXT = "context"        # the answer filled what the context left
LIMIT_MAX_TOKENS = "max_tokens"  # the answer reached the max_tokens asked for


@dataclass(frozen=True)
class ConversationFit:
    messages: List[Message]      # the system prompt(s) and the turns kept, in order
    dropped_turns: int           # oldest turns left out
    prompt_tokens: int           # count_tokens(messages)


def answer_reserve(context: int, max_tokens: Optional[int]) -> int:
    """The room a fitted conversation leaves for the answer: max_tokens, at most a
    1/ANSWER_SHARE of the context, at least 1 (None: as many as the context leaves)."""
    share = max(1, context // ANSWER_SHARE)
    return share if max_tokens is None else max(1, min(max_tokens, share))


def split_turns(messages: Sequence[Message]) -> Tuple[List[Message], List[List[Message]]]:
    """(the leading system messages, the turns): each turn starts at a user message and
    holds the messages up to the next one. Messages before the first user message (an
    assistant's greeting) are a turn of their own."""
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    turns: List[List[Message]] = []
    for m in messages[head:]:
        if m.get("role") == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return list(messages[:head]), turns


def fit_conversation(messages: Sequence[Message], count_tokens: CountTokens, context: int,
                     answer_tokens: int, truncate: bool = True) -> ConversationFit:
    """The messages to render: the system prompt, then the newest turns whose prompt plus
    `answer_tokens` fit `context` (prompt + answer_tokens <= context). The last turn is
    always kept; when it and the system prompt alone leave less than answer_tokens, the
    answer gets what is left, and when they leave nothing, ContextFullError.

    truncate=False leaves no turn out: ContextFullError when the whole prompt leaves no
    token for the answer. count_tokens is assumed to grow with the turns kept (it does for
    every chat template), so the cut is found by bisection: log2(turns) renderings."""
    if context < 1 or answer_tokens < 0:
        raise ValueError(f"context {context}, answer_tokens {answer_tokens}: expected a context "
                         "of at least 1 and answer_tokens of 0 or more")
    system, turns = split_turns(messages)

    def kept(dropped: int) -> List[Message]:
        return system + [m for turn in turns[dropped:] for m in turn]

    if not truncate:
        n = count_tokens(list(messages))
        if n >= context:
            raise ContextFullError(f"the prompt has {n} tokens, the context holds {context} "
                                   "(prompt and answer together): shorten it, or let the "
                                   "oldest turns be left out")
        return ConversationFit(list(messages), 0, n)
    counts: Dict[int, int] = {}

    def fits(dropped: int) -> bool:
        counts[dropped] = count_tokens(kept(dropped))
        return counts[dropped] + answer_tokens <= context

    dropped = 0
    droppable = len(turns) - 1               # the last turn stays
    if not fits(0) and droppable > 0:
        lo, hi = 1, droppable
        if fits(hi):
            while lo < hi:                   # invariant: hi fits, lo - 1 does not
                mid = (lo + hi) // 2
                if fits(mid):
                    hi = mid
                else:
                    lo = mid + 1
        dropped = hi                         # the fewest drops that fit, or all of them
    n = counts[dropped]
    if n >= context:
        what = "the system prompt and the last message are" if system else "the last message is"
        raise ContextFullError(f"{what} {n} tokens, the context holds {context} (prompt and "
                               "answer together): shorten them")
    return ConversationFit(kept(dropped), dropped, n)


def dropped_note(dropped_turns: int, context: int) -> str:
    """The one line a chat shows the first time turns are left out."""
    turns = "turn is" if dropped_turns == 1 else f"{dropped_turns} turns are"
    return (f"(the conversation is longer than the context of {context} tokens: the oldest "
            f"{turns} left out, and more as it grows; /reset starts over)")


@dataclass(frozen=True)
class AnswerBudget:
    """How many tokens an answer may have: what was asked for, or what the context leaves
    after the prompt when that is less."""

    asked: Optional[int]         # max_tokens; None: as many as the context leaves
    context: int                 # max_seq_len: prompt and answer together
    prompt_tokens: int

    @property
    def left(self) -> int:
        return max(self.context - self.prompt_tokens, 0)

    @property
    def tokens(self) -> int:
        return self.left if self.asked is None else min(self.asked, self.left)

    def limit(self, produced: int) -> Optional[str]:
        """LIMIT_CONTEXT or LIMIT_MAX_TOKENS when an answer of `produced` tokens stopped
        at its budget (finish reason "length"); None when it ended by itself."""
        if produced < self.tokens:
            return None
        if self.asked is not None and self.asked <= self.left:
            return LIMIT_MAX_TOKENS
        return LIMIT_CONTEXT

    def finish_reason(self, produced: int) -> str:
        return "stop" if self.limit(produced) is None else "length"

    def finish(self, produced: int) -> dict:
        """The fields a generation's final line carries about how the answer ended."""
        return {"finish_reason": self.finish_reason(produced), "limit": self.limit(produced),
                "max_tokens": self.asked, "max_seq_len": self.context}


def stopped_note(limit: Optional[str], context: Optional[int] = None,
                 max_tokens: Optional[int] = None) -> str:
    """What a person reads when an answer stopped at its budget."""
    if limit == LIMIT_CONTEXT and context:
        return f"[stopped: the context of {context} tokens is full]"
    return f"[stopped at max tokens ({max_tokens})]" if max_tokens else "[stopped at max tokens]"


def fit_chat(tokenizer, messages: Sequence[Message], context: int, answer_tokens: int,
             truncate: bool = True) -> Tuple[List[int], ConversationFit]:
    """fit_conversation with the tokenizer's chat template: the prompt's ids and the fit.
    Each rendering is encoded once."""
    encoded: Dict[int, List[int]] = {}

    def encode(msgs: Sequence[Message]) -> List[int]:
        key = len(msgs)                       # kept turns are always a suffix of the same list
        if key not in encoded:
            encoded[key] = tokenizer.encode_chat(list(msgs), add_generation_prompt=True)
        return encoded[key]

    fit = fit_conversation(messages, lambda msgs: len(encode(msgs)), context, answer_tokens,
                           truncate)
    return encode(fit.messages), fit
