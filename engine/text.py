"""From generated ids to text at the edge: UTF-8-safe streaming and stop strings."""
from __future__ import annotations

from typing import Sequence, Tuple


class TextStream:
    """Feed ids, get printable text. Text that might be the start of a stop string is
    held back until it is known not to be; when a stop string appears, the text before
    it is the last output and `stopped` turns True."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        from dllama_node.tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer)
        self.stops = [s for s in stop_strings if s]
        self.pending = ""
        self.text = ""        # everything emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decoder.push(token))

    def flush(self) -> str:
        if self.stopped:
            return ""
        out = self._emit(self.decoder.flush())
        rest, self.pending = self.pending, ""
        self.text += rest
        return out + rest

    def _emit(self, piece: str) -> str:
        self.pending += piece
        cut, hold = self._scan(self.pending)
        if cut is not None:
            out = self.pending[:cut]
            self.pending = ""
            self.stopped = True
        else:
            out = self.pending[:len(self.pending) - hold]
            self.pending = self.pending[len(self.pending) - hold:]
        self.text += out
        return out

    def _scan(self, text: str) -> Tuple[object, int]:
        """(index where a stop string starts, or None; length of the tail to hold back)."""
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            return min(cuts), 0
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return None, hold
