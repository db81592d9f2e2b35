"""The planner's view of a model: its shape and the type each weight takes in memory.

A node holds its rows of each matrix in the type the kernels run on (the "kernel type"):
F32, F16, Q4_0 and Q8_0 stay as stored; every other GGML type (BF16, Q4_1, Q5_x, the K-quants)
is converted by the loader when it reads the file -- matrices to Q8_0, vectors to F32 -- so
that is the type whose bytes the plan counts. Norm vectors are always F32 in memory.

What the model holds, and how each tensor is cut, is the tensor table (model/tensors.py);
the layout adds the kernel type of each matrix: per layer, by the table's group name
("attn_q", "ffn_down", ...), and for the classifier (token_embd's when tied) and the token
embedding, which the root reads one row at a time from the memory map.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Set, Tuple

from dllama_node.common.errors import ModelFileError
from dllama_node.model import quants
from dllama_node.model.config import ModelConfig
from dllama_node.model.tensors import TensorKind, TensorTable, model_tensors, tensor_table

F32 = quants.GGML_F32
F16 = quants.GGML_F16
Q4_0 = quants.GGML_Q4_0
Q8_0 = quants.GGML_Q8_0

KERNEL_TYPES = (F32, F16, Q4_0, Q8_0)
QUANTIZED_TYPES = (Q4_0, Q8_0)


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


def _shape_text(shape: Tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


LayerTypes = Mapping[str, int]          # kernel type of each matrix of one layer, by group


def uniform_layer_types(table: TensorTable, ggml_type: int) -> LayerTypes:
    """Every matrix of a layer in the kernel type of `ggml_type`."""
    return {group: kernel_type(ggml_type) for group in table.layer_groups}


@dataclass(frozen=True)
class ModelLayout:
    """ModelConfig + the kernel type of every matrix: all the planner needs to count bytes."""

    config: ModelConfig
    layers: Tuple[LayerTypes, ...] = field(hash=False)   # per layer: {group: kernel type}
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
        types = uniform_layer_types(tensor_table(config), matrix_type)
        return cls(config, (types,) * config.n_layers, out, embd)

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Mapping[str, Any]) -> "ModelLayout":
        """From a ModelFile's tensors (name -> TensorInfo with .ggml_type and .shape, numpy order).

        Checks every matrix is there with the shape the config implies; raises ModelFileError
        naming the tensor, the shape expected and the shape found."""
        c = config
        tied = c.tied_embeddings or "output.weight" not in tensors
        if tied and not c.tied_embeddings:
            config = c = dataclasses.replace(c, tied_embeddings=True)

        def type_of(name: str, shape: Tuple[int, ...]) -> int:
            info = tensors.get(name)
            if info is None:
                raise ModelFileError(f"tensor {name}: missing from the model file")
            found = tuple(int(n) for n in info.shape)
            if found != shape:
                raise ModelFileError(f"tensor {name}: expected shape {_shape_text(shape)}, "
                                     f"found {_shape_text(found)}")
            return kernel_type(int(info.ggml_type))

        layers = [dict() for _ in range(c.n_layers)]
        globals_: Dict[str, int] = {}
        for t in model_tensors(c):
            if len(t.shape) != 2:
                continue                                    # vectors are F32 in memory
            ggml_type = type_of(t.source, t.shape)
            if t.layer is not None:
                layers[t.layer][t.kind.group] = ggml_type
            else:
                globals_[t.kind.key] = ggml_type
        return cls(config, tuple(layers), globals_["output"], globals_["token_embd"])

    def type_of(self, kind: TensorKind, layer: Optional[int] = None) -> int:
        """The kernel type a node holds a tensor of this kind in (vectors: F32)."""
        if len(kind.shape(self.config)) == 1:
            return F32
        if layer is not None:
            return self.layers[layer][kind.group]
        return {"output": self.output_type, "token_embd": self.token_embd_type}[kind.key]

    def matrix_types(self) -> Set[int]:
        """Every kernel type a layer matrix or the classifier is held in."""
        return {t for types in self.layers for t in types.values()} | {self.output_type}

    def requantized(self, matrix_type: int) -> "ModelLayout":
        """The same model with every matrix (classifier too) in `matrix_type`: what a smaller
        quantization would need."""
        return ModelLayout.uniform(self.config, matrix_type)

    # -- what slicing must respect --------------------------------------------------------------

    @property
    def quantized_attn_output(self) -> bool:
        """Some matrix whose columns are cut by query heads is block-quantized."""
        cut = [k.group for k in tensor_table(self.config).layer
               if k.cut.unit == "q_heads" and k.cut.axis == 1]
        return any(types[g] in QUANTIZED_TYPES for types in self.layers for g in cut)

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
        for t in model_tensors(self.config):
            if len(t.shape) != 2 or not t.kind.in_slice:
                continue
            ggml_type, width = self.type_of(t.kind, t.layer), t.shape[1]
            if ggml_type in QUANTIZED_TYPES and width % quants.QK:
                raise ModelFileError(f"tensor {t.name}: {type_name(ggml_type)} rows of {width} "
                                     f"values are not whole blocks of {quants.QK}")

    def describe(self) -> dict:
        """JSON-ready summary: dimensions and type names."""
        c = self.config
        kinds = sorted({type_name(t) for types in self.layers for t in types.values()})
        return {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
                "seq_len": c.seq_len, "tied_embeddings": c.tied_embeddings, "layer_types": kinds,
                "output_type": type_name(self.output_type),
                "token_embd_type": type_name(self.token_embd_type)}
