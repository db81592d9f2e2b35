"""Test models: random llama weights of any shape, with a synthetic tokenizer.

No weights can be downloaded here, so tests, benchmarks and demos build their own:

    write_random_model("tiny.gguf", PRESETS["tiny"], weight_type="q4_0", seed=0)

Weights are drawn so activations stay finite over many layers: matrices ~ N(0, 0.02)
(for q4_0/q8_0 the quantized values are drawn directly: uniform integers and small f16
scales with the same spread), norms ~ 1. Each tensor is generated and written in
chunks of rows from its own random stream (seeded by seed and the tensor's name), so
memory stays small and a tensor's values do not depend on which others are written.

The tokenizer is SentencePiece-style (tokenizer.ggml.model = "llama"): <unk>, <s>,
</s>, the 256 byte tokens <0x00>..<0xFF>, then unique pieces -- single characters with
and without the "▁" word prefix, then concatenations of letters -- with decreasing scores.
"""
from __future__ import annotations

import itertools
import logging
import math
import string
import time
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from dllama_node.model import quants
from dllama_node.model.config import ModelConfig, RopeScaling
from dllama_node.model.dllama_m import write_dllama_m
from dllama_node.model.gguf_writer import GGUFWriter
from dllama_node.model.loader import llama_tensor_shapes

log = logging.getLogger(__name__)

WEIGHT_TYPES = {"f32": quants.GGML_F32, "f16": quants.GGML_F16,
                "q4_0": quants.GGML_Q4_0, "q8_0": quants.GGML_Q8_0}
# general.file_type (llama_ftype) of a file whose matrices are all of one type.
FILE_TYPES = {quants.GGML_F32: 0, quants.GGML_F16: 1, quants.GGML_Q4_0: 2, quants.GGML_Q8_0: 7}

WEIGHT_STD = 0.02
NORM_STD = 0.05
CHUNK_BYTES = 8 << 20          # bytes generated per step

# Token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6
WORD_PREFIX = "\u2581"          # "▁", SentencePiece's marker of a preceding space

PRESETS: Dict[str, ModelConfig] = {
    "tinyllama-1.1b": ModelConfig(arch="llama", dim=2048, hidden_dim=5632, n_layers=22,
                                  n_heads=32, n_kv_heads=4, head_dim=64, vocab_size=32000,
                                  seq_len=2048, norm_eps=1e-5, rope_theta=10000.0),
    "llama3.2-1b": ModelConfig(arch="llama", dim=2048, hidden_dim=8192, n_layers=16, n_heads=32,
                               n_kv_heads=8, head_dim=64, vocab_size=128256, seq_len=131072,
                               norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
                               tied_embeddings=True),
    # ~2 MB at q4_0: unit tests of the whole pipeline. Not powers of two on purpose.
    "tiny": ModelConfig(arch="llama", dim=256, hidden_dim=672, n_layers=4, n_heads=8,
                        n_kv_heads=2, head_dim=32, vocab_size=2048, seq_len=512),
    # ~50 MB at q4_0: multi-node and memory tests.
    "small": ModelConfig(arch="llama", dim=768, hidden_dim=2048, n_layers=12, n_heads=12,
                         n_kv_heads=4, head_dim=64, vocab_size=8000, seq_len=1024),
}


# -- tokenizer ----------------------------------------------------------------------

def _pieces() -> Iterator[str]:
    """Unique normal pieces, shortest first."""
    yield WORD_PREFIX
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    for c in chars:
        yield WORD_PREFIX + c
        yield c
    for length in itertools.count(2):
        for combo in itertools.product(string.ascii_lowercase, repeat=length):
            s = "".join(combo)
            yield WORD_PREFIX + s
            yield s


