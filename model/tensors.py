"""What a model is made of, as data: one table of tensor kinds per architecture.

Every part of the node that touches weights reads this table instead of spelling tensor
names: the file readers (loader.py checks every tensor's shape, dllama_m.py lays out a .m
file), this node's weights (engine/weights.py binds views, engine/load.py copies its slice),
the slicer (cluster/slices.py), the planner's byte accounting (plan/layout.py,
plan/accounting.py) and the memory lock (NodeWeights.matrices). A new tensor kind -- Qwen's
Q/K/V biases, Gemma's extra norms -- is one entry here (and its use in the forward pass).

How the tensor parallel split touches a tensor is its cut: which unit of a SliceSpec cuts
which axis. Units are what the planner hands out, as half-open ranges [start, stop):

    q_heads     query heads         x head_dim rows (attn_q) or columns (attn_output)
    kv_heads    key/value heads     x head_dim rows (attn_k, attn_v), and the KV cache
    ffn_rows    FFN rows            rows of ffn_gate / ffn_up = columns of ffn_down
    vocab_rows  classifier rows     rows of output.weight (token_embd's when tied)

A kind without a unit is held whole by every node (the norms). token_embd is held by no
node: the root reads the rows of the tokens it embeds from the memory map.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Collection, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from dllama_node.common.errors import UnsupportedModelError, UsageError
from dllama_node.model.config import ModelConfig

Range = Tuple[int, int]
Shape = Tuple[int, ...]


class Weight(NamedTuple):
    """A matrix as the kernels take it."""

    array: np.ndarray   # float32/float16 (rows, cols), or uint8 (rows, row_bytes) of blocks
    ggml_type: int


# -- units: what the planner hands out ---------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One kind of unit a slice holds a range of; `name` is its SliceSpec field."""

    name: str
    count: Callable[[ModelConfig], int]     # how many the model has
    width: Callable[[ModelConfig], int]     # tensor rows (or columns) per unit


UNITS: Dict[str, Unit] = {u.name: u for u in (
    Unit("q_heads", lambda c: c.n_heads, lambda c: c.head_dim),
    Unit("kv_heads", lambda c: c.n_kv_heads, lambda c: c.head_dim),
    Unit("ffn_rows", lambda c: c.hidden_dim, lambda c: 1),
    Unit("vocab_rows", lambda c: c.vocab_size, lambda c: 1),
)}


@dataclass(frozen=True)
class SliceSpec:
    """The units one node computes, as half-open ranges [start, stop); (0, 0) when none.
    The plan's NodeSlice carries one; the node's weights, its slice file and the slice
    manifest are cut by it."""

    q_heads: Range
    kv_heads: Range
    ffn_rows: Range
    vocab_rows: Range

    def __post_init__(self) -> None:
        for f in fields(self):       # (int, int) tuples, whatever sequence was given
            start, stop = getattr(self, f.name)
            object.__setattr__(self, f.name, (int(start), int(stop)))

    @classmethod
    def full(cls, config: ModelConfig) -> "SliceSpec":
        """Every unit: what a node alone holds."""
        return cls(**{name: (0, u.count(config)) for name, u in UNITS.items()})

    def count(self, unit: str) -> int:
        start, stop = getattr(self, unit)
        return stop - start

    @property
    def n_q_heads(self) -> int:
        return self.count("q_heads")

    @property
    def n_kv_heads(self) -> int:
        return self.count("kv_heads")

    @property
    def n_ffn_rows(self) -> int:
        return self.count("ffn_rows")

    @property
    def n_vocab_rows(self) -> int:
        return self.count("vocab_rows")

    def to_dict(self) -> Dict[str, List[int]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d) -> "SliceSpec":
        """From to_dict's form (the wire, a manifest); KeyError/TypeError/ValueError when malformed."""
        return cls(**{f.name: tuple(d[f.name]) for f in fields(cls)})

    def check(self, config: ModelConfig) -> None:
        """Every range lies inside the model: 0 <= start <= stop <= count."""
        for name, u in UNITS.items():
            start, stop = getattr(self, name)
            size = u.count(config)
            if not 0 <= start <= stop <= size:
                raise UsageError(f"slice {name} [{start}, {stop}) is not inside [0, {size})")


