"""Shared oracles for the tokenizer tests (no tests here).

Small tokenizers trained on the spot by the reference libraries: a SentencePiece BPE
model with byte fallback (as Llama 2's), and byte-level BPE models trained with Hugging
Face `tokenizers` using Llama 3's and GPT-2's pre-tokenizers. Their pieces and merges are
exported as GGUF-style metadata, which is what our tokenizers are rebuilt from.
"""
from __future__ import annotations

import functools
import io
import json
import random
from typing import Dict, List, Sequence

WORDS = ("the of and to in is was for on that with as by at from it an be this which or "
         "model token board cluster memory node layer weight tensor attention head cache "
         "raspberry pi running llama quickly slowly network packet socket thread kernel "
         "don't it's we're they've I'm you'll she'd HELLO World Python's").split()
ACCENTED = "café naïve Grüße señor façade déjà vu Ærø smörgåsbord".split()
CJK = ["日本語", "東京", "中文", "한국어", "русский", "ελληνικά", "עברית", "العربية"]
PUNCT = [",", ".", "!", "?", ";", ":", "...", "--", "(", ")", "\"", "'", "=>", "==", "{", "}"]

# Texts the tokenizers are compared on: unicode, emoji (byte fallback), leading,
# trailing and repeated spaces, newlines, tabs, digits, contractions, code.
TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "  two leading and   three inside   ",
    "line one\nline two\n\nline four\r\nwindows\n",
    "\ttabbed\ttext\t",
    "naïve café Grüße déjà vu",
    "日本語のテキストと中文 한국어",
    "emoji 🙂👍🏽 and flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "numbers 1234567890 3.14159 1,000,000 and 2024-05-01",
    "don't it's we're they've I'm you'll she'd HE'S",
    "def f(x):\n    return x ** 2  # square\n",
    "a" * 300,
    "=" * 257 + "\n" + "-" * 100,
    "",
    " ",
    "\n",
    "Mixed: Ærø smörgåsbord, русский текст, ελληνικά, العربية, עברית.",
    "rare chars: \u2047 \u2581 \ufffd \u00a0nbsp \u200b zero-width",
]


def corpus(n_lines: int = 3000, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 16)):
            r = rng.random()
            if r < 0.75:
                parts.append(rng.choice(WORDS))
            elif r < 0.85:
                parts.append(rng.choice(ACCENTED))
            elif r < 0.9:
                parts.append(rng.choice(CJK))
            elif r < 0.95:
                parts.append(str(rng.randint(0, 99999)))
            else:
                parts.append(rng.choice(PUNCT))
        lines.append(" ".join(parts))
    return lines


# ---- SentencePiece ----------------------------------------------------------------
SPM_USER_DEFINED = ["<tool>", "[[x]]"]


@functools.lru_cache(maxsize=None)
def spm_model_bytes(vocab_size: int = 600) -> bytes:
    """A SentencePiece BPE model trained like Llama 2's (identity normalization, dummy
    prefix, no whitespace removal, byte fallback, split digits)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=SPM_USER_DEFINED, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


def spm_processor(vocab_size: int = 600):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(spm_model_bytes(vocab_size))
    return sp


def spm_metadata(sp) -> Dict[str, object]:
    """The processor's pieces as GGUF metadata (what llama.cpp's converter writes)."""
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        piece = sp.IdToPiece(i)
        tokens.append(piece)
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(2)
        elif sp.IsControl(i):
            types.append(3)
        elif sp.IsByte(i):
            types.append(6)
        elif sp.IsUnused(i):
            types.append(5)
        elif piece in SPM_USER_DEFINED:
            types.append(4)
        else:
            types.append(1)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(),
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": True}


def _small_synthetic_vocab(vocab_size: int):
    """Like the generator's vocabulary, cut short: below 259 ids the byte tokens are
    incomplete (a vocabulary without byte fallback)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < vocab_size:
        a, b = divmod(i, 26)
        piece = ("\u2581" if i % 2 == 0 else "") + (letters[(a - 1) % 26] * (1 + (a - 1) // 26) if a else "") + letters[b]
        if piece not in tokens:
            tokens.append(piece)
            types.append(1)
        i += 1
    scores = [0.0] * 259 + [-float(j) for j in range(max(0, vocab_size - 259))]
    return tokens[:vocab_size], scores[:vocab_size], types[:vocab_size]


def synthetic_metadata(vocab_size: int) -> Dict[str, object]:
    """The vocabulary the project's model generator writes into its GGUF files (and, below
    259 ids, one too small for all the byte tokens)."""
    if vocab_size > 259:
        from dllama_node.model.generate import synthetic_vocab
        tokens, scores, types = synthetic_vocab(vocab_size)
        scores, types = [float(v) for v in scores], [int(v) for v in types]
    else:
        tokens, scores, types = _small_synthetic_vocab(vocab_size)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True}


# ---- byte-level BPE ---------------------------------------------------------------
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>"]


@functools.lru_cache(maxsize=None)
def bpe_tokenizer_json(pre: str = "llama-bpe", vocab_size: int = 700) -> str:
    """A byte-level BPE trained by Hugging Face `tokenizers` with Llama 3's split regex
    and ignore_merges ("llama-bpe"), or GPT-2's ByteLevel regex ("default")."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from dllama_node.tokenizer.bpe import LLAMA3_PATTERN

    if pre == "llama-bpe":
        tk = Tokenizer(models.BPE(ignore_merges=True))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus(), trainer)
    # Specials last, as in Llama 3 (ids from 128000 on).
    tk.add_special_tokens(LLAMA3_SPECIALS)
    return tk.to_str()


def bpe_oracle(pre: str = "llama-bpe"):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(bpe_tokenizer_json(pre))


def bpe_metadata(pre: str = "llama-bpe") -> Dict[str, object]:
    """Vocab, merges and specials as GGUF metadata (what llama.cpp's converter writes)."""
    data = json.loads(bpe_tokenizer_json(pre))
    vocab: Dict[str, int] = dict(data["model"]["vocab"])
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    specials = {a["id"] for a in data["added_tokens"] if a["special"]}
    types = [3 if i in specials else 1 for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": vocab["<|begin_of_text|>"],
            "tokenizer.ggml.eos_token_id": vocab["<|end_of_text|>"],
            "tokenizer.ggml.add_bos_token": True}


def ids_equal(ours: Sequence[int], theirs: Sequence[int]) -> bool:
    return list(ours) == list(theirs)
