"""distributed-llama tokenizer files (.t), read into the same metadata keys as GGUF.

Layout (little-endian; what distributed-llama's converter/tokenizer-writer.py writes and
src/tokenizer.cpp reads):

    int32 magic 0x567124
    int32 header_size                bytes from the magic to the end of the pairs
    (int32 key, int32 value) * n     n = (header_size - 8) / 8
    chat template bytes              if key 7 (its length) is present
    chat stop bytes                  if key 8 (its length) is present (ignored)
    int32 eos id * count             if key 9 (the count) is present
    per token: float32 score, uint32 length, the token's bytes

Keys: 0 version (must be 1), 1 vocab size, 2 max token length, 3 bos id, 4 eos id,
5 pad id, 6 chat eos id, 7 chat template length, 8 chat stop length, 9 eos id count.
The older magic 0x567123 is followed by uint32 vocab size, uint32 max token length,
int32 bos, eos and pad ids.

Tokens are raw bytes: SentencePiece pieces with "▁" written as a space ("<0x0A>" byte
pieces kept as text), byte-level BPE tokens with GPT-2's spelling undone. Which of the
two a file holds is not recorded: a file with the 256 "<0xNN>" pieces, or with "<s>" as
BOS, is SentencePiece; otherwise byte-level BPE, whose ids from bos_id on are special
tokens (distributed-llama's own rule) and whose merges follow from token order.
"""
from __future__ import annotations

import logging
import struct
from typing import Dict, List, Optional, Sequence

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer.bpe import merges_from_ranks, spell_bytes, unspell
from dllama_node.tokenizer.vocab import (BYTE, CONTROL, KEY_EXTRA_EOS, NORMAL, UNKNOWN,
                                         USER_DEFINED, Vocab, byte_piece_value)

log = logging.getLogger(__name__)

MAGIC = 0x567124
MAGIC_OLD = 0x567123
KEY_VERSION, KEY_VOCAB_SIZE, KEY_MAX_TOKEN_LENGTH, KEY_BOS_ID, KEY_EOS_ID = 0, 1, 2, 3, 4
KEY_PAD_ID, KEY_CHAT_EOS_ID, KEY_CHAT_TEMPLATE, KEY_CHAT_STOP, KEY_N_EOS_TOKENS = 5, 6, 7, 8, 9
_MAX_TOKENS = 1 << 24          # a sanity bound before allocating per-token lists


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise TokenizerError(f"{self.path}: truncated at byte {self.pos} reading {what} "
                                 f"({size} bytes wanted, {len(self.data) - self.pos} left)")
        out = self.data[self.pos:self.pos + size]
        self.pos += size
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def is_dllama_t(path: str) -> bool:
    """Whether the file begins with a distributed-llama tokenizer magic."""
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and struct.unpack("<i", head)[0] in (MAGIC, MAGIC_OLD)