# -- the table ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Cut:
    """Which unit cuts which axis of a tensor (0: rows, 1: columns); unit None: held whole."""

    unit: Optional[str] = None
    axis: int = 0


WHOLE = Cut()


@dataclass(frozen=True)
class TensorKind:
    """One kind of tensor: its file name, shape, cut, and where it lives in the node."""

    key: str                                # attribute of LayerWeights / NodeWeights
    gguf: str                               # GGUF name; per-layer kinds contain {layer}
    shape: Callable[[ModelConfig], Shape]   # numpy order: (rows, cols) or (n,)
    cut: Cut = WHOLE
    group: Optional[str] = None             # the plan's weights_by_group key; None: not counted
    m_order: Optional[int] = None           # position in a .m file's section; None: not in .m
    m_f32: bool = False                     # stored as F32 in a .m file whatever its weight type
    optional: bool = False                  # a file may lack it (then the model does without)
    tied_to: Optional[str] = None           # read from this tensor when config.tied_embeddings
    in_slice: bool = True                   # False: no node holds it (the root reads rows)

    def name(self, layer: Optional[int] = None) -> str:
        return self.gguf.format(layer=layer)

    def source(self, config: ModelConfig, layer: Optional[int] = None) -> str:
        """The file tensor it is read from: its own, or the one it is tied to."""
        return self.tied_to if self.tied_to and config.tied_embeddings else self.name(layer)

    def held_shape(self, config: ModelConfig, n_units: Callable[[str], int]) -> Shape:
        """The shape of a node's part, holding n_units(unit) units of the cutting unit."""
        shape = list(self.shape(config))
        if self.cut.unit is not None:
            shape[self.cut.axis] = n_units(self.cut.unit) * UNITS[self.cut.unit].width(config)
        return tuple(shape)

    def cut_ranges(self, config: ModelConfig, spec: SliceSpec) -> Tuple[Optional[Range], Optional[Range]]:
        """(rows, cols) of the node's part: rows [r0, r1) of a matrix (None: a vector, held
        whole), cols [c0, c1) of every row (None: whole rows)."""
        shape = self.shape(config)
        if len(shape) == 1:
            if self.cut.unit is not None:
                raise UnsupportedModelError(f"tensor {self.gguf}: a vector cut by {self.cut.unit} "
                                            f"is not supported yet")
            return None, None
        if self.cut.unit is None:
            return (0, shape[0]), None
        width = UNITS[self.cut.unit].width(config)
        start, stop = getattr(spec, self.cut.unit)
        units = (start * width, stop * width)
        return (units, None) if self.cut.axis == 0 else ((0, shape[0]), units)


@dataclass(frozen=True)
class TensorTable:
    """An architecture's tensors, in GGUF file order: before the layers, per layer, after."""

    arch: str
    head: Tuple[TensorKind, ...]
    layer: Tuple[TensorKind, ...]
    tail: Tuple[TensorKind, ...]

    @property
    def layer_groups(self) -> Tuple[str, ...]:
        """The plan's groups of per-layer matrices (their kernel types vary per layer)."""
        return tuple(k.group for k in self.layer if k.group and k.cut.unit is not None)


def _matrix(key: str, part: str, shape, cut: Cut, m_order: int) -> TensorKind:
    return TensorKind(key, f"blk.{{layer}}.{part}.weight", shape, cut, group=part, m_order=m_order)


def _norm(key: str, gguf: str, m_order: int) -> TensorKind:
    return TensorKind(key, gguf, lambda c: (c.dim,), group="norms", m_order=m_order)


