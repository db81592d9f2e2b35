"""A tokenizer's vocabulary as plain data, read from GGUF-style metadata.

Every source of a tokenizer (the model file's tokenizer.ggml.* keys, a SentencePiece
tokenizer.model, a distributed-llama .t file) is turned into one `Vocab`, so the
tokenizers are built by one code path. Token ids are positions in `tokens`: the ids
of a vocabulary of n tokens are the half-open range [0, n).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from dllama_node.common.errors import TokenizerError

log = logging.getLogger(__name__)

# Token types: the same numbers in GGUF's tokenizer.ggml.token_type and in
# SentencePiece's ModelProto.SentencePiece.Type.
NORMAL = 1
UNKNOWN = 2
CONTROL = 3          # <s>, </s>, <|eot_id|>: never produced by plain text, dropped by decode
USER_DEFINED = 4     # matched whole in the text, decoded as their text
UNUSED = 5
BYTE = 6             # <0xNN>: one raw byte (SentencePiece byte fallback)
TOKEN_TYPES = (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)

KINDS = ("llama", "gpt2")                     # tokenizer.ggml.model values we build
KIND_NAMES = {"llama": "spm", "gpt2": "bpe"}  # what Tokenizer.kind reports

# Extra end-of-sequence ids a distributed-llama .t file lists (not a GGUF key).
KEY_EXTRA_EOS = "tokenizer.dllama.eos_token_ids"

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_piece_value(piece: str) -> Optional[int]:
    """The byte a SentencePiece byte piece "<0xNN>" stands for, or None."""
    m = _BYTE_PIECE.fullmatch(piece)
    return int(m.group(1), 16) if m else None


@dataclass
class Vocab:
    """What a tokenizer needs, independent of where it came from.

    tokens[i], scores[i], types[i] describe token id i, for i in [0, n_tokens).
    `tokens` are in the model's own spelling: "▁the" and "<0x0A>" for SentencePiece,
    GPT-2's byte-to-unicode spelling ("Ġthe") for byte-level BPE.
    """

    model: str                          # "llama" (SentencePiece) | "gpt2" (byte-level BPE)
    tokens: List[str]
    scores: List[float]
    types: List[int]
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    pad_id: Optional[int] = None
    eot_id: Optional[int] = None
    eom_id: Optional[int] = None
    extra_eos_ids: List[int] = field(default_factory=list)
    add_bos: Optional[bool] = None      # None: the kind's default
    pre: Optional[str] = None           # BPE pre-tokenizer name (tokenizer.ggml.pre)
    merges: List[str] = field(default_factory=list)    # BPE: "left right", best first
    add_space_prefix: bool = True       # SentencePiece: add_dummy_prefix
    remove_extra_whitespaces: bool = False
    chat_template: Optional[str] = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def special_ids(self) -> Dict[str, Optional[int]]:
        return {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id,
                "pad": self.pad_id, "eot": self.eot_id, "eom": self.eom_id}


def _seq(metadata: Mapping, key: str) -> list:
    """An array value as a list ([] when absent); numpy arrays and tuples are accepted."""
    value = metadata.get(key)
    return [] if value is None else list(value)


def _opt_str(metadata: Mapping, key: str) -> Optional[str]:
    value = metadata.get(key)
    return None if value is None else _as_str(value, key, 0)


def _opt_int(metadata: Mapping, key: str) -> Optional[int]:
    value = metadata.get(key)
    if value is None:
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise TokenizerError(f"{key}: expected an integer, found {value!r}") from None
    # GGUF writers use -1 (or 0xFFFFFFFF) for "no such token".
    return None if value < 0 or value == 0xFFFFFFFF else value


def _opt_bool(metadata: Mapping, key: str) -> Optional[bool]:
    value = metadata.get(key)
    return None if value is None else bool(value)


def _as_str(value, key: str, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(f"{key}[{index}]: not valid UTF-8: {bytes(value)[:40]!r}") from None
    raise TokenizerError(f"{key}[{index}]: expected a string, found {type(value).__name__}")


def vocab_from_metadata(metadata: Mapping) -> Vocab:
    """Read the tokenizer.ggml.* and tokenizer.chat_template keys into a Vocab.

    Raises TokenizerError for a missing or unknown tokenizer.ggml.model, missing tokens,
    arrays whose lengths disagree, unknown token types, and duplicate tokens.
    """
    model = metadata.get("tokenizer.ggml.model")
    raw_tokens = _seq(metadata, "tokenizer.ggml.tokens")
    if model is None and not raw_tokens:
        raise TokenizerError("the model file has no tokenizer (no tokenizer.ggml.model and no "
                             "tokenizer.ggml.tokens): pass a tokenizer file (tokenizer.model or .t)")
    if model is None:
        raise TokenizerError("tokenizer.ggml.model is missing: expected one of "
                             + ", ".join(repr(k) for k in KINDS))
    model = _as_str(model, "tokenizer.ggml.model", 0)
    if model not in KINDS:
        raise TokenizerError(f"tokenizer.ggml.model {model!r} is not supported: expected one of "
                             + ", ".join(repr(k) for k in KINDS))
    if not raw_tokens:
        raise TokenizerError(f"tokenizer.ggml.tokens is missing or empty ({model} tokenizer)")
    tokens = [_as_str(t, "tokenizer.ggml.tokens", i) for i, t in enumerate(raw_tokens)]
    n = len(tokens)

    scores = [float(s) for s in _seq(metadata, "tokenizer.ggml.scores")]
    if "tokenizer.ggml.scores" not in metadata:
        scores = [-float(i) for i in range(n)]   # id order is rank order
    if len(scores) != n:
        raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries, "
                             f"tokenizer.ggml.tokens has {n}")

    vocab = Vocab(
        model=model, tokens=tokens, scores=scores, types=[],
        bos_id=_opt_int(metadata, "tokenizer.ggml.bos_token_id"),
        eos_id=_opt_int(metadata, "tokenizer.ggml.eos_token_id"),
        unk_id=_opt_int(metadata, "tokenizer.ggml.unknown_token_id"),
        pad_id=_opt_int(metadata, "tokenizer.ggml.padding_token_id"),
        eot_id=_opt_int(metadata, "tokenizer.ggml.eot_token_id"),
        eom_id=_opt_int(metadata, "tokenizer.ggml.eom_token_id"),
        extra_eos_ids=[int(i) for i in _seq(metadata, KEY_EXTRA_EOS)],
        add_bos=_opt_bool(metadata, "tokenizer.ggml.add_bos_token"),
        pre=_opt_str(metadata, "tokenizer.ggml.pre"),
        merges=[_as_str(m, "tokenizer.ggml.merges", i)
                for i, m in enumerate(_seq(metadata, "tokenizer.ggml.merges"))],
        chat_template=_opt_str(metadata, "tokenizer.chat_template"),
    )
    space = _opt_bool(metadata, "tokenizer.ggml.add_space_prefix")
    vocab.add_space_prefix = True if space is None else space
    vocab.remove_extra_whitespaces = bool(
        _opt_bool(metadata, "tokenizer.ggml.remove_extra_whitespaces") or False)
    if model == "llama" and vocab.unk_id is None and tokens[0] == "<unk>":
        vocab.unk_id = 0

    if "tokenizer.ggml.token_type" in metadata:
        vocab.types = [int(t) for t in _seq(metadata, "tokenizer.ggml.token_type")]
    else:
        vocab.types = infer_types(vocab)
    if len(vocab.types) != n:
        raise TokenizerError(f"tokenizer.ggml.token_type has {len(vocab.types)} entries, "
                             f"tokenizer.ggml.tokens has {n}")
    validate(vocab)
    return vocab


def infer_types(vocab: Vocab) -> List[int]:
    """Token types for a vocabulary that has none: unk, bos/eos, <0xNN> bytes, normal."""
    types = [NORMAL] * vocab.n_tokens
    for i, tok in enumerate(vocab.tokens):
        if vocab.model == "llama" and byte_piece_value(tok) is not None:
            types[i] = BYTE
    for i in (vocab.bos_id, vocab.eos_id, vocab.eot_id, vocab.eom_id, vocab.pad_id):
        if i is not None and 0 <= i < vocab.n_tokens:
            types[i] = CONTROL
    if vocab.unk_id is not None and 0 <= vocab.unk_id < vocab.n_tokens:
        types[vocab.unk_id] = UNKNOWN
    return types


def validate(vocab: Vocab) -> None:
    """Raise TokenizerError for unknown token types, empty tokens and (SentencePiece) duplicates."""
    for i, t in enumerate(vocab.types):
        if t not in TOKEN_TYPES:
            raise TokenizerError(f"token {i} {vocab.tokens[i]!r}: token type {t} is unknown "
                                 f"(expected one of {TOKEN_TYPES})")
    seen: Dict[str, int] = {}
    for i, tok in enumerate(vocab.tokens):
        if tok == "" and vocab.types[i] not in (UNUSED, CONTROL):
            raise TokenizerError(f"token {i} is empty")
        j = seen.setdefault(tok, i)
        if j != i and tok != "":
            if vocab.model == "llama":   # SentencePiece refuses duplicate pieces
                raise TokenizerError(f"token {i} {tok!r} duplicates token {j}")
            log.warning("token %d %r duplicates token %d: text maps to id %d", i, tok, j, j)


def special_token_ids(vocab: Vocab, names: Sequence[str]) -> List[int]:
    """Ids of the tokens spelled as one of `names` (e.g. "<|eot_id|>"), in vocab order."""
    wanted = set(names)
    return [i for i, tok in enumerate(vocab.tokens) if tok in wanted]
