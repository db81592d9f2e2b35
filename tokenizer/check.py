"""A tokenizer that does not fit the model is an error, never garbage text.

Checks, each raising TokenizerError with the numbers:
- size: the tokenizer's token count against the model's vocab_size (token_embd rows).
  Equal is right. Padding is allowed one way only: the model may have up to
  MAX_PADDED_ROWS more rows than the tokenizer has tokens (checkpoints pad the embedding
  to a multiple of 64 or 128); those extra ids are never produced by encode, and the
  sampler must never pick them (logits at ids >= tokenizer.vocab_size are masked;
  decode raises for them). A tokenizer with more tokens than the model has rows, or
  with many fewer, belongs to another model.
- special ids: bos, eos, unk, pad, eot ids inside [0, tokenizer tokens).
- round trip: decode(encode(probe)) == probe for probe texts (ASCII, and accented,
  CJK and emoji text when the tokenizer can spell every byte).
- same vocabulary: a tokenizer file given next to a model that carries its own
  tokenizer must have the same tokens, id by id.
"""
from __future__ import annotations

import logging
from typing import List, Optional

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer.base import Tokenizer
from dllama_node.tokenizer.dllama_t import dllama_t_tokens
from dllama_node.tokenizer.spm import SPACE
from dllama_node.tokenizer.vocab import BYTE, Vocab, byte_piece_value

log = logging.getLogger(__name__)

MAX_PADDED_ROWS = 256

PROBE_ASCII = ("The quick brown fox jumps over the lazy dog. 0123456789 (a+b)*c == 42;\n"
               "  two spaces,\ttab, trailing space ")
PROBE_UNICODE = "Grüße, café! 日本語のテキスト 🙂👍🏽 — «ok» ∑x² ♫"


def check_vocab_size(n_tokens: int, vocab_size: int) -> None:
    """The tokenizer's n_tokens against the model's vocab_size rows (see module doc)."""
    if n_tokens == vocab_size:
        return
    if n_tokens > vocab_size:
        raise TokenizerError(
            f"the tokenizer has {n_tokens} tokens but the model has {vocab_size} rows in "
            f"token_embd: ids {vocab_size}..{n_tokens - 1} have no embedding. The tokenizer "
            "belongs to another model")
    padded = vocab_size - n_tokens
    if padded > MAX_PADDED_ROWS:
        raise TokenizerError(
            f"the tokenizer has {n_tokens} tokens but the model has {vocab_size} rows in "
            f"token_embd ({padded} more; at most {MAX_PADDED_ROWS} padded rows are allowed). "
            "The tokenizer belongs to another model")
    log.info("the model has %d padded vocabulary rows beyond the tokenizer's %d tokens; "
             "they are never produced", padded, n_tokens)


def check_special_ids(vocab: Vocab) -> None:
    """Every special id the vocabulary names lies in [0, n_tokens)."""
    n = vocab.n_tokens
    for name, token_id in vocab.special_ids().items():
        if token_id is not None and not 0 <= token_id < n:
            raise TokenizerError(f"tokenizer {name} id {token_id} is outside its "
                                 f"{n} tokens [0, {n})")
    for token_id in vocab.extra_eos_ids:
        if not 0 <= token_id < n:
            raise TokenizerError(f"tokenizer eos id {token_id} is outside its {n} tokens [0, {n})")


def spells_every_byte(tok: Tokenizer) -> bool:
    """Byte-level BPE always can; SentencePiece when all 256 byte pieces exist."""
    if tok.kind == "bpe":
        return True
    v = tok.vocab
    found = {byte_piece_value(t) for t, ty in zip(v.tokens, v.types) if ty == BYTE}
    return len(found - {None}) == 256


def probes_for(tok: Tokenizer) -> List[str]:
    if spells_every_byte(tok):
        return [PROBE_ASCII, PROBE_UNICODE]
    return []


def check_round_trip(tok: Tokenizer, probes: Optional[List[str]] = None) -> None:
    """decode(encode(p)) == p for each probe (encode without BOS, specials not parsed).

    A SentencePiece vocabulary without byte fallback cannot spell arbitrary text, so by
    default it gets no probe (it is logged). One without a "▁" piece spells each space as
    the bytes of "▁", which sentencepiece decodes to "▁": spaces are restored before the
    comparison (a synthetic test vocabulary has no "▁" piece).
    """
    if probes is None:
        probes = probes_for(tok)
        if not probes:
            log.warning("the %s tokenizer has no byte fallback: text it has no pieces for "
                        "becomes <unk>; round-trip check skipped", tok.kind)
    spaces_as_bytes = tok.kind == "spm" and SPACE not in tok.vocab.tokens
    if spaces_as_bytes:
        log.warning("the SentencePiece vocabulary has no %r piece: spaces are spelled as its "
                    "bytes and decode back to %r, as in sentencepiece itself", SPACE, SPACE)
    for probe in probes:
        ids = tok.encode(probe, add_bos=False, parse_special=False)
        back = tok.decode(ids)
        if spaces_as_bytes:
            back = back.replace(SPACE, " ")
            if tok.vocab.add_space_prefix and back.startswith(" ") and not probe.startswith(" "):
                back = back[1:]
        if back != probe:
            at = next((i for i, (a, b) in enumerate(zip(back, probe)) if a != b),
                      min(len(back), len(probe)))
            raise TokenizerError(
                f"the {tok.kind} tokenizer does not round-trip text: decode(encode(probe)) "
                f"differs from the probe at character {at} ({probe[at:at + 12]!r} became "
                f"{back[at:at + 12]!r}; {len(ids)} tokens)")


def check_same_vocab(tok: Tokenizer, model_vocab: Vocab, source: str) -> None:
    """The tokenizer from `source` has the model's own tokens, id by id."""
    n_model = model_vocab.n_tokens
    if tok.vocab_size != n_model:
        raise TokenizerError(f"tokenizer {source} has {tok.vocab_size} tokens but the model's "
                             f"own tokenizer has {n_model}: they are not the same tokenizer")
    theirs = dllama_t_tokens(model_vocab)
    ours = dllama_t_tokens(tok.vocab)
    bad = [i for i in range(n_model) if theirs[i] != ours[i]]
    if bad:
        i = bad[0]
        raise TokenizerError(
            f"tokenizer {source} differs from the model's own tokenizer in {len(bad)} of "
            f"{n_model} tokens (first: id {i} is {ours[i]!r} there, {theirs[i]!r} in the model)")


def check_tokenizer(tok: Tokenizer, vocab_size: int) -> None:
    """All checks that need only the tokenizer and the model's vocab_size."""
    check_special_ids(tok.vocab)
    check_vocab_size(tok.vocab_size, int(vocab_size))
    check_round_trip(tok)
