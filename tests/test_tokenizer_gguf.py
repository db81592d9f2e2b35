"""Tokenizers from metadata as it comes out of a real GGUF file (our reader), including
the project's random-model vocabulary and a Llama 3 style byte-level vocabulary."""
from __future__ import annotations

import numpy as np
import pytest

from dllama_node.tokenizer import StreamDecoder, load_tokenizer
from tests.test_tokenizer_helpers import (TEXTS, bpe_metadata, bpe_oracle, spm_metadata,
                                          spm_processor)


def _round_trip_through_gguf(tmp_path, metadata):
    from dllama_node.model import quants
    from dllama_node.model.generate import write_gguf_model
    from dllama_node.model.gguf import read_gguf

    path = str(tmp_path / "tok.gguf")
    md = {"general.architecture": "llama", **metadata}
    write_gguf_model(path, md, {"x": ((4,), quants.GGML_F32)},
                     lambda name, shape, t: [np.zeros(shape, np.float32)])
    return read_gguf(path).metadata


def test_generator_vocab_through_gguf(tmp_path):
    from dllama_node.model.generate import synthetic_vocab

    vocab_size = 1000
    tokens, scores, types = synthetic_vocab(vocab_size)
    md = _round_trip_through_gguf(tmp_path, {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True})
    tok = load_tokenizer(md, vocab_size)
    assert (tok.kind, tok.vocab_size, tok.bos_id) == ("spm", vocab_size, 1)
    text = "hello world, this is a test 123 🙂"
    assert tok.decode(tok.encode(text)) == text
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, 300).tolist()
    d = StreamDecoder(tok)
    assert "".join(d.push(i) for i in ids) + d.flush() == tok.decode(ids)


def test_trained_spm_through_gguf(tmp_path):
    sp = spm_processor()
    tok = load_tokenizer(_round_trip_through_gguf(tmp_path, spm_metadata(sp)), sp.GetPieceSize())
    for text in TEXTS:
        assert tok.encode(text, add_bos=False) == sp.EncodeAsIds(text)


@pytest.mark.parametrize("pre", ["llama-bpe", "default"])
def test_trained_bpe_through_gguf(tmp_path, pre):
    md = bpe_metadata(pre)
    oracle = bpe_oracle(pre)
    tok = load_tokenizer(_round_trip_through_gguf(tmp_path, md), len(md["tokenizer.ggml.tokens"]))
    for text in TEXTS:
        assert tok.encode(text, add_bos=False) == oracle.encode(text, add_special_tokens=False).ids