LLAMA = TensorTable(
    arch="llama",
    head=(
        TensorKind("token_embd", "token_embd.weight", lambda c: (c.vocab_size, c.dim),
                   m_order=0, m_f32=True, in_slice=False),
        TensorKind("rope_freqs", "rope_freqs.weight", lambda c: (c.head_dim // 2,), optional=True),
    ),
    layer=(
        _norm("attn_norm", "blk.{layer}.attn_norm.weight", 7),
        _matrix("wq", "attn_q", lambda c: (c.q_dim, c.dim), Cut("q_heads", 0), 0),
        _matrix("wk", "attn_k", lambda c: (c.kv_dim, c.dim), Cut("kv_heads", 0), 1),
        _matrix("wv", "attn_v", lambda c: (c.kv_dim, c.dim), Cut("kv_heads", 0), 2),
        _matrix("wo", "attn_output", lambda c: (c.dim, c.q_dim), Cut("q_heads", 1), 3),
        _norm("ffn_norm", "blk.{layer}.ffn_norm.weight", 8),
        _matrix("w_gate", "ffn_gate", lambda c: (c.hidden_dim, c.dim), Cut("ffn_rows", 0), 4),
        _matrix("w_up", "ffn_up", lambda c: (c.hidden_dim, c.dim), Cut("ffn_rows", 0), 6),
        _matrix("w_down", "ffn_down", lambda c: (c.dim, c.hidden_dim), Cut("ffn_rows", 1), 5),
    ),
    tail=(
        _norm("output_norm", "output_norm.weight", 0),
        TensorKind("output", "output.weight", lambda c: (c.vocab_size, c.dim), Cut("vocab_rows", 0),
                   group="output", m_order=1, tied_to="token_embd.weight"),
    ),
)

TABLES: Dict[str, TensorTable] = {LLAMA.arch: LLAMA}


def tensor_table(config: ModelConfig) -> TensorTable:
    try:
        return TABLES[config.arch]
    except KeyError:
        raise UnsupportedModelError(f"architecture {config.arch!r} has no tensor table; "
                                    f"known: {', '.join(TABLES)}") from None


# -- a model's tensors ---------------------------------------------------------------------

@dataclass(frozen=True)
class ModelTensor:
    """One tensor of a model: its kind, name, and the file tensor it is read from."""

    kind: TensorKind
    name: str               # "blk.3.attn_q.weight"
    source: str             # the tensor in the file: name, or tied_to when tied
    shape: Shape
    layer: Optional[int]    # None for the tensors before and after the layers


def model_tensors(config: ModelConfig, optional: Collection[str] = ()) -> List[ModelTensor]:
    """Every tensor of the model, in GGUF file order. An optional kind is there when its
    name is in `optional` (e.g. the file's tensor names); a tied kind is there, read from
    the tensor it is tied to, when config.tied_embeddings."""
    table = tensor_table(config)
    out: List[ModelTensor] = []

    def add(kind: TensorKind, layer: Optional[int]) -> None:
        name = kind.name(layer)
        if kind.optional and name not in optional:
            return
        out.append(ModelTensor(kind, name, kind.source(config, layer), kind.shape(config), layer))

    for kind in table.head:
        add(kind, None)
    for layer in range(config.n_layers):
        for kind in table.layer:
            add(kind, layer)
    for kind in table.tail:
        add(kind, None)
    return out


def file_shapes(config: ModelConfig, optional: Collection[str] = ()) -> Dict[str, Shape]:
    """{name: numpy shape} of every tensor a file of this model holds, in GGUF file order
    (a tied classifier is not one of them)."""
    return {t.name: t.shape for t in model_tensors(config, optional) if t.source == t.name}


def dllama_m_tensors(config: ModelConfig) -> List[Tuple[TensorKind, str, Shape]]:
    """[(kind, name, shape)] of a .m file, in its order: the kinds a .m file holds, each
    section sorted by m_order (a .m file always holds its classifier)."""
    table = tensor_table(config)

    def section(kinds, layer=None):
        held = sorted((k for k in kinds if k.m_order is not None), key=lambda k: k.m_order)
        return [(k, k.name(layer), k.shape(config)) for k in held]

    out = section(table.head)
    for layer in range(config.n_layers):
        out += section(table.layer, layer)
    return out + section(table.tail)
