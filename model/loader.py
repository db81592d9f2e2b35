"""open_model: one read-only memmap of a GGUF or .m file, validated, with zero-copy views.

    with open_model("tinyllama.Q4_0.gguf") as m:
        m.config                            # ModelConfig
        w, kt = m.tensor("blk.3.attn_q.weight")   # uint8 (q_dim, dim // 32 * 18), GGML_Q4_0

Everything a user can get wrong is checked at open, before any compute: the file, its
magic and version, the header, every tensor's bytes lying inside the file, the
architecture, the tensors a llama model needs and their shapes, and that every tensor
type is one the kernels run or one we can convert (see convert.py). Sizes and offsets
are Python ints throughout.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from dllama_node.common.errors import ModelFileError, TokenizerError, UnsupportedModelError
from dllama_node.model import convert, quants
from dllama_node.model.config import ModelConfig, RopeScaling
from dllama_node.model.dllama_m import DLLAMA_M_MAGIC, OLD_MAGICS, read_dllama_m
from dllama_node.model.gguf import GGUF_MAGIC, read_gguf
from dllama_node.model.tensors import Weight, file_shapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    name: str               # canonical GGUF name, e.g. "blk.3.attn_q.weight"
    ggml_type: int          # type as stored in the file
    shape: Tuple[int, ...]  # numpy order: (rows, cols) for matrices, (n,) for vectors
    offset: int             # absolute byte offset in the file
    nbytes: int


def llama_tensor_shapes(config: ModelConfig, rope_freqs: bool = False) -> Dict[str, Tuple[int, ...]]:
    """{name: numpy shape} of every tensor of a llama model, in GGUF file order (from the
    tensor table). output.weight is left out when config.tied_embeddings."""
    return file_shapes(config, ("rope_freqs.weight",) if rope_freqs else ())


def _shape_str(shape: Tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def config_from_metadata(path: str, md: Dict[str, Any], tensors: Dict[str, Any]) -> ModelConfig:
    """ModelConfig from GGUF-style llama.* metadata; vocab_size from token_embd's rows."""
    arch = md.get("general.architecture")
    if arch is None:
        raise ModelFileError(f"{path}: metadata key general.architecture is missing")
    if arch != "llama":
        raise UnsupportedModelError(f"{path}: architecture {arch!r} is not supported; "
                                    f"'llama' is (Llama 1/2/3, TinyLlama, Mistral)")

    def get(key: str, default: Any = None, kind: type = int) -> Any:
        full = f"llama.{key}"
        if full not in md:
            if default is None:
                raise ModelFileError(f"{path}: metadata key {full} is missing")
            return default
        value = md[full]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UnsupportedModelError(f"{path}: metadata {full} is {value!r}, expected a "
                                        f"positive integer")
        if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ModelFileError(f"{path}: metadata {full} is {value!r}, expected a number")
        return value

    dim = get("embedding_length")
    n_heads = get("attention.head_count")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads:
        raise ModelFileError(f"{path}: attention.head_count {n_heads} is not a multiple of "
                             f"attention.head_count_kv {n_kv_heads}")
    if "llama.attention.key_length" not in md and dim % n_heads:
        raise ModelFileError(f"{path}: embedding_length {dim} is not a multiple of head_count "
                             f"{n_heads} and attention.key_length is missing")
    head_dim = get("attention.key_length", dim // n_heads)
    value_length = get("attention.value_length", head_dim)
    if value_length != head_dim:
        raise UnsupportedModelError(f"{path}: attention.value_length {value_length} differs from "
                                    f"attention.key_length {head_dim}")
    if head_dim % 2:
        raise ModelFileError(f"{path}: head_dim {head_dim} is odd: rope needs pairs")
    rope_dims = get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"{path}: rope.dimension_count {rope_dims} is not head_dim "
                                    f"{head_dim} (partial rotary embeddings are not supported)")

    if "token_embd.weight" not in tensors:
        raise ModelFileError(f"{path}: tensor token_embd.weight is missing")
    vocab_size = tensors["token_embd.weight"].shape[0]
    declared = md.get("llama.vocab_size")
    if declared is not None and declared != vocab_size:
        raise ModelFileError(f"{path}: llama.vocab_size is {declared}, token_embd.weight has "
                             f"{vocab_size} rows")
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != vocab_size:
        raise TokenizerError(f"{path}: the tokenizer has {len(tokens)} tokens, the model's "
                             f"token_embd.weight has {vocab_size} rows")

    return ModelConfig(
        arch="llama", dim=dim, hidden_dim=get("feed_forward_length"), n_layers=get("block_count"),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=vocab_size,
        seq_len=get("context_length"),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5, float)),
        rope_theta=float(get("rope.freq_base", 10000.0, float)),
        rope_scaling=_rope_scaling(path, md, "rope_freqs.weight" in tensors),
        tied_embeddings="output.weight" not in tensors)


