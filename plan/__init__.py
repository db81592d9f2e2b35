"""The shard plan: which rows of the model each node holds, and what that costs it -- pure
functions over data (model layout + node capacities -> ShardPlan), printed as a table and
journaled as JSON before anything loads.

    layout.py       ModelLayout: the model's shape and the kernel type of every matrix
    accounting.py   the bytes of a slice (weights, KV cache, buffers, reserve), with formulas
    apportion.py    speed-weighted, memory-bounded integer split and its half-open ranges
    shard_plan.py   plan_shards() and the plan's data types
    advice.py       reasons, warnings and the PlanError message with what would fit
    table.py        format_plan(): the per-node table
"""
from .accounting import MemoryNeed, NodeMemory, SliceCounts, memory_need
from .layout import LayerTypes, ModelLayout
from .shard_plan import (ExcludedNode, NodeCapacity, NodeSlice, PlanError, PlanOptions, ShardPlan,
                         plan_shards)
from .table import format_plan

__all__ = ["ExcludedNode", "LayerTypes", "MemoryNeed", "ModelLayout", "NodeCapacity", "NodeMemory",
           "NodeSlice", "PlanError", "PlanOptions", "ShardPlan", "SliceCounts", "format_plan",
           "memory_need", "plan_shards"]
