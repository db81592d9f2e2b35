"""tokenizer/conversation_fit.py: which turns a chat keeps, and the answer's budget."""
from __future__ import annotations

import os

import pytest

from dllama_node.common.errors import ContextFullError, UsageError
from dllama_node.tokenizer.conversation_fit import (LIMIT_CONTEXT, LIMIT_MAX_TOKENS, AnswerBudget,
                                                    answer_reserve, dropped_note, fit_chat,
                                                    fit_conversation, split_turns, stopped_note)

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo",
                    "stories.gguf")


def count(messages):
    """A template where each message costs 2 tokens plus one per word, plus 1 for the
    generation prompt."""
    return 1 + sum(2 + len(m["content"].split()) for m in messages)


def msg(role, words):
    return {"role": role, "content": " ".join(["w"] * words)}


def conversation(system_words, turns, last_words):
    """system (if any), then (user, assistant) pairs of `turns` word counts, then the
    last user message."""
    out = [msg("system", system_words)] if system_words else []
    for u, a in turns:
        out += [msg("user", u), msg("assistant", a)]
    return out + [msg("user", last_words)]


def test_everything_fits_nothing_is_dropped():
    m = conversation(3, [(2, 8)], 4)               # 1 + 5 + 4 + 10 + 6 = 26 tokens
    fit = fit_conversation(m, count, context=100, answer_tokens=10)
    assert fit.messages == m and fit.dropped_turns == 0 and fit.prompt_tokens == 26


def test_system_kept_oldest_whole_turns_dropped():
    m = conversation(3, [(2, 8), (2, 8), (2, 8)], 4)  # 1 + 5 + 3 * 14 + 6 = 54 tokens
    fit = fit_conversation(m, count, context=50, answer_tokens=10)
    # 54 - 14 = 40 leaves 10: one turn is enough; two would leave more than needed
    assert fit.dropped_turns == 1 and fit.prompt_tokens == 40
    assert fit.messages == m[:1] + m[3:]
    assert fit.messages[0]["role"] == "system"
    roles = [x["role"] for x in fit.messages[1:]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]   # pairs stay whole
    fit = fit_conversation(m, count, context=30, answer_tokens=10)
    assert fit.dropped_turns == 3 and fit.messages == [m[0], m[-1]] and fit.prompt_tokens == 12


def test_exact_boundary_prompt_plus_answer_equal_to_the_context_fits():
    m = conversation(0, [(2, 8)], 4)                # 1 + 14 + 6 = 21 tokens
    assert fit_conversation(m, count, context=31, answer_tokens=10).dropped_turns == 0
    one_less = fit_conversation(m, count, context=30, answer_tokens=10)
    assert one_less.dropped_turns == 1 and one_less.prompt_tokens == 7


def test_last_turn_kept_with_less_room_than_asked_and_error_when_none_is_left():
    m = conversation(3, [(2, 8)], 20)               # system + last: 1 + 5 + 22 = 28 tokens
    fit = fit_conversation(m, count, context=29, answer_tokens=10)
    assert fit.dropped_turns == 1 and fit.prompt_tokens == 28     # 1 token left for the answer
    with pytest.raises(ContextFullError) as e:
        fit_conversation(m, count, context=28, answer_tokens=10)
    assert str(e.value) == ("the system prompt and the last message are 28 tokens, the context "
                            "holds 28 (prompt and answer together): shorten them")
    assert isinstance(e.value, UsageError)
    with pytest.raises(ContextFullError, match="the last message is 23 tokens, the context "
                                               "holds 20"):
        fit_conversation([msg("user", 20)], count, context=20, answer_tokens=1)


def test_truncate_false_keeps_every_turn_or_refuses():
    m = conversation(3, [(2, 8), (2, 8)], 4)        # 40 tokens
    fit = fit_conversation(m, count, context=41, answer_tokens=10, truncate=False)
    assert fit.dropped_turns == 0 and fit.messages == m
    with pytest.raises(ContextFullError, match="the prompt has 40 tokens, the context holds 40"):
        fit_conversation(m, count, context=40, answer_tokens=10, truncate=False)


def test_bisection_finds_the_fewest_drops_for_every_cut():
    m = conversation(2, [(i % 5 + 1, i % 7 + 1) for i in range(40)], 3)
    for context in range(20, count(m) + 12, 7):
        fit = fit_conversation(m, count, context, answer_tokens=5)
        assert fit.prompt_tokens + 5 <= context or fit.dropped_turns == 40
        if fit.dropped_turns:                      # one turn fewer would not have fitted
            system, turns = split_turns(m)
            more = system + [x for t in turns[fit.dropped_turns - 1:] for x in t]
            assert count(more) + 5 > context


def test_an_assistant_greeting_is_a_turn_of_its_own():
    m = [msg("system", 1), msg("assistant", 6), msg("user", 2), msg("assistant", 2),
         msg("user", 1)]
    system, turns = split_turns(m)
    assert system == m[:1] and [len(t) for t in turns] == [1, 2, 1]
    fit = fit_conversation(m, count, context=count(m) + 2, answer_tokens=10)
    assert fit.dropped_turns == 1 and fit.messages == m[:1] + m[2:]


def test_answer_reserve_is_max_tokens_at_most_a_quarter_of_the_context():
    assert answer_reserve(256, 512) == 64
    assert answer_reserve(256, 16) == 16
    assert answer_reserve(256, None) == 64
    assert answer_reserve(2, 0) == 1


def test_answer_budget_and_which_limit_stopped_it():
    b = AnswerBudget(asked=512, context=256, prompt_tokens=200)
    assert b.tokens == 56 and b.limit(55) is None and b.finish_reason(55) == "stop"
    assert b.limit(56) == LIMIT_CONTEXT and b.finish_reason(56) == "length"
    b = AnswerBudget(asked=20, context=256, prompt_tokens=200)
    assert b.tokens == 20 and b.limit(20) == LIMIT_MAX_TOKENS
    assert AnswerBudget(asked=None, context=256, prompt_tokens=250).limit(6) == LIMIT_CONTEXT
    assert AnswerBudget(asked=56, context=256, prompt_tokens=200).limit(56) == LIMIT_MAX_TOKENS


def test_notes():
    assert stopped_note(LIMIT_CONTEXT, 256, 512) == "[stopped: the context of 256 tokens is full]"
    assert stopped_note(LIMIT_MAX_TOKENS, 256, 512) == "[stopped at max tokens (512)]"
    assert stopped_note(None) == "[stopped at max tokens]"        # an older daemon's answer
    assert dropped_note(2, 256).startswith("(the conversation is longer than the context of 256 "
                                           "tokens: the oldest 2 turns are left out")
    assert "the oldest turn is left out" in dropped_note(1, 256)


def test_fit_chat_with_the_demo_models_template():
    from dllama_node.model import open_model
    from dllama_node.tokenizer import load_tokenizer

    with open_model(DEMO) as model:
        tok = load_tokenizer(model.metadata, model.config.vocab_size)
    story = "Once upon a time there was a dragon who lived in a cave. " * 6
    m = [{"role": "system", "content": "You tell stories."}]
    for _ in range(4):
        m += [{"role": "user", "content": "Tell me a story."},
              {"role": "assistant", "content": story}]
    m.append({"role": "user", "content": "Another one."})
    ids, fit = fit_chat(tok, m, 256, 64)
    assert 0 < fit.dropped_turns < 4 and fit.messages[0] == m[0]
    assert ids == tok.encode_chat(fit.messages) and len(ids) == fit.prompt_tokens
    assert fit.prompt_tokens + 64 <= 256 < len(tok.encode_chat(m))
