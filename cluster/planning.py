"""From a model and the nodes at hand to a shard plan (each node's SliceSpec is its .spec)."""
from __future__ import annotations

from typing import Optional, Sequence

from dllama_node.common.memory import read_memory
from dllama_node.common.process_limits import lockable_bytes
from dllama_node.plan import ModelLayout, NodeCapacity, PlanOptions, ShardPlan, plan_shards


def local_capacities(n_nodes: int, threads: int = 1) -> list:
    """n_nodes processes on this machine: each gets an equal share of its memory and the
    same speed (--split, passed to the planner, then sets the shares of the work). Each may
    lock what this process may (common.process_limits.lockable_bytes)."""
    mem = read_memory()
    memlock = lockable_bytes()
    share = mem.available_bytes // n_nodes
    return [NodeCapacity(node_id=f"n{i}", available_ram_bytes=share,
                         free_swap_bytes=mem.swap_free_bytes // n_nodes,
                         memlock_limit_bytes=memlock, cores=threads, speed=1.0)
            for i in range(n_nodes)]


def make_plan(model, capacities: Sequence[NodeCapacity], max_seq_len: Optional[int] = None,
              split: Optional[Sequence[float]] = None, allow_swap: bool = False,
              batch: int = 1) -> ShardPlan:
    layout = ModelLayout.from_tensors(model.config, model.tensors)
    options = PlanOptions(max_seq_len=max_seq_len, allow_swap=allow_swap,
                          split=tuple(split) if split else None, batch_size=batch)
    return plan_shards(layout, list(capacities), options)


def parse_split(text: Optional[str], n_nodes: int) -> Optional[tuple]:
    """'3,1,1' -> (3.0, 1.0, 1.0); checks the count and the values."""
    from dllama_node.common.errors import UsageError

    if not text:
        return None
    try:
        weights = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--split {text!r}: expected comma-separated numbers, e.g. 2,1,1") from None
    if len(weights) != n_nodes:
        raise UsageError(f"--split has {len(weights)} weights for {n_nodes} nodes")
    if any(w < 0 or w != w for w in weights) or not any(weights):
        raise UsageError(f"--split {text}: weights must be >= 0, at least one above 0")
    return weights
