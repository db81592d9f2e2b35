"""What every tokenizer offers the engine and the CLI: ids in, text out, and the specials.

Subclasses (spm.SpmTokenizer, bpe.BpeTokenizer) encode plain text fragments and say
which bytes each token stands for; this class splits the text at special tokens, adds
BOS, decodes bytes to text, and knows which ids end a turn.
"""
from __future__ import annotations

import codecs
import logging
import re
from typing import Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from dllama_node.common.errors import TokenizerError
from dllama_node.tokenizer import chat as chat_mod
from dllama_node.tokenizer.vocab import CONTROL, USER_DEFINED, Vocab, special_token_ids

log = logging.getLogger(__name__)

# Tokens that end an assistant turn in the chat formats we know, besides EOS itself.
END_OF_TURN_NAMES = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                     "<|end_of_text|>", "<|endoftext|>")


def _replace_each_byte(err: UnicodeDecodeError) -> Tuple[str, int]:
    """Replace one invalid byte with U+FFFD and resume after it (SentencePiece's rule)."""
    return "\ufffd", err.start + 1


codecs.register_error("dllama-replace-each-byte", _replace_each_byte)


class Tokenizer:
    """Text <-> token ids for one model.

    Attributes: vocab_size (tokens in the tokenizer: ids are [0, vocab_size)), bos_id,
    eos_id, unk_id (None when the vocabulary has none), eot_ids (ids that end a turn),
    kind ("spm" | "bpe"), add_bos (encode's default), chat_template (a ChatTemplate;
    assign chat.chat_template_by_name(...) to override it).
    """

    kind = ""
    # How invalid UTF-8 from byte tokens is shown: see decode().
    utf8_errors = "replace"

    def __init__(self, vocab: Vocab, default_add_bos: bool):
        self.vocab = vocab
        self.vocab_size = vocab.n_tokens
        self.bos_id = vocab.bos_id
        self.eos_id = vocab.eos_id
        self.unk_id = vocab.unk_id
        self.add_bos = default_add_bos if vocab.add_bos is None else vocab.add_bos
        if self.add_bos and self.bos_id is None:
            if vocab.add_bos:
                log.warning("tokenizer.ggml.add_bos_token is true but there is no BOS token: "
                            "encode adds none")
            self.add_bos = False
        self._types = vocab.types
        # _surfaces[i]: the bytes token i adds to decoded text (b"" for control tokens).
        self._surfaces: List[bytes] = [self._surface_of(i) for i in range(self.vocab_size)]
        self._special_ids = {}
        for i, t in enumerate(self._types):
            if t in self.split_types() and vocab.tokens[i]:
                self._special_ids.setdefault(self.token_text(i), i)
        self._special_re = self._compile_special_re(self._special_ids)
        self.eot_ids: Set[int] = self._find_eot_ids()
        self.chat_template = chat_mod.template_for_vocab(
            vocab.chat_template, self.special_texts(), self.bos_token, self.eos_token)

    # ---- what subclasses provide -------------------------------------------------
    def _encode_fragment(self, text: str) -> List[int]:
        """Ids of a text fragment that holds no special token."""
        raise NotImplementedError

    def _surface_of(self, token_id: int) -> bytes:
        """The bytes token_id adds to decoded text in the middle of a sequence."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token: a byte token gives its byte, "▁" a space, a control
        token its own spelling (decode() drops control tokens)."""
        raise NotImplementedError

    def split_types(self) -> Tuple[int, ...]:
        """Token types matched whole in the text before the text is tokenized."""
        return (CONTROL, USER_DEFINED)

    # ---- encode ------------------------------------------------------------------
    def encode(self, text: str, add_bos: Optional[bool] = None,
               parse_special: bool = True) -> List[int]:
        """Token ids of `text`, with BOS first when add_bos (None: the model's default).

        With parse_special, the spellings of special tokens ("<|eot_id|>", "<s>") in the
        text become those tokens, as chat templates need; otherwise they are plain text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        ids: List[int] = []
        if (self.add_bos if add_bos is None else add_bos):
            if self.bos_id is None:
                raise TokenizerError("add_bos asked for, but the tokenizer has no BOS token")
            ids.append(self.bos_id)
        if not parse_special or self._special_re is None:
            if text:
                ids.extend(self._encode_fragment(text))
            return ids
        start = 0
        for m in self._special_re.finditer(text):
            if m.start() > start:
                ids.extend(self._encode_fragment(text[start:m.start()]))
            ids.append(self._special_ids[m.group(0)])
            start = m.end()
        if start < len(text):
            ids.extend(self._encode_fragment(text[start:]))
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> List[int]:
        """Render the conversation with the chat template and encode it.

        BOS is added only when the model adds BOS and the rendered text does not begin
        with it already (templates such as Llama 3's write bos_token themselves).
        """
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        ids = self.encode(text, add_bos=False)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    # ---- decode ------------------------------------------------------------------
    def check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"token id {token_id} is outside the tokenizer's vocabulary [0, {self.vocab_size}):"
                " the model's padded rows beyond the tokenizer must never be sampled")
        return token_id

    def piece_surface(self, token_id: int, at_start: bool) -> Tuple[bytes, bool]:
        """(bytes token_id adds to the text, whether the text is still at its start).

        at_start is True before the first token; decode() and StreamDecoder thread it
        through every token so that SentencePiece's leading-space rule applies once.
        """
        return self._surfaces[self.check_id(token_id)], False

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the text of `ids` (control tokens dropped), not yet UTF-8 decoded."""
        out = []
        at_start = True
        for token_id in ids:
            data, at_start = self.piece_surface(token_id, at_start)
            out.append(data)
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Control tokens (BOS, EOS, <|eot_id|>) give no text; bytes that
        are not valid UTF-8 become U+FFFD (SentencePiece: one per byte, byte-level BPE: one
        per maximal invalid sequence, as the reference tokenizers do)."""
        return self.decode_bytes(ids).decode("utf-8", errors=self.utf8_errors)

    # ---- specials ----------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        """The token's spelling as text ("<|eot_id|>", "<s>", " the")."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_type(self, token_id: int) -> int:
        return self._types[self.check_id(token_id)]

    @property
    def bos_token(self) -> str:
        """BOS spelled as text ("<s>", "<|begin_of_text|>"); "" when there is none."""
        return self.token_text(self.bos_id) if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.token_text(self.eos_id) if self.eos_id is not None else ""

    def special_texts(self) -> Set[str]:
        """Spellings of the control and user-defined tokens."""
        return {self.token_text(i) for i, t in enumerate(self._types)
                if t in (CONTROL, USER_DEFINED)}

    def _find_eot_ids(self) -> Set[int]:
        v = self.vocab
        ids = {i for i in (v.eos_id, v.eot_id, v.eom_id) if i is not None}
        ids.update(v.extra_eos_ids)
        for i in special_token_ids(v, END_OF_TURN_NAMES):
            if self._types[i] in (CONTROL, USER_DEFINED):
                ids.add(i)
        return {i for i in ids if 0 <= i < self.vocab_size}

    @staticmethod
    def _compile_special_re(specials: Mapping[str, int]) -> Optional["re.Pattern[str]"]:
        if not specials:
            return None
        # Longest first, so "<|end|>" never wins over "<|end_of_text|>".
        alternatives = sorted(specials, key=lambda s: (-len(s), s))
        return re.compile("|".join(re.escape(s) for s in alternatives))

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} kind={self.kind} "
                f"vocab_size={getattr(self, 'vocab_size', '?')} bos={getattr(self, 'bos_id', '?')} "
                f"eos={getattr(self, 'eos_id', '?')} eot={sorted(getattr(self, 'eot_ids', ()))}>")
