"""StreamDecoder: characters split across tokens come out whole, and the pushes add up
to decode() of the whole sequence."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer import StreamDecoder, load_tokenizer
from dllama_node.tokenizer.bpe import BYTE_TO_CHAR
from tests.test_tokenizer_helpers import TEXTS, bpe_metadata, spm_metadata, spm_processor

_TOKS = {}


def spm_tok():
    if "spm" not in _TOKS:
        sp = spm_processor()
        _TOKS["spm"] = load_tokenizer(spm_metadata(sp), sp.GetPieceSize())
    return _TOKS["spm"]


def bpe_tok():
    if "bpe" not in _TOKS:
        md = bpe_metadata("llama-bpe")
        _TOKS["bpe"] = load_tokenizer(md, len(md["tokenizer.ggml.tokens"]))
    return _TOKS["bpe"]


def byte_ids(tok, data: bytes):
    """Ids of single-byte tokens spelling `data` (byte pieces, or GPT-2 byte tokens)."""
    if tok.kind == "spm":
        return [tok.vocab.tokens.index(f"<0x{b:02X}>") for b in data]
    return [tok.vocab.tokens.index(BYTE_TO_CHAR[b]) for b in data]


def pushes(tok, ids):
    d = StreamDecoder(tok)
    return [d.push(i) for i in ids], d.flush()


@pytest.mark.parametrize("make", [spm_tok, bpe_tok], ids=["spm", "bpe"])
@pytest.mark.parametrize("char", ["é", "日本", "🙂", "👍🏽"])
def test_multibyte_character_emitted_only_when_complete(make, char):
    tok = make()
    ids = byte_ids(tok, ("a" + char + "b").encode())
    out, tail = pushes(tok, ids)
    assert out[0] == "a" and out[-1] == "b" and tail == ""
    middle = out[1:-1]
    assert "".join(middle) == char
    for piece in middle:            # each non-empty piece is whole characters of `char`
        assert piece == "" or piece in char
    first_char_len = len(char[0].encode())
    assert middle[:first_char_len - 1] == [""] * (first_char_len - 1)
    assert middle[first_char_len - 1] == char[0]


@pytest.mark.parametrize("make", [spm_tok, bpe_tok], ids=["spm", "bpe"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode_on_encoded_text(make, text):
    tok = make()
    ids = tok.encode(text)
    out, tail = pushes(tok, ids)
    assert "".join(out) + tail == tok.decode(ids)


def test_spm_leading_space_rule_applies_once():
    tok = spm_tok()
    ids = tok.encode("Hello world", add_bos=True)
    out, _ = pushes(tok, ids)
    assert out[0] == ""                         # BOS
    assert not out[1].startswith(" ")           # dummy prefix dropped
    assert "".join(out) == "Hello world"
    d = StreamDecoder(tok)
    d.push(ids[1])
    d.reset()
    assert d.push(ids[1]) == out[1]             # a new turn drops it again


def test_cut_character_at_end_is_flushed_as_replacement():
    tok = bpe_tok()
    ids = byte_ids(tok, "x日".encode()[:-1])
    out, tail = pushes(tok, ids)
    assert "".join(out) == "x" and tail == "\ufffd"
    assert tok.decode(ids) == "x\ufffd"


def test_id_outside_vocabulary_raises():
    tok = spm_tok()
    with pytest.raises(TokenizerError, match="outside the tokenizer's vocabulary"):
        StreamDecoder(tok).push(tok.vocab_size)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_stream_equals_decode_for_any_ids(data):
    for tok in (spm_tok(), bpe_tok()):
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
        out, tail = pushes(tok, ids)
        assert "".join(out) + tail == tok.decode(ids)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=30))
def test_stream_equals_decode_for_any_bytes(data):
    for tok in (spm_tok(), bpe_tok()):
        ids = byte_ids(tok, data)
        out, tail = pushes(tok, ids)
        assert "".join(out) + tail == tok.decode(ids)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
               max_size=12))
def test_valid_text_spelled_in_bytes_never_shows_a_replacement(text):
    for tok in (spm_tok(), bpe_tok()):
        out, tail = pushes(tok, byte_ids(tok, text.encode()))
        assert all("\ufffd" not in piece for piece in out) and tail == ""
        assert "".join(out) == text