def _rope_scaling(path: str, md: Dict[str, Any], has_rope_freqs: bool) -> Optional[RopeScaling]:
    kind = md.get("llama.rope.scaling.type", "none")
    factor = md.get("llama.rope.scaling.factor", md.get("llama.rope.scale_linear", 1.0))
    if kind in ("none", "") or (kind in ("linear", "yarn") and factor == 1.0):
        return None
    if kind == "llama3":
        if has_rope_freqs:
            raise ModelFileError(f"{path}: both rope_freqs.weight and llama3 rope scaling "
                                 f"metadata: the scaling would be applied twice")
        try:
            return RopeScaling(
                factor=float(factor),
                low_freq_factor=float(md["llama.rope.scaling.low_freq_factor"]),
                high_freq_factor=float(md["llama.rope.scaling.high_freq_factor"]),
                original_max_position=int(md["llama.rope.scaling.original_context_length"]))
        except KeyError as e:
            raise ModelFileError(f"{path}: llama3 rope scaling without metadata key {e.args[0]}") from None
    raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} (factor {factor}) is not "
                                f"supported; none and llama3 are")


class ModelFile:
    """A validated model file. tensor() hands out zero-copy views of one read-only memmap
    (per-tensor memmaps on 32-bit hosts, where a whole big file does not fit the address
    space). close() drops the map; views already handed out stay valid while referenced."""

    def __init__(self, path: str, format: str, metadata: Dict[str, Any],
                 tensors: Dict[str, TensorInfo], file_size: int, config: ModelConfig,
                 whole_file_map: Optional[bool] = None):
        self.path = path
        self.format = format
        self.metadata = metadata
        self.tensors = tensors
        self.file_size = file_size
        self.config = config
        if whole_file_map is None:
            whole_file_map = sys.maxsize > 2 ** 32
        self._whole = bool(whole_file_map)
        self._map: Optional[np.memmap] = None
        self._tensor_maps: Dict[str, np.memmap] = {}
        self._closed = False
        if self._whole and file_size > 0:
            self._map = np.memmap(path, dtype=np.uint8, mode="r", shape=(file_size,))

    def __repr__(self) -> str:
        return f"<ModelFile {self.path} {self.format} {len(self.tensors)} tensors>"

    def _info(self, name: str) -> TensorInfo:
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFileError(f"{self.path}: tensor {name} is not in the file") from None

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor: uint8 (nbytes,), a view of the file."""
        info = self._info(name)
        if info.nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        if self._map is not None:
            view = self._map[info.offset:info.offset + info.nbytes]
        else:                               # one map per tensor, made once
            view = self._tensor_maps.get(name)
            if view is None:
                view = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset,
                                 shape=(info.nbytes,))
                self._tensor_maps[name] = view
        return view.view(np.ndarray)        # plain ndarray; its base keeps the map alive

    def kernel_type(self, name: str) -> int:
        """The GGML type tensor(name) returns (F32, F16, Q4_0 or Q8_0)."""
        info = self._info(name)
        return convert.converted_type(info.ggml_type, info.shape)

    def kernel_nbytes(self, name: str) -> int:
        """Bytes of the array tensor(name) returns (the stored size unless converted)."""
        info = self._info(name)
        kt = self.kernel_type(name)
        if kt == info.ggml_type:
            return info.nbytes
        n = 1
        for s in info.shape[:-1]:
            n *= s
        return n * quants.row_bytes(kt, info.shape[-1])

    def _row_range(self, info: TensorInfo, rows: Tuple[int, int]) -> Tuple[int, int]:
        if len(info.shape) != 2:
            raise ValueError(f"tensor {info.name}: a row range needs a matrix, shape is "
                             f"{_shape_str(info.shape)}")
        start, stop, n_rows = int(rows[0]), int(rows[1]), info.shape[0]
        if not 0 <= start <= stop <= n_rows:
            raise ValueError(f"tensor {info.name}: rows [{start}, {stop}) outside [0, {n_rows})")
        return start, stop

    def tensor(self, name: str, rows: Optional[Tuple[int, int]] = None) -> Weight:
        """Weight(array, kernel_type). F32 -> float32 view, F16 -> float16 view, Q4_0/Q8_0 ->
        uint8 (rows, row_bytes) view; vectors always float32; other types converted.

        rows: a half-open range [start, stop) of a matrix's rows, so a node converts only
        its own slice of a matrix stored in a type the kernels do not run."""
        info = self._info(name)
        raw = self.raw(name)
        if rows is not None:
            start, stop = self._row_range(info, rows)
            stored_row = quants.row_bytes(info.ggml_type, info.shape[-1])
            raw = raw[start * stored_row:stop * stored_row]
            info = TensorInfo(info.name, info.ggml_type, (stop - start, info.shape[1]),
                              info.offset + start * stored_row, (stop - start) * stored_row)
        kt = convert.converted_type(info.ggml_type, info.shape)
        if kt != info.ggml_type:
            return Weight(*convert.convert_tensor(raw, info.ggml_type, info.shape))
        if kt == quants.GGML_F32:
            arr = raw.view("<f4").reshape(info.shape)
        elif kt == quants.GGML_F16:
            arr = raw.view("<f2").reshape(info.shape)
        else:
            arr = raw.reshape(*info.shape[:-1], quants.row_bytes(kt, info.shape[-1]))
        if not arr.flags.aligned:      # a GGUF with general.alignment < 4 can do this
            arr = arr.copy()
        return Weight(arr, kt)

    def dequantize_rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """float32 (len(index), cols): rows of a matrix dequantized straight from the file,
        whatever its stored type -- token embedding lookups without converting the table."""
        info = self._info(name)
        if len(info.shape) != 2:
            raise ValueError(f"tensor {name}: rows need a matrix, shape is {_shape_str(info.shape)}")
        stored_row = quants.row_bytes(info.ggml_type, info.shape[1])
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= info.shape[0]):
            raise ValueError(f"tensor {name}: row index outside [0, {info.shape[0]})")
        picked = self.raw(name).reshape(info.shape[0], stored_row)[index]
        return convert.dequantize(picked, info.ggml_type)

    def rope_inv_freq(self) -> np.ndarray:
        """float32 (head_dim // 2,): the config's rotation speeds, divided by
        rope_freqs.weight when the file carries it (llama.cpp's Llama 3.1+ files)."""
        inv = self.config.rope_inv_freq()
        if "rope_freqs.weight" in self.tensors:
            factors, _ = self.tensor("rope_freqs.weight")
            inv = (inv.astype(np.float64) / factors.astype(np.float64)).astype(np.float32)
        return inv

    def close(self) -> None:
        self._map = None
        self._tensor_maps.clear()
        self._closed = True

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _validate(path: str, config: ModelConfig, tensors: Dict[str, TensorInfo]) -> None:
    """Every tensor llama needs is there, with its shape, in a type we can run."""
    expected = file_shapes(config, optional=tensors)
    converted: Counter = Counter()
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise ModelFileError(f"{path}: tensor {name} is missing")
        if tuple(info.shape) != shape:
            raise ModelFileError(f"tensor {name}: expected {_shape_str(shape)}, found "
                                 f"{_shape_str(info.shape)}")
        if info.ggml_type not in convert.DEQUANTIZERS:
            raise UnsupportedModelError(
                f"tensor {name}: type {quants.type_name(info.ggml_type)} has no converter "
                f"(supported: {convert.supported_type_names()})")
        if info.ggml_type not in convert.KERNEL_TYPES:
            converted[info.ggml_type] += 1
    for ggml_type, count in sorted(converted.items()):
        log.warning("%s: %d tensors are %s, which the kernels do not run: converting them at "
                    "load (matrices to Q8_0, vectors to F32), which costs time and memory",
                    path, count, quants.type_name(ggml_type))
    extra = [n for n in tensors if n not in expected]
    if extra:
        log.info("%s: ignoring %d tensors a llama model does not use (%s)", path, len(extra),
                 ", ".join(extra[:3]) + (" ..." if len(extra) > 3 else ""))


def open_model(path: str, whole_file_map: Optional[bool] = None) -> ModelFile:
    """Open a GGUF or distributed-llama .m model file, picked by its magic, and validate it.

    whole_file_map: one memmap of the whole file (default on 64-bit hosts) or one per
    tensor (the default on 32-bit hosts)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"model file {path} does not exist")
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path} is not a regular file")
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) < 4:
        raise ModelFileError(f"{path}: truncated header: reading the magic at byte 0 needs 4 "
                             f"bytes, the file has {len(head)} bytes")
    magic_int = int.from_bytes(head, "little")
    if head == GGUF_MAGIC:
        g = read_gguf(path)
        fmt, metadata, raw_tensors, file_size = "gguf", g.metadata, g.tensors, g.file_size
    elif magic_int == DLLAMA_M_MAGIC or magic_int in OLD_MAGICS:
        m = read_dllama_m(path)
        fmt, metadata, raw_tensors, file_size = "dllama-m", m.metadata, m.tensors, m.file_size
    else:
        raise ModelFileError(
            f"{path}: not a model file: starts with {head!r} ({magic_int:#010x} little-endian); "
            f"a GGUF file starts with {GGUF_MAGIC!r}, a distributed-llama .m file with "
            f"{DLLAMA_M_MAGIC:#010x}")
    tensors = {n: TensorInfo(t.name, t.ggml_type, tuple(t.shape), t.offset, t.nbytes)
               for n, t in raw_tensors.items()}
    config = config_from_metadata(path, metadata, tensors)
    _validate(path, config, tensors)
    log.info("opened %s (%s): %d layers, dim %d, vocab %d, %d tensors, %d bytes", path, fmt,
             config.n_layers, config.dim, config.vocab_size, len(tensors), file_size)
    return ModelFile(path, fmt, metadata, tensors, file_size, config, whole_file_map)
