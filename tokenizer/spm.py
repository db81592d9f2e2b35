"""SentencePiece tokenizers (tokenizer.ggml.model == "llama"), rebuilt from metadata.

A GGUF file carries the pieces, scores and types of a SentencePiece BPE model, not the
model itself. We write the ModelProto back in protobuf's wire format (varints and
length-delimited fields; field numbers from sentencepiece_model.proto) and hand it to
sentencepiece.SentencePieceProcessor, so encoding is SentencePiece's own. protobuf
itself is not needed: the few fields we read or write are coded here.

ModelProto fields used: pieces=1 {piece=1, score=2, type=3}, trainer_spec=2
{model_type=3, vocab_size=4, byte_fallback=35, unk_id=40, bos_id=41, eos_id=42,
pad_id=43, unk_piece=45, bos_piece=46, eos_piece=47, pad_piece=48}, normalizer_spec=3
{name=1, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5}.
"""
from __future__ import annotations

import logging
import struct
from typing import Dict, Iterator, List, Optional, Tuple

import sentencepiece

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer.base import Tokenizer
from dllama_node.tokenizer.vocab import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, Vocab,
                                         byte_piece_value, validate)

log = logging.getLogger(__name__)

SPACE = "\u2581"              # "▁": SentencePiece's escaped space
UNK_SURFACE = " \u2047 "      # what SentencePiece decodes <unk> to
MODEL_TYPE_UNIGRAM = 1
MODEL_TYPE_BPE = 2

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5


# ---- protobuf wire format ----------------------------------------------------------
def _varint(value: int) -> bytes:
    if value < 0:                       # negative int32/int64: 10-byte two's complement
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tag(field_number: int, wire: int) -> bytes:
    return _varint(field_number << 3 | wire)


def _field_int(field_number: int, value: int) -> bytes:
    return _tag(field_number, _WIRE_VARINT) + _varint(int(value))


def _field_bytes(field_number: int, data: bytes) -> bytes:
    return _tag(field_number, _WIRE_BYTES) + _varint(len(data)) + data


def _field_str(field_number: int, text: str) -> bytes:
    return _field_bytes(field_number, text.encode("utf-8"))


def _field_float(field_number: int, value: float) -> bytes:
    return _tag(field_number, _WIRE_FIXED32) + struct.pack("<f", value)


