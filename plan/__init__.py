"""The shard plan: which rows of the model each node holds, and what that costs it -- pure
functions over data (model layout + node capacities -> ShardPlan), printed as a table and
journaled as JSON before anything loads.

    layout.py       ModelLayout: the model's shape and the kernel type of every matrix
    accounting.py   the bytes of a slice (weights, KV cache, buffers, reserve), with formulas
    apportion.py    speed-weighted, memory-bounded integer split and its half-open ranges
    data.py         the plan's data types: NodeCapacity, PlanOptions, ShardPlan, NodeSlice, PlanError
    shard_plan.py   plan_shards(): units placed by speed within memory, the default max_seq_len
    advice.py       reasons, warnings and the PlanError message with what would fit
    table.py        format_plan(): the slice and memory tables; the range notation [start,stop)
"""
from .accounting import MemoryNeed, NodeMemory, SliceCounts, memory_need
from .layout import LayerTypes, ModelLayout
from .data import ExcludedNode, NodeCapacity, NodeSlice, PlanError, PlanOptions, ShardPlan
from .shard_plan import plan_shards
from .table import format_plan

__all__ = ["ExcludedNode", "LayerTypes", "MemoryNeed", "ModelLayout", "NodeCapacity", "NodeMemory",
           "NodeSlice", "PlanError", "PlanOptions", "ShardPlan", "SliceCounts", "format_plan",
           "memory_need", "plan_shards"]
