"""Byte-level BPE (Llama 3) rebuilt from metadata, against Hugging Face `tokenizers`."""
from __future__ import annotations

import random
import time

import pytest

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer import load_tokenizer
from dllama_node.tokenizer.bpe import (BYTE_TO_CHAR, CHAR_TO_BYTE, merges_from_ranks,
                                       spell_bytes, unspell)
from tests.test_tokenizer_helpers import TEXTS, bpe_metadata, bpe_oracle, corpus


@pytest.fixture(scope="module", params=["llama-bpe", "default"])
def pair(request):
    md = bpe_metadata(request.param)
    n = len(md["tokenizer.ggml.tokens"])
    return bpe_oracle(request.param), load_tokenizer(md, n)


def test_gpt2_byte_table():
    assert len(set(BYTE_TO_CHAR)) == 256
    assert BYTE_TO_CHAR[ord(" ")] == "Ġ" and BYTE_TO_CHAR[ord("\n")] == "Ċ"
    assert BYTE_TO_CHAR[ord("A")] == "A" and BYTE_TO_CHAR[0xFF] == "ÿ"
    assert all(CHAR_TO_BYTE[c] == b for b, c in enumerate(BYTE_TO_CHAR))
    data = bytes(range(256))
    assert unspell(spell_bytes(data)) == data


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_tokenizers(pair, text):
    oracle, tok = pair
    assert tok.encode(text, add_bos=False) == oracle.encode(text, add_special_tokens=False).ids


def test_encode_corpus_lines_equal_tokenizers(pair):
    oracle, tok = pair
    lines = corpus(200, seed=7)
    for line in lines:
        assert tok.encode(line, add_bos=False) == oracle.encode(line, add_special_tokens=False).ids


def test_specials_matched_whole(pair):
    oracle, tok = pair
    text = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode(text, add_bos=False)
    assert ids == oracle.encode(text, add_special_tokens=False).ids
    assert ids[0] == tok.bos_id
    assert tok.encode("<|eot_id|>", add_bos=False, parse_special=False) != \
        [oracle.token_to_id("<|eot_id|>")]


@pytest.mark.parametrize("text", TEXTS + ["<|eot_id|> after a special"])
def test_decode_equals_tokenizers(pair, text):
    oracle, tok = pair
    ids = oracle.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=True)
    if "<|" not in text:
        assert tok.decode(ids) == text


def test_decode_random_ids_equals_tokenizers(pair):
    """Random ids: invalid UTF-8 becomes U+FFFD exactly where tokenizers puts it."""
    oracle, tok = pair
    rng = random.Random(3)
    n = tok.vocab_size
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randint(0, 10))]
        assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=True), ids


def test_bos_default_and_specials(pair):
    oracle, tok = pair
    assert tok.kind == "bpe"
    assert tok.bos_id == oracle.token_to_id("<|begin_of_text|>")
    assert tok.encode("hi")[0] == tok.bos_id                 # add_bos_token is true
    assert tok.eot_ids >= {oracle.token_to_id("<|eot_id|>"), oracle.token_to_id("<|end_of_text|>")}
    assert tok.token_bytes(oracle.token_to_id("<|eot_id|>")) == b"<|eot_id|>"
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.chat_template.name == "llama3"


def test_merges_from_ranks_reproduce_trained_merges():
    """A vocabulary without merges (a .t file) merges by token rank; for a trained BPE
    whose ids follow merge order, that gives the same ids on ordinary text."""
    md = bpe_metadata("llama-bpe")
    specials = {i for i, t in enumerate(md["tokenizer.ggml.token_type"]) if t == 3}
    derived = merges_from_ranks([unspell(t) for t in md["tokenizer.ggml.tokens"]], skip=specials)
    md2 = dict(md, **{"tokenizer.ggml.merges": derived})
    n = len(md["tokenizer.ggml.tokens"])
    a, b = load_tokenizer(md, n), load_tokenizer(md2, n)
    for line in corpus(100, seed=11) + TEXTS:
        assert b.encode(line) == a.encode(line)


def test_prompt_of_4k_tokens_is_fast():
    md = bpe_metadata("llama-bpe")
    tok = load_tokenizer(md, len(md["tokenizer.ggml.tokens"]))
    rng = random.Random(5)
    words = " ".join(rng.choice(corpus(50, seed=1)) for _ in range(400))
    text = (words + " ")[:20000]
    t0 = time.perf_counter()
    ids = tok.encode(text)
    cold_s = time.perf_counter() - t0
    assert len(ids) > 4000
    assert cold_s < 1.0, f"{len(ids)} tokens took {cold_s:.2f} s"
    line = "=" * 20000                                        # one long word: O(n log n)
    t0 = time.perf_counter()
    tok.encode(line)
    assert time.perf_counter() - t0 < 1.0


def test_unknown_pre_tokenizer_is_an_error():
    md = dict(bpe_metadata("llama-bpe"), **{"tokenizer.ggml.pre": "made-up"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre 'made-up' is not supported"):
        load_tokenizer(md, len(md["tokenizer.ggml.tokens"]))


def test_bad_merge_is_an_error():
    md = bpe_metadata("llama-bpe")
    md = dict(md, **{"tokenizer.ggml.merges": ["nospace"] + md["tokenizer.ggml.merges"]})
    with pytest.raises(TokenizerError, match=r"merges\[0\] 'nospace'"):
        load_tokenizer(md, len(md["tokenizer.ggml.tokens"]))



def _crafted(pre: str):
    """A vocabulary where merge order and whole-word lookup disagree on "abc"."""
    alphabet = [BYTE_TO_CHAR[b] for b in range(256)]
    tokens = alphabet + ["bc", "ab", "abc", "<|eot_id|>"]
    merges = ["b c", "a b", "ab c"]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
          "tokenizer.ggml.bos_token_id": len(tokens) - 1, "tokenizer.ggml.add_bos_token": False}
    return md, tokens, merges


@pytest.mark.parametrize("pre,ignore_merges", [("llama-bpe", True), ("default", False)])
def test_ignore_merges_like_tokenizers(pre, ignore_merges):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from dllama_node.tokenizer.bpe import LLAMA3_PATTERN

    md, tokens, merges = _crafted(pre)
    model = models.BPE({t: i for i, t in enumerate(tokens[:-1])},
                       [tuple(m.split(" ")) for m in merges], ignore_merges=ignore_merges)
    oracle = Tokenizer(model)
    if ignore_merges:
        oracle.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        oracle.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = load_tokenizer(md, len(tokens))
    for text in ("abc", "abcabc", "xabc abc", "bcab"):
        assert tok.encode(text) == oracle.encode(text, add_special_tokens=False).ids, text
    abc = tokens.index("abc")
    assert (tok.encode("abc") == [abc]) is ignore_merges
