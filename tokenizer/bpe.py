"""Byte-level BPE (tokenizer.ggml.model == "gpt2"), the tokenizer of Llama 3.

Encoding: special tokens are split out first (base.Tokenizer), each remaining fragment
is cut into words by the pre-tokenizer's regex (tokenizer.ggml.pre), each word's UTF-8
bytes are spelled with GPT-2's byte-to-unicode table, and the word is merged pair by
pair, lowest merge rank first (leftmost on ties). With "ignore merges" (Llama 3), a
word that is a token by itself is taken whole. Results are cached per word.
"""
from __future__ import annotations

import heapq
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import regex

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer.base import Tokenizer
from dllama_node.tokenizer.vocab import CONTROL, USER_DEFINED, Vocab

log = logging.getLogger(__name__)

# Llama 3's split pattern (Hugging Face tokenizer.json, Split pre-tokenizer).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's pattern (tokenizers' ByteLevel pre-tokenizer with use_regex).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Qwen 2: Llama 3's pattern with single digits.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (split pattern, ignore_merges, add BOS by default)
PRE_TOKENIZERS: Dict[str, Tuple[str, bool, bool]] = {
    "llama-bpe": (LLAMA3_PATTERN, True, True),
    "llama3": (LLAMA3_PATTERN, True, True),
    "llama-v3": (LLAMA3_PATTERN, True, True),
    "smaug-bpe": (LLAMA3_PATTERN, False, False),
    "default": (GPT2_PATTERN, False, False),
    "gpt2": (GPT2_PATTERN, False, False),
    "qwen2": (QWEN2_PATTERN, False, False),
}

_CACHE_MAX_WORDS = 65536


def bytes_to_unicode() -> List[str]:
    """GPT-2's table: byte value -> the printable character that spells it in tokens.

    Printable Latin-1 bytes spell themselves; the others (controls, space, ...) are
    given the characters from U+0100 on, in byte order.
    """
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# str.translate table from a Latin-1 view of UTF-8 bytes to GPT-2 spelling.
_LATIN1_TO_GPT2 = {b: c for b, c in enumerate(BYTE_TO_CHAR)}


def spell_bytes(data: bytes) -> str:
    """GPT-2 spelling of raw bytes (b" the" -> "Ġthe")."""
    return data.decode("latin-1").translate(_LATIN1_TO_GPT2)


def unspell(token: str) -> bytes:
    """Raw bytes of a GPT-2-spelled token; characters outside the table count as UTF-8."""
    out = bytearray()
    for c in token:
        b = CHAR_TO_BYTE.get(c)
        if b is None:
            out += c.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def merges_from_ranks(token_bytes: Sequence[bytes], skip: Sequence[int] = ()) -> List[str]:
    """Merges ("left right", best first) equivalent to merging by token rank (token id),
    as tiktoken-style vocabularies (a distributed-llama .t file) need.

    Token t of rank r yields a merge (left, right) for every split of t into two tokens;
    merges are ordered by r, then by the ranks of left and right.
    """
    skipped = set(skip)
    rank = {}
    for i, tb in enumerate(token_bytes):
        if i not in skipped and tb:
            rank.setdefault(tb, i)
    merges: List[Tuple[int, int, int, bytes, bytes]] = []
    for tb, r in rank.items():
        for k in range(1, len(tb)):
            left, right = tb[:k], tb[k:]
            rl, rr = rank.get(left), rank.get(right)
            if rl is not None and rr is not None:
                merges.append((r, rl, rr, left, right))
    merges.sort()
    return [spell_bytes(left) + " " + spell_bytes(right) for _r, _rl, _rr, left, right in merges]


