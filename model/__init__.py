"""Model files: GGUF and distributed-llama .m, read through a memmap as zero-copy views.

    from dllama_node.model import open_model
    with open_model(path) as m:
        m.config                      # ModelConfig
        w, kernel_type = m.tensor("blk.0.attn_q.weight")

tensors.py is the table of what a model is made of (every tensor kind: name, shape, how
nodes cut it), which everything below reads; gguf.py parses GGUF headers, dllama_m.py the
.m format, loader.py validates a llama model and hands out views, convert.py converts
types the kernels do not run, gguf_writer.py writes GGUF, generate.py writes random test
models.
"""
from dllama_node.model.config import ModelConfig, RopeScaling
from dllama_node.model.loader import ModelFile, TensorInfo, llama_tensor_shapes, open_model

__all__ = ["ModelConfig", "RopeScaling", "ModelFile", "TensorInfo", "llama_tensor_shapes",
           "open_model"]