def synthetic_vocab(vocab_size: int) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(tokens, scores float32, token_types int32), each vocab_size long."""
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for normal pieces "
                         f"(the special and byte tokens take {len(specials)})")
    n_normal = vocab_size - len(specials)
    tokens = specials + list(itertools.islice(_pieces(), n_normal))
    scores = np.zeros(vocab_size, dtype=np.float32)
    scores[len(specials):] = -np.arange(n_normal, dtype=np.float32)
    types = np.full(vocab_size, TOKEN_NORMAL, dtype=np.int32)
    types[0], types[1], types[2] = TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL
    types[3:len(specials)] = TOKEN_BYTE
    return tokens, scores, types


# -- weights ------------------------------------------------------------------------

# Two nibbles in 1..15 per byte, so q - 8 is symmetric in [-7, 7].
_Q4_PAIRS = np.array([(1 + i % 15) | ((1 + i // 15) << 4) for i in range(225)], dtype=np.uint8)
_Q4_STD = math.sqrt((15 ** 2 - 1) / 12)      # std of a uniform integer in [-7, 7]
_Q8_STD = math.sqrt((255 ** 2 - 1) / 12)     # std of a uniform integer in [-127, 127]


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _random_rows(rng: np.random.Generator, rows: int, cols: int, ggml_type: int) -> np.ndarray:
    """rows x cols random weights ~ N(0, WEIGHT_STD), as stored in ggml_type."""
    if ggml_type in (quants.GGML_F32, quants.GGML_F16):
        x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(WEIGHT_STD)
        return x if ggml_type == quants.GGML_F32 else x.astype(np.float16)
    n_blocks = rows * cols // quants.QK
    if ggml_type == quants.GGML_Q4_0:
        out = np.empty((n_blocks, quants.Q4_0_BLOCK_BYTES), dtype=np.uint8)
        d = rng.uniform(0.5, 1.5, n_blocks) * (WEIGHT_STD / _Q4_STD)
        out[:, 2:] = _Q4_PAIRS[rng.integers(0, 225, size=(n_blocks, 16), dtype=np.uint8)]
    elif ggml_type == quants.GGML_Q8_0:
        out = np.empty((n_blocks, quants.Q8_0_BLOCK_BYTES), dtype=np.uint8)
        d = rng.uniform(0.5, 1.5, n_blocks) * (WEIGHT_STD / _Q8_STD)
        out[:, 2:] = rng.integers(-127, 128, size=(n_blocks, 32), dtype=np.int8).view(np.uint8)
    else:
        raise ValueError(f"cannot generate {quants.type_name(ggml_type)} weights")
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    return out.reshape(rows, -1)


def tensor_chunks(name: str, shape: Tuple[int, ...], ggml_type: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The stored bytes of one random tensor, a chunk of rows at a time."""
    rng = _tensor_rng(seed, name)
    if len(shape) == 1:         # norms: ~ 1, F32 (or F16)
        norm = 1.0 + rng.standard_normal(shape[0], dtype=np.float32) * np.float32(NORM_STD)
        if ggml_type not in (quants.GGML_F32, quants.GGML_F16):
            raise ValueError(f"cannot generate a {quants.type_name(ggml_type)} vector")
        yield norm if ggml_type == quants.GGML_F32 else norm.astype(np.float16)
        return
    rows, cols = shape
    step = max(1, CHUNK_BYTES // max(1, quants.row_bytes(ggml_type, cols)))
    for r0 in range(0, rows, step):
        yield _random_rows(rng, min(step, rows - r0), cols, ggml_type)


def random_tensor(name: str, shape: Tuple[int, ...], ggml_type: int, seed: int = 0) -> np.ndarray:
    """One whole random tensor as stored (the chunks of tensor_chunks, joined)."""
    return np.concatenate(list(tensor_chunks(name, shape, ggml_type, seed)), axis=0)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """float32 (head_dim // 2,): rope_freqs.weight as llama.cpp's converter writes it for
    Llama 3.1+ scaling; ggml divides each pair's frequency by its factor."""
    s = config.rope_scaling
    half = config.head_dim // 2
    inv = 1.0 / (config.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / config.head_dim))
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    factors = np.where(wavelen < high_wavelen, 1.0,
                       np.where(wavelen > low_wavelen, s.factor, 1.0 / ((1 - smooth) / s.factor + smooth)))
    return factors.astype(np.float32)


# -- files --------------------------------------------------------------------------

def model_tensor_types(config: ModelConfig, weight_type: int) -> Dict[str, Tuple[Tuple[int, ...], int]]:
    """{name: (shape, ggml_type)} of the GGUF file write_random_model writes."""
    shapes = llama_tensor_shapes(config, rope_freqs=config.rope_scaling is not None)
    return {n: (s, quants.GGML_F32 if len(s) == 1 else weight_type) for n, s in shapes.items()}


