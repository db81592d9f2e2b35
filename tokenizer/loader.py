"""load_tokenizer: the model's metadata (or an explicit file) -> a checked Tokenizer."""
from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer import check
from dllama_node.tokenizer.base import Tokenizer
from dllama_node.tokenizer.bpe import BpeTokenizer
from dllama_node.tokenizer.dllama_t import is_dllama_t, read_dllama_t
from dllama_node.tokenizer.spm import SpmTokenizer, read_spm_model
from dllama_node.tokenizer.vocab import Vocab, vocab_from_metadata

log = logging.getLogger(__name__)


def tokenizer_from_vocab(vocab: Vocab, model_proto: Optional[bytes] = None) -> Tokenizer:
    """Build the tokenizer a vocabulary describes (no checks against a model)."""
    check.check_special_ids(vocab)
    if vocab.model == "llama":
        return SpmTokenizer(vocab, model_proto)
    if vocab.model == "gpt2":
        return BpeTokenizer(vocab)
    raise TokenizerError(f"tokenizer model {vocab.model!r} is not supported")


def _vocab_from_file(path: str):
    """(vocab, serialized SentencePiece model or None) of a tokenizer file."""
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path} does not exist")
    if is_dllama_t(path):
        return vocab_from_metadata(read_dllama_t(path)), None
    try:
        return read_spm_model(path)
    except (TokenizerError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is neither a SentencePiece tokenizer.model nor a "
                             f"distributed-llama .t file ({e})") from None


def load_tokenizer(metadata: Optional[Mapping], vocab_size: int,
                   tokenizer_path: Optional[str] = None) -> Tokenizer:
    """The model's tokenizer, checked against the model.

    metadata: GGUF key -> value (arrays as lists): the tokenizer.ggml.* keys and
    tokenizer.chat_template. vocab_size: the model's token_embd rows. tokenizer_path: a
    SentencePiece tokenizer.model or a distributed-llama .t file; it wins over the
    metadata, and when the metadata has tokens too, both must hold the same tokens.
    A chat template in the file wins over the metadata's.

    Raises TokenizerError when the tokenizer is missing, unsupported, broken, or does
    not fit the model (see check.py).
    """
    metadata = dict(metadata or {})
    if tokenizer_path:
        vocab, proto = _vocab_from_file(tokenizer_path)
        model_template = metadata.get("tokenizer.chat_template")
        if not vocab.chat_template and model_template:
            vocab.chat_template = (model_template.decode("utf-8", "replace")
                                   if isinstance(model_template, bytes) else str(model_template))
        tok = tokenizer_from_vocab(vocab, proto)
        if metadata.get("tokenizer.ggml.tokens") is not None:
            check.check_same_vocab(tok, vocab_from_metadata(metadata), tokenizer_path)
        source = tokenizer_path
    else:
        tok = tokenizer_from_vocab(vocab_from_metadata(metadata))
        source = "the model file"
    check.check_tokenizer(tok, vocab_size)
    log.info("tokenizer from %s: %s, %d tokens, bos %s, eos %s, end of turn %s, chat %s",
             source, tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, sorted(tok.eot_ids),
             tok.chat_template.name)
    return tok
