"""A tokenizer that does not fit the model is a TokenizerError that names the numbers."""
from __future__ import annotations

import logging

import pytest

from dllama_node.common.errors import EXIT_TOKENIZER, TokenizerError
from dllama_node.tokenizer import load_tokenizer, write_dllama_t
from dllama_node.tokenizer.check import MAX_PADDED_ROWS, check_vocab_size
from dllama_node.tokenizer.dllama_t import dllama_t_tokens
from dllama_node.tokenizer.vocab import vocab_from_metadata
from tests.test_tokenizer_helpers import bpe_metadata, spm_metadata, spm_processor, synthetic_metadata


@pytest.fixture(scope="module")
def spm_md():
    return spm_metadata(spm_processor())


def _n(md):
    return len(md["tokenizer.ggml.tokens"])


def test_exact_size_loads(spm_md):
    assert load_tokenizer(spm_md, _n(spm_md)).vocab_size == _n(spm_md)


def test_tokenizer_larger_than_model_is_an_error(spm_md):
    n = _n(spm_md)
    with pytest.raises(TokenizerError, match=f"tokenizer has {n} tokens but the model has "
                                             f"{n - 1} rows") as e:
        load_tokenizer(spm_md, n - 1)
    assert e.value.exit_code == EXIT_TOKENIZER


def test_a_few_padded_rows_are_allowed_and_never_decoded(spm_md):
    n = _n(spm_md)
    tok = load_tokenizer(spm_md, n + 64)
    assert tok.vocab_size == n
    assert max(tok.encode("any text at all 🙂")) < n
    with pytest.raises(TokenizerError, match=rf"token id {n + 3} is outside .*\[0, {n}\)"):
        tok.decode([5, n + 3])


def test_many_missing_rows_mean_another_model(spm_md):
    n = _n(spm_md)
    with pytest.raises(TokenizerError, match=f"{n} tokens but the model has {n + 5000} rows"):
        load_tokenizer(spm_md, n + 5000)


def test_llama2_sized_tokenizer_on_llama3_sized_model():
    with pytest.raises(TokenizerError, match="32000 tokens but the model has 128256 rows"):
        check_vocab_size(32000, 128256)
    check_vocab_size(32000, 32000 + MAX_PADDED_ROWS)


@pytest.mark.parametrize("key,name", [("tokenizer.ggml.bos_token_id", "bos"),
                                      ("tokenizer.ggml.eos_token_id", "eos"),
                                      ("tokenizer.ggml.unknown_token_id", "unk"),
                                      ("tokenizer.ggml.eot_token_id", "eot")])
def test_special_id_out_of_range(spm_md, key, name):
    n = _n(spm_md)
    md = dict(spm_md, **{key: n + 7})
    with pytest.raises(TokenizerError, match=f"{name} id {n + 7} is outside its {n} tokens"):
        load_tokenizer(md, n)


def test_unknown_tokenizer_model_is_an_error(spm_md):
    md = dict(spm_md, **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model 'bert' is not supported"):
        load_tokenizer(md, _n(spm_md))


def test_no_tokenizer_at_all_says_what_to_pass():
    with pytest.raises(TokenizerError, match="no tokenizer .* pass a tokenizer file"):
        load_tokenizer({"general.architecture": "llama"}, 100)


def test_array_lengths_must_agree(spm_md):
    md = dict(spm_md, **{"tokenizer.ggml.scores": spm_md["tokenizer.ggml.scores"][:-1]})
    n = _n(spm_md)
    with pytest.raises(TokenizerError, match=f"scores has {n - 1} entries, .* has {n}"):
        load_tokenizer(md, n)


def test_text_that_does_not_round_trip_is_an_error():
    """Wrong token types in the metadata (a word token marked as control) lose text."""
    md = bpe_metadata("llama-bpe")
    tokens = md["tokenizer.ggml.tokens"]
    victim = tokens.index("Ġthe")
    types = list(md["tokenizer.ggml.token_type"])
    types[victim] = 3
    md = dict(md, **{"tokenizer.ggml.token_type": types})
    with pytest.raises(TokenizerError, match="does not round-trip"):
        load_tokenizer(md, len(tokens))


def test_missing_byte_tokens_in_bpe_are_an_error():
    md = bpe_metadata("default")
    tokens = list(md["tokenizer.ggml.tokens"])
    tokens[tokens.index("Ġ")] = "Ġ_removed"           # no token spells the space byte alone
    md = dict(md, **{"tokenizer.ggml.tokens": tokens})
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(md, len(tokens))


def test_spm_without_byte_fallback_skips_probe(caplog):
    md = synthetic_metadata(200)            # too small for the 256 byte pieces
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(md, 200)
    assert tok.vocab_size == 200
    assert "round-trip check skipped" in caplog.text


def test_tokenizer_file_for_another_model_same_size(tmp_path, spm_md):
    """Same token count, different tokens: caught against the model's own tokens."""
    n = _n(spm_md)
    other = vocab_from_metadata(synthetic_metadata(n))
    path = tmp_path / "other.t"
    write_dllama_t(str(path), dllama_t_tokens(other), other.scores, 1, [2])
    with pytest.raises(TokenizerError, match=rf"differs from the model's own tokenizer in \d+ of {n}"):
        load_tokenizer(spm_md, n, str(path))


def test_tokenizer_file_for_another_model_other_size(tmp_path, spm_md):
    n = _n(spm_md)
    other = vocab_from_metadata(synthetic_metadata(n + 20))
    path = tmp_path / "other.t"
    write_dllama_t(str(path), dllama_t_tokens(other), other.scores, 1, [2])
    with pytest.raises(TokenizerError, match=f"has {n + 20} tokens but the model's own "
                                             f"tokenizer has {n}"):
        load_tokenizer(spm_md, n + 20, str(path))


def test_missing_file_and_garbage_file(tmp_path, spm_md):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(spm_md, _n(spm_md), str(tmp_path / "nope.model"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(TokenizerError, match="neither a SentencePiece tokenizer.model nor"):
        load_tokenizer({}, 10, str(junk))


def test_numpy_arrays_and_bytes_in_metadata_load_the_same():
    import numpy as np

    md = synthetic_metadata(400)
    plain = load_tokenizer(md, 400)
    np_md = {k: (np.array(v) if isinstance(v, list) and k != "tokenizer.ggml.tokens" else v)
             for k, v in md.items()}
    np_md["tokenizer.ggml.tokens"] = [t.encode() for t in md["tokenizer.ggml.tokens"]]
    np_md["tokenizer.ggml.bos_token_id"] = np.uint32(1)
    tok = load_tokenizer(np_md, np.int64(400))
    assert tok.encode("hello there") == plain.encode("hello there")
    bpe = bpe_metadata("llama-bpe")
    bpe_np = {k: (np.array(v) if isinstance(v, list) else v) for k, v in bpe.items()}
    bpe_np["tokenizer.ggml.pre"] = b"llama-bpe"
    n = len(bpe["tokenizer.ggml.tokens"])
    assert load_tokenizer(bpe_np, n).encode("x y") == load_tokenizer(bpe, n).encode("x y")


def test_vocabulary_without_bos_encodes_without_it():
    md = dict(bpe_metadata("llama-bpe"))
    del md["tokenizer.ggml.bos_token_id"]
    del md["tokenizer.ggml.add_bos_token"]
    tok = load_tokenizer(md, len(md["tokenizer.ggml.tokens"]))
    assert tok.bos_id is None and tok.add_bos is False and tok.bos_token == ""
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)
    with pytest.raises(TokenizerError, match="no BOS token"):
        tok.encode("hi", add_bos=True)
