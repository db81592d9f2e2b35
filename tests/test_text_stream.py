"""Stop strings at the edge, over a tokenizer stand-in that maps ids to fixed text."""
import pytest

from dllama_node.engine import text as text_mod


class PieceDecoder:
    def __init__(self, tok):
        self.tok = tok

    def push(self, token):
        return self.tok[token]

    def flush(self):
        return ""


@pytest.fixture
def stream(monkeypatch):
    import dllama_node.tokenizer as tk
    monkeypatch.setattr(tk, "StreamDecoder", PieceDecoder, raising=False)

    def make(pieces, stops):
        return text_mod.TextStream(pieces, stops)
    return make


def test_text_before_a_stop_string_is_emitted_and_the_rest_is_not(stream):
    pieces = {0: "Hello", 1: " wor", 2: "ld\nUs", 3: "er: hi", 4: "more"}
    s = stream(pieces, ["\nUser:"])
    out = "".join(s.push(t) for t in range(5)) + s.flush()
    assert out == "Hello world"
    assert s.stopped


def test_a_possible_stop_prefix_is_held_then_released(stream):
    pieces = {0: "a\nU", 1: "nrelated"}
    s = stream(pieces, ["\nUser:"])
    assert s.push(0) == "a"
    assert s.push(1) == "\nUnrelated"
    assert not s.stopped
