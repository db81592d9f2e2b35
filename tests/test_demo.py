"""The demo model the project trained itself (demo/stories.gguf, from demo/train.py on
text from demo/grammar.py): it loads, its tokenizer round-trips, its greedy answer to a
chat turn is a story in the grammar's words, and a 3-node cluster says the same."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sys

import pytest

from dllama_node.cluster.local import LocalCluster
from dllama_node.cluster.run_options import RunOptions
from dllama_node.engine.node import LocalNode
from dllama_node.engine.sampler import Sampler, SamplerSettings
from dllama_node.model import open_model, quants
from dllama_node.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "demo", "stories.gguf")
PROMPT = "Tell me a story about a dragon."
GREEDY = Sampler(SamplerSettings(temperature=0))
MAX_TOKENS = 230        # the context is 256; a story is about 130 tokens


def _load_grammar():
    """demo/ holds scripts, not a package: load grammar.py by path."""
    name = "dllama_demo_grammar"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "demo", "grammar.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


grammar = _load_grammar()


@pytest.fixture(scope="module")
def node():
    with LocalNode.open(MODEL, threads=1) as n:
        yield n


@pytest.fixture(scope="module")
def answer(node):
    """(prompt ids, greedy answer ids, whether it stopped at end of turn)."""
    tok = node.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": PROMPT}])
    out = list(node.session.generate(ids, MAX_TOKENS, GREEDY, tok.eot_ids,
                                     vocab_limit=tok.vocab_size))
    return ids, out, node.session.timings.generated_tokens > len(out)


def test_committed_model_has_the_documented_shape():
    assert os.path.getsize(MODEL) < 8 * 2 ** 20
    with open_model(MODEL) as m:
        c = m.config
        assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == \
            (256, 704, 4, 8, 4, 32)
        assert c.seq_len == 256 and not c.tied_embeddings
        matrices = {n: t.ggml_type for n, t in m.tensors.items() if len(t.shape) == 2}
        assert set(matrices.values()) == {quants.GGML_Q8_0}, matrices
        assert "dllama-node demo" in str(m.metadata["general.name"])


def test_tokenizer_round_trips_grammar_text_in_whole_words():
    with open_model(MODEL) as m:
        tok = load_tokenizer(m.metadata, m.config.vocab_size)
    assert tok.kind == "spm" and tok.chat_template.name == "model"
    rng = random.Random(123)
    n_words = n_tokens = 0
    for _ in range(40):
        turn = grammar.make_chat_turn(rng)
        for text in (turn.user, turn.assistant):
            ids = tok.encode(text, add_bos=False)
            assert tok.decode(ids) == text
            n_words += len(text.split())
            n_tokens += len(ids)
    # a tokenizer learned on this text: about one token per word (bytes would be ~6)
    assert n_tokens < 1.5 * n_words, (n_tokens, n_words)
    # text outside the grammar still round-trips, through byte fallback
    odd = "Zebra über 42 – ok?"
    assert tok.decode(tok.encode(odd, add_bos=False)) == odd
    prompt = tok.chat_template.render([{"role": "user", "content": PROMPT}])
    assert prompt == f"<s>[INST] {PROMPT} [/INST]"


def test_greedy_chat_answer_is_a_story_in_the_grammars_words(node, answer):
    _, out, stopped = answer
    text = node.tokenizer.decode(out).strip()
    assert stopped, f"no end of turn within {MAX_TOKENS} tokens: {text!r}"
    words = grammar.words_of(text)
    assert len(words) >= 30, text
    unknown = sorted(set(words) - grammar.vocabulary())
    assert not unknown, f"words outside the grammar {unknown} in {text!r}"
    # sentences: a capital letter, words and commas, a period; the last is "The end."
    sentences = re.findall(r"[^.]*\.", text)
    assert "".join(sentences).strip() == text, text
    for s in sentences:
        assert re.fullmatch(r" ?[A-Z][a-z]*(,? [a-zA-Z]+)*\.", s), f"not a sentence: {s!r}"
    assert text.endswith("The end.")
    assert "dragon" in words, text


def test_three_nodes_give_the_same_greedy_tokens(answer):
    ids, out, _ = answer
    with LocalCluster(RunOptions(MODEL, nodes=3, wire="f32", max_seq_len=256, batch=16)) as root:
        root.start()
        assert [r.role for r in root.reports].count("worker") == 2
        got = list(root.generate(ids, len(out), GREEDY, root.tokenizer.eot_ids,
                                 vocab_limit=root.tokenizer.vocab_size))
    assert got == out


def test_grammar_vocabulary_covers_what_it_writes():
    rng = random.Random(5)
    vocab = grammar.vocabulary()
    for _ in range(300):
        turn = grammar.make_chat_turn(rng)
        assert set(grammar.words_of(turn.user + " " + turn.assistant)) <= vocab
        assert turn.assistant.endswith(".")
    assert grammar.punctuation() <= set(",.?!")
    # a story asked about a kind, a name or a plot has them
    story = grammar.make_story(random.Random(1), kind="owl", name="Ivy", plot="storm")
    assert "Ivy" in story.text and " owl " in story.text and "storm" in story.text
    assert "She " in story.text


def test_the_demo_command_answers_in_the_grammar_on_three_nodes(answer):
    """What demo/run_demo.sh runs (q8_0 on the wire, the default): a story in the
    grammar's words. Tokens may differ from one node's, as the wire rounds activations."""
    from click.testing import CliRunner

    from dllama_node.ctl.cli import cli

    result = CliRunner().invoke(cli, ["generate", "--model", MODEL, "--nodes", "3",
                                      "--chat-format", "--prompt", PROMPT, "--temperature", "0",
                                      "--max-tokens", str(MAX_TOKENS), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["nodes"] == 3 and data["prompt_tokens"] == answer[0]
    text = data["text"].strip()
    assert text.endswith("The end."), text
    assert set(grammar.words_of(text)) <= grammar.vocabulary(), text
