"""distributed-llama's .m model files: reader, and a writer used by tests.

The format is defined by distributed-llama's converter (converter/writer.py,
converter/convert-hf.py) and its loader (src/llm.cpp loadLlmHeader, loadLlmNetWeight):

    i32 magic 0x0A00ABCD | i32 header_size (bytes, counting magic and itself)
    (header_size - 8) / 8 x (i32 key, i32 value)       -- keys in HEADER_KEYS
    weights, back to back, no padding, in this order:
      token embedding          F32  (vocab_size, dim)
      per layer: q (q_dim, dim), k (kv_dim, dim), v (kv_dim, dim), wo (dim, q_dim),
                 w1 = gate (hidden_dim, dim), w2 = down (dim, hidden_dim),
                 w3 = up (hidden_dim, dim)                          -- weight type
                 attention norm F32 (dim,), ffn norm F32 (dim,)
      final norm F32 (dim,)
      classifier (vocab_size, dim)                                   -- weight type
    and the file ends exactly there (the loader checks bytes consumed == file size).

Weight types: 0 F32, 1 F16, 2 Q40, 3 Q80 -- the Q40/Q80 blocks are byte-for-byte
GGML's Q4_0/Q8_0 (f16 scale; low nibbles are values 0-15 of a block, high nibbles
16-31), and matrices are row-major (PyTorch's (out_features, in_features)), so every
tensor maps to a zero-copy view like a GGUF tensor.

Rope: for the llama architecture the converter permutes the Q and K rows exactly as
llama.cpp's GGUF converter does, and distributed-llama's ROPE_LLAMA rotates adjacent
pairs (2i, 2i+1): .m llama files use the GGML "normal" rope layout, like GGUF files.
(Qwen3 .m files are not permuted and use NeoX halves; that architecture is refused.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Tuple, Union

import numpy as np

from dllama_node.common.errors import ModelFileError, UnsupportedModelError
from dllama_node.model import quants
from dllama_node.model.config import ModelConfig
from dllama_node.model.gguf import GGUFTensor
from dllama_node.model.tensors import Shape, TensorKind, dllama_m_tensors

DLLAMA_M_MAGIC = 0x0A00ABCD
OLD_MAGICS = (0xABCD00, 0xABCD01)      # the fixed-header format before 2024's key/value header

HEADER_KEYS = {
    0: "version", 1: "arch_type", 2: "dim", 3: "hidden_dim", 4: "n_layers", 5: "n_heads",
    6: "n_kv_heads", 7: "n_experts", 8: "n_active_experts", 9: "vocab_size",
    10: "max_seq_len", 11: "hidden_act", 12: "rope_theta", 13: "weights_float_type",
    14: "rope_scaling_factor", 15: "rope_scaling_low_freq_factor",
    16: "rope_scaling_high_freq_factory", 17: "rope_scaling_orig_max_seq_len",
    18: "rope_type", 19: "head_dim", 20: "norm_epsilon", 21: "moe_hidden_dim",
    22: "partial_rotary_factor", 23: "attn_output_gate", 24: "layer_type_bits",
}
KEY_IDS = {name: key for key, name in HEADER_KEYS.items()}

ARCH_LLAMA = 0xABCD00
ARCH_NAMES = {0xABCD00: "llama", 0xABCD01: "qwen3", 0xABCD02: "qwen3_moe"}
HIDDEN_ACT_SILU = 1
ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1 = 0, 1, 2
NORM_EPSILON_CODES = {5: 1e-5, 6: 1e-6}

# .m float type -> GGML type id, and back.
FLOAT_TYPES = {0: quants.GGML_F32, 1: quants.GGML_F16, 2: quants.GGML_Q4_0, 3: quants.GGML_Q8_0}
GGML_TO_M = {g: m for m, g in FLOAT_TYPES.items()}


@dataclass
class DllamaMFile:
    """What a .m file says: the raw header, the same under GGUF llama.* keys, the tensors."""

    path: str
    header: Dict[str, int]
    header_size: int
    metadata: Dict[str, Any]
    tensors: Dict[str, GGUFTensor]
    file_size: int


def tensor_layout(config: ModelConfig, weight_type: int) -> List[Tuple[TensorKind, str, int, Shape]]:
    """[(kind, canonical GGUF name, GGML type, numpy shape)] in .m file order (the tensor
    table's m_order): vectors and the token embedding in F32, matrices in weight_type."""
    return [(kind, name, quants.GGML_F32 if len(shape) == 1 or kind.m_f32 else weight_type, shape)
            for kind, name, shape in dllama_m_tensors(config)]


def _nbytes(ggml_type: int, shape: Tuple[int, ...]) -> int:
    t = quants.GGML_TYPES[ggml_type]
    n = 1
    for s in shape:
        n *= int(s)
    return n // t.block_size * t.block_bytes


def read_dllama_m(path: str) -> DllamaMFile:
    """Parse and validate a .m file's header and lay out its tensors (no weights read)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path} does not exist" if not os.path.exists(path)
                             else f"model file {path} is not a regular file")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            what = "the magic" if len(head) < 4 else "the header size"
            raise ModelFileError(f"{path}: truncated header: reading {what} at byte "
                                 f"{0 if len(head) < 4 else 4}, the file has {file_size} bytes")
        magic = int.from_bytes(head[:4], "little")
        if magic in OLD_MAGICS:
            raise UnsupportedModelError(
                f"{path}: old distributed-llama format (magic {magic:#x}) is not supported; "
                f"reconvert the model with distributed-llama's converter/convert-hf.py")
        if magic != DLLAMA_M_MAGIC:
            raise ModelFileError(f"{path}: not a distributed-llama .m file: magic {magic:#010x}, "
                                 f"expected {DLLAMA_M_MAGIC:#010x}")
        header_size = int.from_bytes(head[4:8], "little", signed=True)
        if header_size < 8 or (header_size - 8) % 8:
            raise ModelFileError(f"{path}: header size {header_size} is not 8 plus a whole "
                                 f"number of 8-byte key/value pairs")
        if header_size > file_size:
            raise ModelFileError(f"{path}: truncated header: reading {(header_size - 8) // 8} "
                                 f"key/value pairs at byte 8 needs {header_size} bytes, the file "
                                 f"has {file_size} bytes")
        pairs = np.frombuffer(f.read(header_size - 8), dtype="<i4").reshape(-1, 2)

    header: Dict[str, int] = {}
    for key, value in pairs.tolist():
        name = HEADER_KEYS.get(key)
        if name is None:
            raise UnsupportedModelError(f"{path}: header key {key} is unknown (a newer "
                                        f"distributed-llama format?); known keys are 0-{max(HEADER_KEYS)}")
        header[name] = value
    metadata = _check_header(path, header)

    weight_type = FLOAT_TYPES[header["weights_float_type"]]
    layout = tensor_layout(_shape_config(header), weight_type)
    tensors: Dict[str, GGUFTensor] = {}
    offset = header_size
    for _, name, ggml_type, shape in layout:
        t = quants.GGML_TYPES[ggml_type]
        if shape[-1] % t.block_size:
            raise ModelFileError(f"tensor {name}: row length {shape[-1]} is not a multiple of "
                                 f"the {t.name} block size {t.block_size}")
        nbytes = _nbytes(ggml_type, shape)
        if offset + nbytes > file_size:
            raise ModelFileError(f"tensor {name}: data ends at byte {offset + nbytes}, file has "
                                 f"{file_size} bytes (truncated?)")
        tensors[name] = GGUFTensor(name, ggml_type, shape, offset, nbytes)
        offset += nbytes
    if offset != file_size:
        raise ModelFileError(f"{path}: the header describes {offset} bytes, the file has "
                             f"{file_size} bytes ({file_size - offset} extra): not the layout "
                             f"of a llama .m file")
    return DllamaMFile(path, header, header_size, metadata, tensors, file_size)


def _shape_config(h: Dict[str, int]) -> ModelConfig:
    """The dimensions a checked header gives, as a ModelConfig (enough to lay out tensors)."""
    return ModelConfig(arch="llama", dim=h["dim"], hidden_dim=h["hidden_dim"],
                       n_layers=h["n_layers"], n_heads=h["n_heads"], n_kv_heads=h["n_kv_heads"],
                       head_dim=h.get("head_dim") or h["dim"] // h["n_heads"],
                       vocab_size=h["vocab_size"], seq_len=h["max_seq_len"])


def _check_header(path: str, h: Dict[str, int]) -> Dict[str, Any]:
    """Refuse what we cannot run; return the header under GGUF llama.* keys."""
    for key in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
        if key not in h:
            raise ModelFileError(f"{path}: header key {key} is missing")
        if h[key] <= 0:
            raise ModelFileError(f"{path}: header {key} is {h[key]}, expected a positive number")
    arch = h.get("arch_type", ARCH_LLAMA)
    if arch != ARCH_LLAMA:
        raise UnsupportedModelError(f"{path}: architecture {ARCH_NAMES.get(arch, 'unknown')} "
                                    f"({arch:#x}) is not supported; llama ({ARCH_LLAMA:#x}) is")
    if h.get("n_experts", 0) > 0:
        raise UnsupportedModelError(f"{path}: mixture of experts ({h['n_experts']} experts) "
                                    f"is not supported")
    if h.get("hidden_act", HIDDEN_ACT_SILU) != HIDDEN_ACT_SILU:
        raise UnsupportedModelError(f"{path}: hidden_act {h['hidden_act']} (gelu) is not "
                                    f"supported; llama uses silu ({HIDDEN_ACT_SILU})")
    for key in ("partial_rotary_factor", "attn_output_gate", "layer_type_bits"):
        if h.get(key, 0):
            raise UnsupportedModelError(f"{path}: header {key} = {h[key]} is not supported")
    if "weights_float_type" not in h:
        raise ModelFileError(f"{path}: header key weights_float_type is missing")
    if h["weights_float_type"] not in FLOAT_TYPES:
        raise UnsupportedModelError(f"{path}: weight float type {h['weights_float_type']} is "
                                    f"unknown; known: 0 f32, 1 f16, 2 q40, 3 q80")
    if h.get("head_dim", 0) < 0 or (not h.get("head_dim") and h["dim"] % h["n_heads"]):
        raise ModelFileError(f"{path}: dim {h['dim']} is not a multiple of n_heads {h['n_heads']}")
    eps_code = h.get("norm_epsilon", 5)
    if eps_code not in NORM_EPSILON_CODES:
        raise UnsupportedModelError(f"{path}: norm_epsilon code {eps_code} is unknown; "
                                    f"known: 5 (1e-5), 6 (1e-6)")
    head_dim = h.get("head_dim") or h["dim"] // h["n_heads"]
    md: Dict[str, Any] = {
        "general.architecture": "llama",
        "llama.embedding_length": h["dim"],
        "llama.feed_forward_length": h["hidden_dim"],
        "llama.block_count": h["n_layers"],
        "llama.attention.head_count": h["n_heads"],
        "llama.attention.head_count_kv": h["n_kv_heads"],
        "llama.attention.key_length": head_dim,
        "llama.attention.value_length": head_dim,
        "llama.rope.dimension_count": head_dim,
        "llama.context_length": h["max_seq_len"],
        "llama.vocab_size": h["vocab_size"],
        "llama.rope.freq_base": float(h.get("rope_theta", 10000)),
        "llama.attention.layer_norm_rms_epsilon": NORM_EPSILON_CODES[eps_code],
    }
    rope_type = h.get("rope_type", ROPE_LLAMA)
    if rope_type == ROPE_LLAMA3_1:
        scaling = ("rope_scaling_factor", "rope_scaling_low_freq_factor",
                   "rope_scaling_high_freq_factory", "rope_scaling_orig_max_seq_len")
        missing = [k for k in scaling if k not in h]
        if missing:
            raise ModelFileError(f"{path}: rope type llama3.1 without header key {missing[0]}")
        md.update({"llama.rope.scaling.type": "llama3",
                   "llama.rope.scaling.factor": float(h["rope_scaling_factor"]),
                   "llama.rope.scaling.low_freq_factor": float(h["rope_scaling_low_freq_factor"]),
                   "llama.rope.scaling.high_freq_factor": float(h["rope_scaling_high_freq_factory"]),
                   "llama.rope.scaling.original_context_length": h["rope_scaling_orig_max_seq_len"]})
    elif rope_type != ROPE_LLAMA:
        raise UnsupportedModelError(f"{path}: rope type {rope_type} is not supported for llama; "
                                    f"known: {ROPE_LLAMA} (llama), {ROPE_LLAMA3_1} (llama3.1)")
    md.update({f"dllama.{k}": v for k, v in h.items()})
    return md


# -- writer (tests and tools) -----------------------------------------------------------

TensorSource = Union[Mapping[str, np.ndarray], Callable[[str], np.ndarray]]


def header_for(config: ModelConfig, weight_type: int, version: int = 0) -> Dict[str, int]:
    """The .m header of a llama ModelConfig (ints only, as the format stores them)."""
    if int(config.rope_theta) != config.rope_theta:
        raise ValueError(f"rope_theta {config.rope_theta} is not an integer: .m stores ints")
    eps_code = {v: k for k, v in NORM_EPSILON_CODES.items()}.get(config.norm_eps)
    if eps_code is None:
        raise ValueError(f"norm_eps {config.norm_eps} cannot be stored in .m (1e-5 or 1e-6)")
    h = {"version": version, "arch_type": ARCH_LLAMA, "hidden_act": HIDDEN_ACT_SILU,
         "dim": config.dim, "hidden_dim": config.hidden_dim, "n_layers": config.n_layers,
         "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "n_experts": 0,
         "n_active_experts": 0, "vocab_size": config.vocab_size, "max_seq_len": config.seq_len,
         "rope_theta": int(config.rope_theta), "weights_float_type": GGML_TO_M[weight_type],
         "norm_epsilon": eps_code}
    if config.head_dim * config.n_heads != config.dim:
        h["head_dim"] = config.head_dim
    s = config.rope_scaling
    if s is not None:
        values = (s.factor, s.low_freq_factor, s.high_freq_factor)
        if any(int(v) != v for v in values):
            raise ValueError(f"rope scaling {values} has fractions: .m stores ints")
        h.update({"rope_type": ROPE_LLAMA3_1, "rope_scaling_factor": int(s.factor),
                  "rope_scaling_low_freq_factor": int(s.low_freq_factor),
                  "rope_scaling_high_freq_factory": int(s.high_freq_factor),
                  "rope_scaling_orig_max_seq_len": s.original_max_position})
    return h


def stored_bytes(data: np.ndarray, ggml_type: int, shape: Tuple[int, ...]) -> np.ndarray:
    """A tensor as stored: float32 data is converted (quantized) to ggml_type; uint8 data
    is taken as already stored. Returns a contiguous array of the exact byte size."""
    data = np.asarray(data)
    if data.dtype == np.uint8 and ggml_type not in (quants.GGML_F32, quants.GGML_F16):
        out = data
    elif ggml_type == quants.GGML_F32:
        out = np.asarray(data, dtype="<f4")
    elif ggml_type == quants.GGML_F16:
        out = np.asarray(data, dtype="<f2")
    elif ggml_type == quants.GGML_Q4_0:
        out = quants.quantize_q4_0(np.asarray(data, dtype=np.float32).reshape(shape))
    elif ggml_type == quants.GGML_Q8_0:
        out = quants.quantize_q8_0(np.asarray(data, dtype=np.float32).reshape(shape))
    else:
        raise ValueError(f"cannot store {quants.type_name(ggml_type)}")
    out = np.ascontiguousarray(out)
    if out.nbytes != _nbytes(ggml_type, shape):
        raise ValueError(f"{out.nbytes} bytes for a {quants.type_name(ggml_type)} tensor of shape "
                         f"{shape}, expected {_nbytes(ggml_type, shape)}")
    return out


def write_dllama_m(path: str, config: ModelConfig, weight_type: int, tensors: TensorSource,
                   version: int = 0) -> int:
    """Write a llama .m file; tensors maps canonical names to arrays (float32 values, or
    uint8 bytes already in weight_type). A tied tensor (output.weight) falls back to the one
    it is tied to, as distributed-llama's converter does for tied embeddings. Returns the
    file size."""
    get = tensors if callable(tensors) else tensors.__getitem__
    header = header_for(config, weight_type, version)
    body = b"".join(KEY_IDS[k].to_bytes(4, "little", signed=True) + int(v).to_bytes(4, "little", signed=True)
                    for k, v in header.items())
    layout = tensor_layout(config, weight_type)
    with open(path, "wb") as f:
        f.write(DLLAMA_M_MAGIC.to_bytes(4, "little") + (8 + len(body)).to_bytes(4, "little") + body)
        for kind, name, ggml_type, shape in layout:
            try:
                data = get(name)
            except KeyError:
                if kind.tied_to is None:
                    raise
                data = np.asarray(get(kind.tied_to), dtype=np.float32)
            f.write(memoryview(stored_bytes(data, ggml_type, shape).reshape(-1).view(np.uint8)))
        return f.tell()