def llama_metadata(config: ModelConfig, weight_type: int, name: str) -> Dict[str, Any]:
    """The architecture part of a llama model's GGUF metadata (no tokenizer)."""
    c = config
    return {
        "general.architecture": "llama",
        "general.name": name,
        "general.file_type": FILE_TYPES[weight_type],
        "general.quantization_version": 2,
        "llama.vocab_size": c.vocab_size,
        "llama.context_length": c.seq_len,
        "llama.embedding_length": c.dim,
        "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.hidden_dim,
        "llama.rope.dimension_count": c.head_dim,
        "llama.attention.head_count": c.n_heads,
        "llama.attention.head_count_kv": c.n_kv_heads,
        "llama.attention.key_length": c.head_dim,
        "llama.attention.value_length": c.head_dim,
        "llama.attention.layer_norm_rms_epsilon": float(c.norm_eps),
        "llama.rope.freq_base": float(c.rope_theta),
    }


def model_metadata(config: ModelConfig, weight_type: int, name: str = "random") -> Dict[str, Any]:
    """The GGUF metadata of a llama model with the synthetic tokenizer (types inferred
    by the writer: ints UINT32, floats FLOAT32, token types INT32, scores FLOAT32)."""
    tokens, scores, types = synthetic_vocab(config.vocab_size)
    return {
        **llama_metadata(config, weight_type, name),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


ChunksFor = Callable[[str, Tuple[int, ...], int], Iterable[np.ndarray]]


def write_gguf_model(path: str, metadata: Dict[str, Any],
                     tensors: Dict[str, Tuple[Tuple[int, ...], int]], chunks_for: ChunksFor,
                     progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Write metadata and tensors {name: (shape, ggml_type)} in order, each tensor's
    bytes from chunks_for(name, shape, ggml_type); returns the file size."""
    with GGUFWriter(path) as w:
        for key, value in metadata.items():
            w.add(key, value)
        for name, (shape, ggml_type) in tensors.items():
            w.add_tensor_info(name, shape, ggml_type)
        w.write_header()
        total = sum(w.tensor_nbytes().values())
        done = 0
        for name, (shape, ggml_type) in tensors.items():
            def counted(chunks=chunks_for(name, shape, ggml_type)) -> Iterator[np.ndarray]:
                nonlocal done
                for chunk in chunks:
                    yield chunk
                    done += chunk.nbytes
                    if progress:
                        progress(done, total)
            w.write_tensor(name, counted())
        return w.total_size


def write_random_model(path: str, config: ModelConfig, weight_type: str = "q4_0", seed: int = 0,
                       progress: Optional[Callable[[int, int], None]] = None,
                       file_format: str = "gguf") -> int:
    """Write a llama model with random weights; returns the file size in bytes.

    weight_type: "f32", "f16", "q4_0" or "q8_0" for every matrix (norms are F32).
    progress(bytes_done, bytes_total) is called after each chunk of tensor data.
    file_format "dllama-m" writes distributed-llama's .m instead (no tokenizer inside;
    its embedding is F32, as that format requires)."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type {weight_type!r}: expected one of {', '.join(WEIGHT_TYPES)}")
    wt = WEIGHT_TYPES[weight_type]
    t0 = time.monotonic()
    if file_format == "dllama-m":
        size = write_dllama_m(path, config, wt, lambda name: _m_tensor(config, name, wt, seed))
        if progress:
            progress(size, size)
        return size
    if file_format != "gguf":
        raise ValueError(f"file_format {file_format!r}: expected 'gguf' or 'dllama-m'")

    def chunks_for(name: str, shape: Tuple[int, ...], ggml_type: int) -> Iterable[np.ndarray]:
        if name == "rope_freqs.weight":
            return [llama3_rope_factors(config)]
        return tensor_chunks(name, shape, ggml_type, seed)

    metadata = model_metadata(config, wt, f"random-{config.dim}x{config.n_layers}-{weight_type}")
    size = write_gguf_model(path, metadata, model_tensor_types(config, wt), chunks_for, progress)
    log.info("wrote random model %s: %d bytes in %.1f s", path, size, time.monotonic() - t0)
    return size


def _m_tensor(config: ModelConfig, name: str, weight_type: int, seed: int) -> np.ndarray:
    """A tensor for a .m file: the embedding is F32 there, everything else as in GGUF."""
    shapes = llama_tensor_shapes(config)
    shape = shapes.get(name) or (config.vocab_size, config.dim)      # output.weight when tied
    ggml_type = quants.GGML_F32 if len(shape) == 1 or name == "token_embd.weight" else weight_type
    return random_tensor(name, shape, ggml_type, seed)