def iter_fields(buf: bytes) -> Iterator[Tuple[int, int, object]]:
    """(field number, wire type, value) of each field of one message, in file order.

    Varints come back as ints, fixed32/fixed64 as their raw bytes, length-delimited
    fields as bytes. Raises TokenizerError on a truncated or malformed message.
    """
    pos, end = 0, len(buf)

    def read_varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= end or shift > 63:
                raise TokenizerError(f"tokenizer model: bad varint at byte {pos} of {end}")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    while pos < end:
        key = read_varint()
        field_number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            value: object = read_varint()
        elif wire == _WIRE_BYTES:
            size = read_varint()
            if pos + size > end:
                raise TokenizerError(f"tokenizer model: field {field_number} needs {size} bytes "
                                     f"at byte {pos}, only {end - pos} remain")
            value = bytes(buf[pos:pos + size])
            pos += size
        elif wire in (_WIRE_FIXED32, _WIRE_FIXED64):
            size = 4 if wire == _WIRE_FIXED32 else 8
            if pos + size > end:
                raise TokenizerError(f"tokenizer model: truncated field {field_number}")
            value = bytes(buf[pos:pos + size])
            pos += size
        else:
            raise TokenizerError(f"tokenizer model: wire type {wire} of field {field_number} "
                                 f"at byte {pos} is not one SentencePiece writes")
        yield field_number, wire, value


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# ---- ModelProto <-> Vocab ----------------------------------------------------------
def build_model_proto(vocab: Vocab) -> bytes:
    """A serialized SentencePiece BPE ModelProto with the vocabulary's pieces.

    Normalization is Llama's: identity, add_dummy_prefix from the vocabulary (default
    true), remove_extra_whitespaces (default false), spaces escaped as "▁". Byte fallback
    is on when all 256 "<0xNN>" byte pieces are present (sentencepiece accepts all or
    none: a partial set is written as unused pieces).
    """
    byte_values = {byte_piece_value(t) for t, ty in zip(vocab.tokens, vocab.types) if ty == BYTE}
    byte_fallback = len(byte_values - {None}) == 256
    if byte_values and not byte_fallback:
        # sentencepiece wants all 256 byte pieces or none: the few there are stay unused
        # (encode never produces them; decode still reads them as bytes).
        log.warning("the SentencePiece vocabulary has %d of the 256 byte pieces: byte "
                    "fallback is off, text without pieces becomes <unk>",
                    len(byte_values - {None}))
    parts = []
    for piece, score, ptype in zip(vocab.tokens, vocab.scores, vocab.types):
        if ptype == BYTE and not byte_fallback:
            ptype = UNUSED
        parts.append(_field_bytes(1, _field_str(1, piece) + _field_float(2, score)
                                  + (_field_int(3, ptype) if ptype != NORMAL else b"")))

    def piece_of(token_id: Optional[int]) -> Optional[str]:
        if token_id is None or not 0 <= token_id < vocab.n_tokens:
            return None
        return vocab.tokens[token_id]

    trainer = [_field_int(3, MODEL_TYPE_BPE), _field_int(4, vocab.n_tokens),
               _field_int(35, int(byte_fallback))]
    for id_field, piece_field, token_id in ((40, 45, vocab.unk_id), (41, 46, vocab.bos_id),
                                            (42, 47, vocab.eos_id), (43, 48, vocab.pad_id)):
        piece = piece_of(token_id)
        trainer.append(_field_int(id_field, token_id if piece is not None else -1))
        if piece is not None:
            trainer.append(_field_str(piece_field, piece))
    normalizer = (_field_str(1, "identity") + _field_int(3, int(vocab.add_space_prefix))
                  + _field_int(4, int(vocab.remove_extra_whitespaces)) + _field_int(5, 1))
    parts.append(_field_bytes(2, b"".join(trainer)))
    parts.append(_field_bytes(3, normalizer))
    return b"".join(parts)


def vocab_from_model_proto(proto: bytes) -> Vocab:
    """Read pieces, special ids and normalizer flags from a serialized ModelProto
    (a tokenizer.model file). Defaults are the .proto file's defaults."""
    tokens: List[str] = []
    scores: List[float] = []
    types: List[int] = []
    trainer: Dict[int, object] = {}
    normalizer: Dict[int, object] = {}
    for number, _wire, value in iter_fields(proto):
        if number == 1:
            piece, score, ptype = "", 0.0, NORMAL
            for n2, _w2, v2 in iter_fields(value):          # type: ignore[arg-type]
                if n2 == 1:
                    piece = v2.decode("utf-8")              # type: ignore[union-attr]
                elif n2 == 2:
                    score = struct.unpack("<f", v2)[0]      # type: ignore[arg-type]
                elif n2 == 3:
                    ptype = int(v2)                         # type: ignore[arg-type]
            tokens.append(piece)
            scores.append(score)
            types.append(ptype)
        elif number == 2:
            trainer = {n2: v2 for n2, _w2, v2 in iter_fields(value)}   # type: ignore[arg-type]
        elif number == 3:
            normalizer = {n2: v2 for n2, _w2, v2 in iter_fields(value)}  # type: ignore[arg-type]
    if not tokens:
        raise TokenizerError("tokenizer model has no pieces: not a SentencePiece model")

    def special(field_number: int, default: int) -> Optional[int]:
        token_id = _int32(int(trainer.get(field_number, default)))  # type: ignore[arg-type]
        return token_id if 0 <= token_id < len(tokens) else None

    vocab = Vocab(model="llama", tokens=tokens, scores=scores, types=types,
                  unk_id=special(40, 0), bos_id=special(41, 1), eos_id=special(42, 2),
                  pad_id=special(43, -1),
                  add_space_prefix=bool(normalizer.get(3, 1)),
                  remove_extra_whitespaces=bool(normalizer.get(4, 1)))
    validate(vocab)
    return vocab


