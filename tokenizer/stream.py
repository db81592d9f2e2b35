"""UTF-8-safe streaming detokenization, one generated id at a time.

A token can end in the middle of a character (byte tokens <0xE6> <0x97> <0xA5> spell
"日"), and SentencePiece drops the dummy space of the first piece only. StreamDecoder
threads the same state through the tokens as Tokenizer.decode and feeds the bytes to an
incremental UTF-8 decoder, so what push() returns never splits a character, and

    "".join(d.push(i) for i in ids) + d.flush() == tok.decode(ids)

holds for every id sequence.
"""
from __future__ import annotations

import codecs

from dllama_node.tokenizer.base import Tokenizer


class StreamDecoder:
    """Feed ids with push(id), get the text completed so far; flush() at the end."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=tok.utf8_errors)
        self._at_start = True
        self.n_tokens = 0

    def push(self, token_id: int) -> str:
        """The text that token_id completes ("" while a character is still partial).
        Raises TokenizerError for an id outside the tokenizer's vocabulary."""
        data, self._at_start = self._tok.piece_surface(token_id, self._at_start)
        self.n_tokens += 1
        return self._utf8.decode(data) if data else ""

    def flush(self) -> str:
        """What is left: a character cut short at the end becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)

    def reset(self) -> None:
        """Start a new text (a new turn): the leading-space rule applies again."""
        self._utf8.reset()
        self._at_start = True
        self.n_tokens = 0
