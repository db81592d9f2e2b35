"""Tensor-parallel cluster runtime: shard plans, slices, the synchronizer and the wire protocol."""