def read_spm_model(path: str) -> Tuple[Vocab, bytes]:
    """(vocabulary, serialized ModelProto) of a SentencePiece tokenizer.model file."""
    with open(path, "rb") as f:
        proto = f.read()
    return vocab_from_model_proto(proto), proto


# ---- the tokenizer -----------------------------------------------------------------
class SpmTokenizer(Tokenizer):
    """SentencePiece: encoding by sentencepiece itself, decoding by the same rules.

    Control tokens ("<s>", "</s>") in the text are split out first, as llama.cpp and
    Hugging Face's Llama tokenizer do; each text fragment is then encoded on its own,
    so a fragment that follows a special token also gets SentencePiece's dummy space.
    """

    kind = "spm"
    utf8_errors = "dllama-replace-each-byte"

    def __init__(self, vocab: Vocab, model_proto: Optional[bytes] = None):
        self._sp = sentencepiece.SentencePieceProcessor()
        proto = build_model_proto(vocab) if model_proto is None else model_proto
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"SentencePiece refused the tokenizer ({vocab.n_tokens} pieces):"
                                 f" {e}") from None
        if self._sp.GetPieceSize() != vocab.n_tokens:
            raise TokenizerError(f"SentencePiece loaded {self._sp.GetPieceSize()} pieces, "
                                 f"expected {vocab.n_tokens}")
        self._pieces = vocab.tokens
        self._dummy_prefix = vocab.add_space_prefix or vocab.remove_extra_whitespaces
        self._remove_extra = vocab.remove_extra_whitespaces
        self._unk_bytes = UNK_SURFACE.encode("utf-8")
        self._byte_of = [byte_piece_value(p) if t == BYTE else None
                         for p, t in zip(vocab.tokens, vocab.types)]
        super().__init__(vocab, default_add_bos=True)

    @property
    def model_proto(self) -> bytes:
        return self._sp.serialized_model_proto()

    def split_types(self) -> Tuple[int, ...]:
        return (CONTROL,)       # user-defined pieces are SentencePiece's own business

    def _encode_fragment(self, text: str) -> List[int]:
        return self._sp.EncodeAsIds(text)

    def token_bytes(self, token_id: int) -> bytes:
        token_id = self.check_id(token_id)
        b = self._byte_of[token_id]
        if b is not None:
            return bytes((b,))
        return self._pieces[token_id].replace(SPACE, " ").encode("utf-8")

    def _surface_of(self, token_id: int) -> bytes:
        t = self._types[token_id]
        if t == CONTROL:
            return b""
        if t == UNKNOWN:
            return self._unk_bytes
        return self.token_bytes(token_id)

    def piece_surface(self, token_id: int, at_start: bool) -> Tuple[bytes, bool]:
        """SentencePiece's rule: the "▁" that begins the first piece with text (the dummy
        prefix) is dropped; control tokens before it do not count, byte tokens do."""
        token_id = self.check_id(token_id)
        data = self._surfaces[token_id]
        if not at_start:
            return data, False
        t = self._types[token_id]
        if t == CONTROL:
            return data, True
        if t == UNKNOWN or t == BYTE or not self._dummy_prefix:
            return data, not data
        piece = self._pieces[token_id]
        stripped = piece.startswith(SPACE)
        if stripped:
            data = piece[1:].replace(SPACE, " ").encode("utf-8")
        seen_space = stripped and not self._remove_extra
        return data, not (seen_space or data)