def read_dllama_t_raw(path: str) -> Dict[str, object]:
    """The file's fields as they are: tokens (bytes), scores, bos_id, eos_ids,
    chat_template (str or None)."""
    with open(path, "rb") as f:
        r = _Reader(f.read(), path)
    (magic,) = r.unpack("i", "magic")
    eos_ids: List[int] = []
    chat_template: Optional[str] = None
    if magic == MAGIC_OLD:
        vocab_size, _max_len, bos_id, eos_id, _pad = r.unpack("IIiii", "header")
        eos_ids.append(eos_id)
    elif magic == MAGIC:
        (header_size,) = r.unpack("i", "header size")
        if header_size < 8 or (header_size - 8) % 8:
            raise TokenizerError(f"{path}: header size {header_size} is not 8 + 8 * pairs")
        pairs = r.unpack(f"{(header_size - 8) // 4}i", "header pairs")
        values: Dict[int, int] = {}
        for key, value in zip(pairs[0::2], pairs[1::2]):
            if key not in range(10):
                raise TokenizerError(f"{path}: header key {key} is unknown (expected 0..9)")
            if key in (KEY_EOS_ID, KEY_CHAT_EOS_ID) and value >= 0 and value not in eos_ids:
                eos_ids.append(value)
            values[key] = value
        if values.get(KEY_VERSION) != 1:
            raise TokenizerError(f"{path}: tokenizer version {values.get(KEY_VERSION)}, "
                                 "expected 1: regenerate the file with a newer converter")
        if KEY_VOCAB_SIZE not in values:
            raise TokenizerError(f"{path}: header has no vocab size (key 1)")
        vocab_size = values[KEY_VOCAB_SIZE]
        bos_id = values.get(KEY_BOS_ID, -1)
        if values.get(KEY_CHAT_TEMPLATE, 0) > 0:
            raw = r.take(values[KEY_CHAT_TEMPLATE], "chat template")
            chat_template = raw.decode("utf-8", errors="replace")
        if values.get(KEY_CHAT_STOP, 0) > 0:
            r.take(values[KEY_CHAT_STOP], "chat stop")
        n_eos = values.get(KEY_N_EOS_TOKENS, 0)
        for i in range(n_eos):
            (eos_id,) = r.unpack("i", f"eos id {i} of {n_eos}")
            if eos_id not in eos_ids:
                eos_ids.append(eos_id)
    else:
        raise TokenizerError(f"{path}: magic 0x{magic & 0xFFFFFFFF:x} is not a distributed-llama "
                             f"tokenizer (expected 0x{MAGIC:x} or 0x{MAGIC_OLD:x})")
    if not 0 < vocab_size <= _MAX_TOKENS:
        raise TokenizerError(f"{path}: vocab size {vocab_size} is out of range (1..{_MAX_TOKENS})")
    tokens: List[bytes] = []
    scores: List[float] = []
    for i in range(vocab_size):
        score, length = r.unpack("fI", f"token {i} of {vocab_size}")
        tokens.append(r.take(length, f"token {i} of {vocab_size}"))
        scores.append(score)
    if r.pos != len(r.data):
        raise TokenizerError(f"{path}: {len(r.data) - r.pos} bytes after the last of "
                             f"{vocab_size} tokens")
    return {"tokens": tokens, "scores": scores, "bos_id": bos_id, "eos_ids": eos_ids,
            "chat_template": chat_template}


