"""From a prompt's ids to an answer's text: the one generation loop of the HTTP API, the
daemon's generate op and dllama-ctl (generate and chat, on this machine).

Each of them only carries the events somewhere (server-sent events, control-socket
lines, a terminal); what ends an answer and what it is called is decided here once:

    budget = AnswerBudget(max_tokens, seq_len, len(prompt_ids))      # conversation_fit
    for event in generate_text(sampled(runner, sampler), tok, prompt_ids, budget, stop):
        if isinstance(event, Piece):  show(event.text)               # "" while held back
        else:                         outcome = event                # always the last one

An answer ends, and its Outcome's finish_reason says why:
    "stop"       an end-of-turn id (stop_ids; never part of the text) or a stop string
                 (the text ends before it);
    "cancelled"  `cancel` was set: checked after each token, before the next forward step;
    "length"     it reached its budget; `limit` says which one: "context" (what the
                 context left after the prompt) or "max_tokens" (what was asked for).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Set, Union

from dllama_node.engine.text import TextStream
from dllama_node.tokenizer.conversation_fit import AnswerBudget

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"

# (prompt ids, max tokens, stop ids) -> the generated ids; it may end early only at a stop id
TokenSource = Callable[[Sequence[int], int, Set[int]], Iterator[int]]


def stop_ids(tokenizer) -> Set[int]:
    """The ids that end an answer: the model's end of sequence and its end-of-turn tokens
    (<|eot_id|>, <|im_end|>, ... from the tokenizer's metadata)."""
    ids = {int(i) for i in (getattr(tokenizer, "eot_ids", ()) or ())}
    if getattr(tokenizer, "eos_id", None) is not None:
        ids.add(int(tokenizer.eos_id))
    return ids


def sampled(runner, sampler) -> TokenSource:
    """The TokenSource of anything with generate(prompt, max_tokens, sampler, stop_ids,
    vocab_limit=) and a tokenizer (engine Session's runners, the cluster root): ids are
    sampled only below the tokenizer's vocabulary (a model may pad its embedding rows)."""
    tok = runner.tokenizer
    vocab_limit = tok.vocab_size if tok is not None else None

    def tokens(prompt_ids: Sequence[int], max_tokens: int, stops: Set[int]) -> Iterator[int]:
        return runner.generate(list(prompt_ids), max_tokens, sampler, stops,
                               vocab_limit=vocab_limit)
    return tokens


@dataclass(frozen=True)
class Piece:
    """The text one generated token completed ("" while a UTF-8 character or a possible
    stop string is incomplete); token None: the rest, flushed at the end."""

    text: str
    token: Optional[int]


@dataclass(frozen=True)
class Outcome:
    """How an answer ended: its text, its ids and why it ended (module docstring)."""

    text: str
    tokens: List[int]
    finish_reason: str
    limit: Optional[str]             # with "length": "context" or "max_tokens"
    budget: AnswerBudget

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def cancelled(self) -> bool:
        return self.finish_reason == FINISH_CANCELLED

    def finish(self) -> dict:
        """The fields a generation's final line carries about how the answer ended."""
        return {"finish_reason": self.finish_reason, "limit": self.limit,
                "max_tokens": self.budget.asked, "max_seq_len": self.budget.context}


Event = Union[Piece, Outcome]


def finish_reason(stopped_by_string: bool, cancelled: bool, budget: AnswerBudget,
                  produced: int) -> tuple:
    """(finish_reason, limit) of an answer of `produced` tokens: a stop string first, then
    a cancel, then the budget (an answer that ended short of it met an end-of-turn id)."""
    if stopped_by_string:
        return FINISH_STOP, None
    if cancelled:
        return FINISH_CANCELLED, None
    limit = budget.limit(produced)
    return (FINISH_STOP if limit is None else FINISH_LENGTH), limit


def generate_text(tokens: TokenSource, tokenizer, prompt_ids: Sequence[int],
                  budget: AnswerBudget, stop: Sequence[str] = (),
                  cancel: Optional[threading.Event] = None) -> Iterator[Event]:
    """One Piece per generated token, the flushed rest, then the Outcome (module
    docstring). Closing the iterator early stops the generation before its next forward
    step, as `cancel` does, but yields no Outcome."""
    stream = TextStream(tokenizer, stop)
    out: List[int] = []
    gen = tokens(list(prompt_ids), budget.tokens, stop_ids(tokenizer))
    try:
        for token in gen:
            out.append(int(token))
            yield Piece(stream.push(token), int(token))
            if stream.stopped or (cancel is not None and cancel.is_set()):
                break
    finally:
        gen.close()
    tail = stream.flush()
    if tail:
        yield Piece(tail, None)
    reason, limit = finish_reason(stream.stopped, cancel is not None and cancel.is_set(),
                                  budget, len(out))
    yield Outcome(stream.text, out, reason, limit, budget)


def outcome_of(events: Iterator[Event], on_piece: Callable[[Piece], None]) -> Outcome:
    """Run generate_text's events to the end: each Piece to on_piece, the Outcome back."""
    for event in events:
        if isinstance(event, Outcome):
            return event
        on_piece(event)
    raise RuntimeError("the generation ended without its outcome")