class BpeTokenizer(Tokenizer):
    """Byte-level BPE from tokens, merges and the pre-tokenizer's name."""

    kind = "bpe"
    utf8_errors = "replace"

    def __init__(self, vocab: Vocab):
        pre = vocab.pre
        if pre is None:
            log.warning("tokenizer.ggml.pre is missing: using GPT-2's pre-tokenizer "
                        "(\"default\"); a Llama 3 model needs \"llama-bpe\"")
            pre = "default"
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"tokenizer.ggml.pre {pre!r} is not supported: expected one of "
                                 + ", ".join(sorted(PRE_TOKENIZERS)))
        pattern, self._ignore_merges, default_add_bos = PRE_TOKENIZERS[pre]
        self.pre = pre
        self._split = regex.compile(pattern)
        self._ids: Dict[str, int] = {}
        for i, tok in enumerate(vocab.tokens):
            self._ids.setdefault(tok, i)
        merges = vocab.merges
        if not merges:
            log.warning("tokenizer.ggml.merges is missing: deriving merges from token order")
            merges = merges_from_ranks([unspell(t) for t in vocab.tokens],
                                       skip=[i for i, t in enumerate(vocab.types)
                                             if t in (CONTROL, USER_DEFINED)])
        self._ranks: Dict[Tuple[str, str], int] = {}
        for r, m in enumerate(merges):
            left, sep, right = m.partition(" ")
            if not sep or not left or not right:
                raise TokenizerError(f"tokenizer.ggml.merges[{r}] {m!r}: expected \"left right\"")
            self._ranks.setdefault((left, right), r)
        self._raw_text = [t in (CONTROL, USER_DEFINED) for t in vocab.types]
        self._cache: Dict[str, Tuple[int, ...]] = {}
        super().__init__(vocab, default_add_bos=default_add_bos)

    # ---- encode ------------------------------------------------------------------
    def _encode_fragment(self, text: str) -> List[int]:
        ids: List[int] = []
        cache = self._cache
        for word in self._split.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
                if len(cache) >= _CACHE_MAX_WORDS:
                    cache.clear()
                cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def _encode_word(self, word: str) -> Tuple[int, ...]:
        spelled = spell_bytes(word.encode("utf-8"))
        if self._ignore_merges:
            whole = self._ids.get(spelled)
            if whole is not None:
                return (whole,)
        out = []
        for symbol in self._merge(spelled):
            token_id = self._ids.get(symbol)
            if token_id is None:
                raise TokenizerError(f"word {word!r}: piece {symbol!r} is not in the vocabulary "
                                     "(merges and tokens disagree, or a byte is missing)")
            out.append(token_id)
        return tuple(out)

    def _merge(self, spelled: str) -> List[str]:
        """Apply merges to one word: lowest rank first, leftmost first on ties.

        A linked list over the symbols and a heap of candidate pairs keep long words
        (a line of 10,000 "=") at O(n log n).
        """
        symbols: List[Optional[str]] = list(spelled)
        n = len(symbols)
        if n < 2:
            return symbols  # type: ignore[return-value]
        ranks = self._ranks
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        nxt[-1] = -1
        heap = []
        for i in range(n - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))   # type: ignore[arg-type]
            if r is not None:
                heap.append((r, i, symbols[i], symbols[i + 1]))
        heapq.heapify(heap)
        while heap:
            r, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] != left or j == -1 or symbols[j] != right:
                continue        # stale: one side was merged away since this was pushed
            merged = left + right
            symbols[i] = merged
            symbols[j] = None
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prv[nxt[j]] = i
            p = prv[i]
            if p != -1:
                rp = ranks.get((symbols[p], merged))      # type: ignore[arg-type]
                if rp is not None:
                    heapq.heappush(heap, (rp, p, symbols[p], merged))
            q = nxt[i]
            if q != -1:
                rq = ranks.get((merged, symbols[q]))      # type: ignore[arg-type]
                if rq is not None:
                    heapq.heappush(heap, (rq, i, merged, symbols[q]))
        return [s for s in symbols if s is not None]

    # ---- decode ------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        token_id = self.check_id(token_id)
        token = self.vocab.tokens[token_id]
        if self._raw_text[token_id]:
            return token.encode("utf-8")
        return unspell(token)

    def _surface_of(self, token_id: int) -> bytes:
        if self._types[token_id] == CONTROL:
            return b""
        return self.token_bytes(token_id)
