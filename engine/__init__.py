"""The forward pass, KV cache, sampler and generation loop of one node."""
