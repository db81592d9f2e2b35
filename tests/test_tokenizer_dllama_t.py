"""distributed-llama .t tokenizer files: our writer, our reader, the same tokenizers."""
from __future__ import annotations

import struct

import pytest

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer import load_tokenizer, read_dllama_t, write_dllama_t
from dllama_node.tokenizer.chat import LLAMA2, LLAMA3
from dllama_node.tokenizer.dllama_t import MAGIC_OLD, dllama_t_tokens, read_dllama_t_raw
from dllama_node.tokenizer.vocab import vocab_from_metadata
from tests.test_tokenizer_helpers import (TEXTS, bpe_metadata, bpe_oracle, corpus, spm_metadata,
                                          spm_processor)


def _write_from_metadata(path, md, eos_ids, chat_template=None, chat_stop=None):
    vocab = vocab_from_metadata(md)
    if vocab.model == "gpt2":
        scores = [-float(i) for i in range(vocab.n_tokens)]   # what the HF converter writes
    else:
        scores = vocab.scores
    write_dllama_t(str(path), dllama_t_tokens(vocab), scores, vocab.bos_id, eos_ids,
                   chat_template, chat_stop)
    return vocab


def test_spm_t_file_round_trip(tmp_path):
    sp = spm_processor()
    path = tmp_path / "dllama_tokenizer_llama2.t"
    vocab = _write_from_metadata(path, spm_metadata(sp), [sp.eos_id()], LLAMA2)
    meta = read_dllama_t(str(path))
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == vocab.tokens
    assert meta["tokenizer.chat_template"] == LLAMA2
    tok = load_tokenizer({}, vocab.n_tokens, str(path))
    assert tok.kind == "spm" and tok.chat_template.name == "model"
    for text in TEXTS:
        assert tok.encode(text, add_bos=False) == sp.EncodeAsIds(text)
        ids = sp.EncodeAsIds(text)
        assert tok.decode(ids) == sp.DecodeIds(ids)


def test_bpe_t_file_round_trip(tmp_path):
    md = bpe_metadata("llama-bpe")
    oracle = bpe_oracle("llama-bpe")
    eot = oracle.token_to_id("<|eot_id|>")
    eos = oracle.token_to_id("<|end_of_text|>")
    path = tmp_path / "dllama_tokenizer_llama3.t"
    vocab = _write_from_metadata(path, md, [eos, eot], LLAMA3, chat_stop=b"<|eot_id|>")
    meta = read_dllama_t(str(path))
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.tokens"] == vocab.tokens
    tok = load_tokenizer({}, vocab.n_tokens, str(path))
    assert tok.kind == "bpe"
    assert {eos, eot} <= tok.eot_ids and tok.eos_id == eos
    for text in TEXTS + corpus(100, seed=4):
        assert tok.encode(text, add_bos=False) == oracle.encode(text, add_special_tokens=False).ids
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[0] == tok.bos_id


def test_t_file_next_to_the_same_model_metadata_is_accepted(tmp_path):
    sp = spm_processor()
    md = spm_metadata(sp)
    path = tmp_path / "t.t"
    _write_from_metadata(path, md, [2])
    tok = load_tokenizer(md, sp.GetPieceSize(), str(path))
    assert tok.vocab_size == sp.GetPieceSize()


def test_old_magic_file(tmp_path):
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)] \
        + [b" a", b"b", b" ab"]
    path = tmp_path / "old.t"
    with open(path, "wb") as f:
        f.write(struct.pack("<iIIiii", MAGIC_OLD, len(tokens), 6, 1, 2, -1))
        for i, t in enumerate(tokens):
            f.write(struct.pack("<fI", -float(i), len(t)) + t)
    raw = read_dllama_t_raw(str(path))
    assert raw["bos_id"] == 1 and raw["eos_ids"] == [2] and raw["tokens"] == tokens
    tok = load_tokenizer({}, len(tokens), str(path))
    assert tok.kind == "spm" and tok.decode(tok.encode("ab ab")) == "ab ab"


def _header(pairs):
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    return struct.pack("<ii", 0x567124, 8 + len(body)) + body


@pytest.mark.parametrize("content,match", [
    (_header([(0, 0), (1, 1)]), "version 0, expected 1"),
    (_header([(0, 1), (1, 1), (42, 7)]), "header key 42 is unknown"),
    (_header([(0, 1), (1, 2)]) + struct.pack("<fI", 0.0, 3) + b"abc", "truncated"),
    (_header([(0, 1), (1, 1)]) + struct.pack("<fI", 0.0, 1) + b"a" + b"junk", "4 bytes after"),
    (b"\x00\x01\x02\x03rest", "magic 0x3020100"),
    (_header([(0, 1), (1, -5)]), "vocab size -5 is out of range"),
])
def test_malformed_files_are_errors(tmp_path, content, match):
    path = tmp_path / "bad.t"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=match):
        read_dllama_t_raw(str(path))


def test_truncated_real_file_names_the_token(tmp_path):
    sp = spm_processor()
    path = tmp_path / "t.t"
    _write_from_metadata(path, spm_metadata(sp), [2])
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(TokenizerError, match=f"token {sp.GetPieceSize() - 1} of {sp.GetPieceSize()}"):
        load_tokenizer({}, sp.GetPieceSize(), str(path))
