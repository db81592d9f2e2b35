"""engine/generate_text.py: the one generation loop, over scripted ids and the demo model's
own tokenizer (SentencePiece with byte pieces), so every rule is seen without a forward pass."""
from __future__ import annotations

import os
import threading

import pytest

from dllama_node.engine.generate_text import (Outcome, Piece, generate_text, outcome_of,
                                              stop_ids)
from dllama_node.tokenizer.conversation_fit import AnswerBudget

DEMO = os.path.join(os.path.dirname(__file__), "..", "demo", "stories.gguf")


@pytest.fixture(scope="module")
def tok():
    from dllama_node.model import open_model
    from dllama_node.tokenizer import load_tokenizer
    with open_model(DEMO) as m:
        return load_tokenizer(m.metadata, m.config.vocab_size)


class Script:
    """A token source that plays `ids` as Session.generate would: at most max_tokens, and
    ending (without yielding it) at a stop id. Records what it was asked and how far it got."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.asked = None
        self.yielded = 0
        self.closed = False

    def __call__(self, prompt_ids, max_tokens, stops):
        self.asked = (list(prompt_ids), max_tokens, set(stops))
        return self._run(max_tokens, stops)

    def _run(self, max_tokens, stops):
        try:
            for token in self.ids[:max_tokens]:
                if token in stops:
                    return
                self.yielded += 1
                yield token
        finally:
            self.closed = True


def run(tok, ids, budget, stop=()):
    source = Script(ids)
    pieces = []
    outcome = outcome_of(generate_text(source, tok, [1], budget, stop), pieces.append)
    return outcome, pieces, source


def words(tok, text):
    return tok.encode(text)[1:]            # without BOS


def test_stop_ids_are_the_end_of_sequence_and_end_of_turn_ids(tok):
    assert stop_ids(tok) == {2}

    class Llama3Like:
        eos_id = 128001
        eot_ids = {128009, 128008}
    assert stop_ids(Llama3Like()) == {128001, 128008, 128009}

    class NoEos:
        eos_id = None
        eot_ids = ()
    assert stop_ids(NoEos()) == set()


def test_an_end_of_turn_id_stops_with_finish_reason_stop(tok):
    ids = words(tok, "Once upon a time") + [2] + words(tok, " more")
    outcome, pieces, source = run(tok, ids, AnswerBudget(64, 256, 1))
    assert source.asked == ([1], 64, {2})
    assert outcome.text == "Once upon a time" == "".join(p.text for p in pieces)
    assert (outcome.finish_reason, outcome.limit) == ("stop", None)
    assert outcome.tokens == words(tok, "Once upon a time") and source.closed


def test_max_tokens_gives_length_and_its_limit(tok):
    ids = words(tok, "Once upon a time there was a dragon")
    outcome, _, source = run(tok, ids, AnswerBudget(3, 256, 1))
    assert source.asked[1] == 3 and outcome.completion_tokens == 3
    assert (outcome.finish_reason, outcome.limit) == ("length", "max_tokens")
    assert outcome.finish() == {"finish_reason": "length", "limit": "max_tokens",
                                "max_tokens": 3, "max_seq_len": 256}


def test_the_context_limit_gives_length_and_says_context(tok):
    ids = words(tok, "Once upon a time there was a dragon")
    budget = AnswerBudget(64, 4, 1)                      # 3 tokens left after the prompt
    outcome, _, source = run(tok, ids, budget)
    assert source.asked[1] == 3 and outcome.completion_tokens == 3
    assert (outcome.finish_reason, outcome.limit) == ("length", "context")


def test_a_stop_string_split_across_pieces_ends_the_text_before_it(tok):
    ids = words(tok, "Once upon a time. The end. More")
    outcome, pieces, source = run(tok, ids, AnswerBudget(64, 256, 1), stop=["The end"])
    assert outcome.text == "Once upon a time. "
    assert "".join(p.text for p in pieces) == outcome.text
    assert (outcome.finish_reason, outcome.limit) == ("stop", None)
    # it stopped at the token that completed the stop string, not at the end of the script
    assert source.yielded < len(ids) and source.closed
    # "The" was held back until it was known to start the stop string
    assert not any("The" in p.text for p in pieces)


def test_cancel_between_tokens_stops_before_the_next_one(tok):
    cancel = threading.Event()
    source = Script(words(tok, "Once upon a time there was a dragon"))
    pieces = []

    def client(piece):                       # the client leaves while its 2nd piece is sent
        pieces.append(piece)
        if len(pieces) == 2:
            cancel.set()
    outcome = outcome_of(generate_text(source, tok, [1], AnswerBudget(64, 256, 1), (), cancel),
                         client)
    assert outcome.completion_tokens == 2 and source.yielded == 2 and source.closed
    assert outcome.finish_reason == "cancelled" and outcome.cancelled and outcome.limit is None
    assert outcome.text == "Once upon"


def test_a_multibyte_character_split_across_tokens_comes_out_whole(tok):
    ids = words(tok, "a é b")
    assert [tok.vocab.tokens[i] for i in ids][2:4] == ["<0xC3>", "<0xA9>"]
    outcome, pieces, _ = run(tok, ids, AnswerBudget(64, 256, 1))
    assert [p.text for p in pieces] == ["a", " ", "", "é", " b"]   # <0xC3> alone is held
    assert "".join(p.text for p in pieces) == outcome.text == "a é b"
    assert [p.token for p in pieces] == ids                  # one piece per token, none flushed


def test_a_cut_character_at_the_end_is_flushed_as_the_last_piece(tok):
    ids = words(tok, "a é")[:-1]                           # ends after <0xC3>
    outcome, pieces, _ = run(tok, ids, AnswerBudget(64, 256, 1))
    assert pieces[-1].token is None and pieces[-1].text == "\ufffd"
    assert outcome.text == "a \ufffd"


def test_the_outcome_is_the_last_event_and_closing_early_stops_the_source(tok):
    source = Script(words(tok, "Once upon a time there was a dragon"))
    events = generate_text(source, tok, [1], AnswerBudget(64, 256, 1))
    first = next(events)
    assert isinstance(first, Piece) and first.text == "Once"
    events.close()
    assert source.closed and source.yielded == 1
    events = list(generate_text(Script([5, 6]), tok, [1], AnswerBudget(64, 256, 1)))
    assert isinstance(events[-1], Outcome) and not any(isinstance(e, Outcome)
                                                       for e in events[:-1])