def read_dllama_t(path: str, model: Optional[str] = None,
                  pre: str = "llama-bpe") -> Dict[str, object]:
    """A .t file as tokenizer.ggml.* metadata (plus tokenizer.chat_template and
    tokenizer.dllama.eos_token_ids for the extra end ids), so that load_tokenizer builds
    it like a GGUF tokenizer. model: "llama" or "gpt2" to override the guess; pre: the
    BPE pre-tokenizer to record for a byte-level file."""
    raw = read_dllama_t_raw(path)
    tokens: List[bytes] = raw["tokens"]               # type: ignore[assignment]
    bos_id: int = raw["bos_id"]                        # type: ignore[assignment]
    eos_ids: List[int] = raw["eos_ids"]                # type: ignore[assignment]
    n = len(tokens)
    if model is None:
        n_byte_pieces = sum(1 for t in tokens if len(t) == 6 and t.startswith(b"<0x")
                            and byte_piece_value(t.decode("ascii", "replace")) is not None)
        is_spm = n_byte_pieces == 256 or (0 <= bos_id < n and tokens[bos_id] == b"<s>")
        model = "llama" if is_spm else "gpt2"
    specials = {i for i in [bos_id] + eos_ids if 0 <= i < n}
    meta: Dict[str, object] = {"tokenizer.ggml.model": model,
                               "tokenizer.ggml.scores": list(raw["scores"]),  # type: ignore
                               "tokenizer.ggml.add_bos_token": bos_id >= 0}
    if model == "llama":
        pieces, types = [], []
        for i, t in enumerate(tokens):
            try:
                piece = t.decode("utf-8").replace(" ", "\u2581")
            except UnicodeDecodeError:
                raise TokenizerError(f"{path}: token {i} {t[:40]!r} is not UTF-8, which a "
                                     "SentencePiece piece always is") from None
            pieces.append(piece)
            if i in specials:
                types.append(CONTROL)
            elif i == 0 and piece == "<unk>":
                types.append(UNKNOWN)
            elif byte_piece_value(piece) is not None:
                types.append(BYTE)
            else:
                types.append(NORMAL)
        if pieces[0] == "<unk>":
            meta["tokenizer.ggml.unknown_token_id"] = 0
    elif model == "gpt2":
        first_special = bos_id if 0 <= bos_id < n else n
        types = [CONTROL if i >= first_special or i in specials else NORMAL for i in range(n)]
        pieces = [t.decode("utf-8", errors="replace") if types[i] == CONTROL else spell_bytes(t)
                  for i, t in enumerate(tokens)]
        meta["tokenizer.ggml.pre"] = pre
        meta["tokenizer.ggml.merges"] = merges_from_ranks(
            tokens, skip=[i for i, ty in enumerate(types) if ty == CONTROL])
    else:
        raise TokenizerError(f"{path}: model {model!r} is not one of 'llama', 'gpt2'")
    meta["tokenizer.ggml.tokens"] = pieces
    meta["tokenizer.ggml.token_type"] = types
    if 0 <= bos_id < n:
        meta["tokenizer.ggml.bos_token_id"] = bos_id
    if eos_ids:
        meta["tokenizer.ggml.eos_token_id"] = eos_ids[0]
        meta[KEY_EXTRA_EOS] = eos_ids[1:]
    if raw["chat_template"]:
        meta["tokenizer.chat_template"] = raw["chat_template"]
    log.info("%s: %d tokens, %s, bos %d, eos %s", path, n, model, bos_id, eos_ids)
    return meta


def dllama_t_tokens(vocab: Vocab) -> List[bytes]:
    """The tokens of a vocabulary as a .t file stores them (see the module docstring)."""
    if vocab.model == "llama":
        return [t.replace("\u2581", " ").encode("utf-8") for t in vocab.tokens]
    return [t.encode("utf-8") if ty in (CONTROL, USER_DEFINED) else unspell(t)
            for t, ty in zip(vocab.tokens, vocab.types)]


def write_dllama_t(path: str, tokens: Sequence[bytes], scores: Sequence[float], bos_id: int,
                   eos_ids: Sequence[int], chat_template: Optional[str] = None,
                   chat_stop: Optional[bytes] = None) -> None:
    """Write a version-1 .t file (magic 0x567124) as distributed-llama's converter does:
    the first eos id under key 4, all of them in the eos list (key 9)."""
    if len(tokens) != len(scores):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
    if any(len(t) == 0 for t in tokens):
        raise ValueError("a .t file cannot hold an empty token")
    template = chat_template.encode("utf-8") if chat_template else b""
    pairs = [(KEY_VERSION, 1), (KEY_VOCAB_SIZE, len(tokens)),
             (KEY_MAX_TOKEN_LENGTH, max(len(t) for t in tokens)), (KEY_BOS_ID, bos_id)]
    if eos_ids:
        pairs.append((KEY_EOS_ID, eos_ids[0]))
    if template:
        pairs.append((KEY_CHAT_TEMPLATE, len(template)))
    if chat_stop:
        pairs.append((KEY_CHAT_STOP, len(chat_stop)))
    pairs.append((KEY_N_EOS_TOKENS, len(eos_ids)))
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    with open(path, "wb") as f:
        f.write(struct.pack("<ii", MAGIC, 8 + len(body)))
        f.write(body)
        f.write(template)
        f.write(chat_stop or b"")
        for eos_id in eos_ids:
            f.write(struct.pack("<i", eos_id))
        for score, token in zip(scores, tokens):
            f.write(struct.pack("<fI", score, len(token)))
            f.write(token)
