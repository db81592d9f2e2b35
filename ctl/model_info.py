"""`dllama-ctl info`: a model file's shape and its tensors by type, read from the header
without loading the weights.

    tiny.gguf: gguf, 3.9 MiB, 39 tensors
      dim              256
      ...

      type  tensors    bytes
      F32         9  9.0 KiB
      Q8_0       30  3.8 MiB

--json gives the same as one object; the types by their GGML names (model/quants.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, List

import click

from dllama_node.common.text_table import align_columns
from dllama_node.common.units import format_bytes
from dllama_node.model.quants import type_name


@dataclass
class TypeTotal:
    """The tensors of one GGML type in a model file."""

    ggml_type: int
    tensors: int = 0
    nbytes: int = 0

    @property
    def name(self) -> str:
        return type_name(self.ggml_type)


def totals_by_type(tensors: Iterable) -> List[TypeTotal]:
    """Count and bytes per GGML type of these TensorInfos, in type id order."""
    totals = {}
    for t in tensors:
        total = totals.setdefault(t.ggml_type, TypeTotal(t.ggml_type))
        total.tensors += 1
        total.nbytes += t.nbytes
    return [totals[k] for k in sorted(totals)]


def types_table(totals: List[TypeTotal]) -> List[str]:
    """The aligned lines: type name, tensor count, bytes."""
    rows = [("type", "tensors", "bytes")]
    rows += [(t.name, str(t.tensors), format_bytes(t.nbytes)) for t in totals]
    return align_columns(rows, right={1, 2})


def info(model_path: str, as_json: bool) -> None:
    from dllama_node.model import open_model

    with open_model(model_path) as model:
        cfg = model.config
        totals = totals_by_type(model.tensors.values())
        data = {"path": model_path, "format": model.format, "file_size": model.file_size,
                "config": {k: v for k, v in cfg.__dict__.items() if k != "rope_scaling"},
                "rope_scaling": cfg.rope_scaling.__dict__ if cfg.rope_scaling else None,
                "tensors": len(model.tensors),
                "bytes_by_type": {t.name: t.nbytes for t in totals},
                "tensors_by_type": {t.name: t.tensors for t in totals}}
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"{model_path}: {data['format']}, {format_bytes(data['file_size'])}, "
               f"{data['tensors']} tensors")
    for k, v in data["config"].items():
        click.echo(f"  {k:16} {v}")
    if data["rope_scaling"]:
        click.echo(f"  {'rope_scaling':16} {data['rope_scaling']}")
    click.echo("")
    for line in types_table(totals):
        click.echo(f"  {line}")
