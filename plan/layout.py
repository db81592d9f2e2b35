"""The planner's view of a model: its shape and the type each weight takes in memory.

A node holds its rows of each matrix in the type the kernels run on (the "kernel type"):
F32, F16, Q4_0 and Q8_0 stay as stored; every other GGML type (BF16, Q4_1, Q5_x, the K-quants)
is converted by the loader when it reads the file -- matrices to Q8_0, vectors to F32 -- so
that is the type whose bytes the plan counts. Norm vectors are always F32 in memory.

Weight groups, named as in GGUF; shapes are numpy order (rows, cols), rows = output features:

    attn_q       (n_heads * head_dim, dim)      per layer
    attn_k       (n_kv_heads * head_dim, dim)   per layer
    attn_v       (n_kv_heads * head_dim, dim)   per layer
    attn_output  (dim, n_heads * head_dim)      per layer
    ffn_gate     (hidden_dim, dim)              per layer
    ffn_up       (hidden_dim, dim)              per layer
    ffn_down     (dim, hidden_dim)              per layer
    output       (vocab_size, dim)              the classifier; token_embd when tied
    token_embd   (vocab_size, dim)              read by the root one row at a time (memmap)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from dllama_node.common.errors import ModelFileError
from dllama_node.model import quants
from dllama_node.model.config import ModelConfig

F32 = quants.GGML_F32
F16 = quants.GGML_F16
Q4_0 = quants.GGML_Q4_0
Q8_0 = quants.GGML_Q8_0

KERNEL_TYPES = (F32, F16, Q4_0, Q8_0)
QUANTIZED_TYPES = (Q4_0, Q8_0)

LAYER_GROUPS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def type_name(ggml_type: int) -> str:
    """'q4_0', 'f16', ...: the GGML name, lower case."""
    t = quants.GGML_TYPES.get(int(ggml_type))
    return t.name.lower() if t is not None else f"type {int(ggml_type)}"


def kernel_type(ggml_type: int) -> int:
    """The type a matrix stored as `ggml_type` has in memory once loaded."""
    return ggml_type if ggml_type in KERNEL_TYPES else Q8_0


def slice_row_bytes(ggml_type: int, k: int) -> int:
    """Bytes of one row of k values; a quantized row must be whole 32-value blocks."""
    if ggml_type in QUANTIZED_TYPES and k % quants.QK:
        raise ValueError(f"a {type_name(ggml_type)} row of {k} values is not whole blocks of {quants.QK}")
    return quants.row_bytes(ggml_type, k)


@dataclass(frozen=True)
class LayerTypes:
    """Kernel type of each matrix of one transformer layer."""

    attn_q: int
    attn_k: int
    attn_v: int
    attn_output: int
    ffn_gate: int
    ffn_up: int
    ffn_down: int

    @classmethod
    def uniform(cls, ggml_type: int) -> "LayerTypes":
        return cls(*(kernel_type(ggml_type),) * len(LAYER_GROUPS))


@dataclass(frozen=True)
class ModelLayout:
    """ModelConfig + the kernel type of every matrix: all the planner needs to count bytes."""

    config: ModelConfig
    layers: Tuple[LayerTypes, ...]      # one per layer, n_layers of them
    output_type: int                    # classifier rows (token_embd's type when tied)
    token_embd_type: int                # as read from the file by the root, one row per token

    def __post_init__(self) -> None:
        c = self.config
        if len(self.layers) != c.n_layers:
            raise ValueError(f"layout has types for {len(self.layers)} layers, the config has {c.n_layers}")
        for name, value in (("dim", c.dim), ("hidden_dim", c.hidden_dim), ("n_layers", c.n_layers),
                            ("n_heads", c.n_heads), ("n_kv_heads", c.n_kv_heads),
                            ("head_dim", c.head_dim), ("vocab_size", c.vocab_size), ("seq_len", c.seq_len)):
            if int(value) < 1:
                raise ValueError(f"model {name} is {value}, expected at least 1")
        if c.n_heads % c.n_kv_heads:
            raise ValueError(f"n_heads {c.n_heads} is not a multiple of n_kv_heads {c.n_kv_heads}")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def uniform(cls, config: ModelConfig, matrix_type: int = Q4_0, output_type: Optional[int] = None,
                token_embd_type: Optional[int] = None) -> "ModelLayout":
        """Every layer matrix in `matrix_type`; the classifier and embedding default to it too."""
        embd = kernel_type(matrix_type if token_embd_type is None else token_embd_type)
        out = embd if config.tied_embeddings else kernel_type(
            matrix_type if output_type is None else output_type)
        return cls(config, (LayerTypes.uniform(matrix_type),) * config.n_layers, out, embd)

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Mapping[str, Any]) -> "ModelLayout":
        """From a ModelFile's tensors (name -> TensorInfo with .ggml_type and .shape, numpy order).

        Checks every matrix is there with the shape the config implies; raises ModelFileError
        naming the tensor, the shape expected and the shape found."""
        c = config
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        expected = {"attn_q": (q_dim, c.dim), "attn_k": (kv_dim, c.dim), "attn_v": (kv_dim, c.dim),
                    "attn_output": (c.dim, q_dim), "ffn_gate": (c.hidden_dim, c.dim),
                    "ffn_up": (c.hidden_dim, c.dim), "ffn_down": (c.dim, c.hidden_dim)}

        def type_of(name: str, shape: Tuple[int, int]) -> int:
            info = tensors.get(name)
            if info is None:
                raise ModelFileError(f"tensor {name}: missing from the model file")
            found = tuple(int(n) for n in info.shape)
            if found != shape:
                raise ModelFileError(f"tensor {name}: expected shape {shape[0]}x{shape[1]}, "
                                     f"found {'x'.join(str(n) for n in found)}")
            return kernel_type(int(info.ggml_type))

        layers = tuple(
            LayerTypes(**{g: type_of(f"blk.{i}.{g}.weight", expected[g]) for g in LAYER_GROUPS})
            for i in range(c.n_layers))
        embd = type_of("token_embd.weight", (c.vocab_size, c.dim))
        tied = c.tied_embeddings or "output.weight" not in tensors
        if tied and not c.tied_embeddings:
            config = dataclasses.replace(c, tied_embeddings=True)
        out = embd if tied else type_of("output.weight", (c.vocab_size, c.dim))
        return cls(config, layers, out, embd)

    def requantized(self, matrix_type: int) -> "ModelLayout":
        """The same model with every matrix (classifier too) in `matrix_type`: what a smaller
        quantization would need."""
        return ModelLayout.uniform(self.config, matrix_type)

    # -- what slicing must respect --------------------------------------------------------------

    @property
    def quantized_attn_output(self) -> bool:
        return any(t.attn_output in QUANTIZED_TYPES for t in self.layers)

    @property
    def heads_per_unit(self) -> int:
        """Query heads per attention unit: 1, or as many as make a node's columns of a
        quantized attn_output whole 32-value blocks (head_dim 80 -> 2 heads)."""
        if not self.quantized_attn_output:
            return 1
        head_dim = self.config.head_dim
        unit = 1
        while (unit * head_dim) % quants.QK:
            unit += 1
        return unit

    def check_sliceable(self) -> None:
        """Raise ModelFileError when quantized rows could not be cut in whole blocks."""
        c = self.config
        widths = {"attn_q": c.dim, "attn_k": c.dim, "attn_v": c.dim, "ffn_gate": c.dim, "ffn_up": c.dim,
                  "attn_output": c.n_heads * c.head_dim, "ffn_down": c.hidden_dim}
        for i, types in enumerate(self.layers):
            for group, width in widths.items():
                t = getattr(types, group)
                if t in QUANTIZED_TYPES and width % quants.QK:
                    raise ModelFileError(f"tensor blk.{i}.{group}.weight: {type_name(t)} rows of {width} "
                                         f"values are not whole blocks of {quants.QK}")
        if self.output_type in QUANTIZED_TYPES and c.dim % quants.QK:
            raise ModelFileError(f"tensor output.weight: {type_name(self.output_type)} rows of {c.dim} "
                                 f"values are not whole blocks of {quants.QK}")

    def describe(self) -> dict:
        """JSON-ready summary: dimensions and type names."""
        c = self.config
        kinds = sorted({type_name(getattr(t, g)) for t in self.layers for g in LAYER_GROUPS})
        return {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
                "seq_len": c.seq_len, "tied_embeddings": c.tied_embeddings, "layer_types": kinds,
                "output_type": type_name(self.output_type),
                "token_embd_type": type_name(self.token_embd_type)}
