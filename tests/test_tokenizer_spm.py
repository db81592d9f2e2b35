"""SentencePiece tokenizers rebuilt from metadata, against sentencepiece itself."""
from __future__ import annotations

import random
import struct

import pytest

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer import StreamDecoder, load_tokenizer
from dllama_node.tokenizer.spm import build_model_proto, vocab_from_model_proto
from dllama_node.tokenizer.vocab import vocab_from_metadata
from tests.test_tokenizer_helpers import (SPM_USER_DEFINED, TEXTS, spm_metadata,
                                          spm_model_bytes, spm_processor, synthetic_metadata)


@pytest.fixture(scope="module")
def sp():
    return spm_processor()


@pytest.fixture(scope="module")
def tok(sp):
    return load_tokenizer(spm_metadata(sp), sp.GetPieceSize())


def test_truncated_proto_is_an_error():
    with pytest.raises(TokenizerError, match="is not a SentencePiece ModelProto"):
        vocab_from_model_proto(spm_model_bytes()[:-3])


def test_model_proto_file_reads_back_pieces_and_flags(sp):
    vocab = vocab_from_model_proto(spm_model_bytes())
    assert vocab.tokens == [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    assert vocab.scores == pytest.approx([sp.GetScore(i) for i in range(sp.GetPieceSize())])
    assert (vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id) == (0, 1, 2, None)
    assert vocab.add_space_prefix is True and vocab.remove_extra_whitespaces is False
    zero = sp.PieceToId("<0x00>")
    assert vocab.types[zero] == 6 and vocab.types[sp.PieceToId("<tool>")] == 4


def test_rebuilt_proto_loads_in_sentencepiece_with_same_pieces(sp):
    import sentencepiece

    proto = build_model_proto(vocab_from_metadata(spm_metadata(sp)))
    sp2 = sentencepiece.SentencePieceProcessor()
    sp2.LoadFromSerializedProto(proto)
    n = sp.GetPieceSize()
    assert sp2.GetPieceSize() == n
    for i in range(n):
        assert sp2.IdToPiece(i) == sp.IdToPiece(i)
        assert sp2.GetScore(i) == sp.GetScore(i)
        assert (sp2.IsControl(i), sp2.IsByte(i), sp2.IsUnknown(i)) == \
               (sp.IsControl(i), sp.IsByte(i), sp.IsUnknown(i))
    assert (sp2.bos_id(), sp2.eos_id(), sp2.unk_id()) == (sp.bos_id(), sp.eos_id(), sp.unk_id())


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_sentencepiece(sp, tok, text):
    expected = sp.EncodeAsIds(text)
    assert tok.encode(text, add_bos=False) == expected
    assert tok.encode(text) == [sp.bos_id()] + expected          # the model adds BOS
    assert tok.decode(expected) == sp.DecodeIds(expected)
    if "\u2581" not in text:       # a literal "▁" is SentencePiece's space, in and out
        assert tok.decode(expected) == text                      # byte fallback round-trips


def test_emoji_goes_through_byte_fallback(sp, tok):
    ids = tok.encode("🙂", add_bos=False)
    assert any(sp.IsByte(i) for i in ids)
    assert b"".join(tok.token_bytes(i) for i in ids if sp.IsByte(i)) == "🙂".encode()


def test_user_defined_symbol_is_one_token(sp, tok):
    ids = tok.encode("call <tool> now", add_bos=False)
    assert sp.PieceToId("<tool>") in ids
    assert ids == sp.EncodeAsIds("call <tool> now")


def test_decode_random_ids_equals_sentencepiece(sp, tok):
    """Any id sequence, including control tokens, <unk>, lone and cut UTF-8 bytes."""
    rng = random.Random(1)
    n = sp.GetPieceSize()
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randint(0, 12))]
        # Runs of byte pieces that may or may not form characters.
        if rng.random() < 0.5:
            ids += [sp.PieceToId(f"<0x{b:02X}>") for b in "é日🙂".encode()[: rng.randint(1, 9)]]
        assert tok.decode(ids) == sp.DecodeIds(ids), ids


def test_control_tokens_in_text_are_specials_and_split_like_llama(sp, tok):
    ids = tok.encode("<s>[INST] hi [/INST]</s>", add_bos=False)
    assert ids[0] == sp.bos_id() and ids[-1] == sp.eos_id()
    # The fragment after a special gets the dummy space, as llama.cpp and HF's legacy
    # Llama tokenizer do.
    assert ids[1:-1] == sp.EncodeAsIds("[INST] hi [/INST]")
    assert tok.encode("<s>", add_bos=False, parse_special=False) == sp.EncodeAsIds("<s>")


def test_token_bytes(sp, tok):
    assert tok.token_bytes(sp.PieceToId("<0x0A>")) == b"\n"
    i = next(i for i in range(sp.GetPieceSize()) if sp.IdToPiece(i).startswith("\u2581")
             and len(sp.IdToPiece(i)) > 1)
    assert tok.token_bytes(i) == sp.IdToPiece(i).replace("\u2581", " ").encode()
    assert tok.token_bytes(sp.bos_id()) == b"<s>"
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")


def test_tokenizer_model_file_loads_directly(tmp_path, sp, tok):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(spm_model_bytes())
    from_file = load_tokenizer({}, sp.GetPieceSize(), str(path))
    assert from_file.kind == "spm" and from_file.vocab_size == sp.GetPieceSize()
    for text in TEXTS:
        assert from_file.encode(text) == tok.encode(text)
    # Next to a model that carries the same tokens, the file is accepted.
    load_tokenizer(spm_metadata(sp), sp.GetPieceSize(), str(path))


def test_synthetic_generator_vocab_loads():
    for vocab_size in (300, 512, 900):
        tok = load_tokenizer(synthetic_metadata(vocab_size), vocab_size)
        assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("spm", vocab_size, 1, 2)
        ids = tok.encode("hello world")
        assert ids[0] == 1 and all(0 <= i < vocab_size for i in ids)
        d = StreamDecoder(tok)
        rng = random.Random(vocab_size)
        gen = [rng.randrange(vocab_size) for _ in range(200)]
        assert "".join(d.push(i) for i in gen) + d.flush() == tok.decode(gen)


def test_missing_types_are_inferred():
    md = synthetic_metadata(400)
    del md["tokenizer.ggml.token_type"]
    tok = load_tokenizer(md, 400)
    assert tok.token_type(0) == 2 and tok.token_type(1) == 3 and tok.token_type(3) == 6
    assert tok.decode([1, 2]) == ""


def test_duplicate_piece_is_an_error():
    md = synthetic_metadata(400)
    md["tokenizer.ggml.tokens"] = list(md["tokenizer.ggml.tokens"])
    md["tokenizer.ggml.tokens"][300] = md["tokenizer.ggml.tokens"][301]
    with pytest.raises(TokenizerError, match="token 301 .* duplicates token 300"):
        load_tokenizer(md, 400)


def test_float_scores_survive_the_wire(sp):
    proto = build_model_proto(vocab_from_metadata(spm_metadata(sp)))
    v = vocab_from_model_proto(proto)
    assert v.scores == [struct.unpack("<f", struct.pack("<f", s))[0]
                        for s in spm_metadata(sp)["tokenizer.ggml.scores"]]
    assert SPM_USER_DEFINED[0] in v.tokens
