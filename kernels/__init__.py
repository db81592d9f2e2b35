"""The compute kernels: SIMD C behind Cython, one import for the engine.

    from dllama_node import kernels
    kernels.matmul(w, kernels.Q4_0, xq, out, n_threads)
    kernels.matmul_multi([(wq, kernels.Q4_0, q), (wk, kernels.Q4_0, k)], x, xq, n_threads)

Every function has the name and arguments of its numpy twin in
dllama_node.kernels.reference (the contract and the test oracle); see that module for
the shapes. The instruction-set path (AVX-512 VNNI, AVX2, NEON, scalar) is the best one
this CPU supports, or the one named by the environment variable DLLAMA_KERNELS;
kernel_path(), available_paths() and use_path(name) inspect and switch it.
"""
from __future__ import annotations

try:
    from dllama_node.kernels._kernels import (  # noqa: F401  (the public API)
        F16,
        F32,
        Q4_0,
        Q8_0,
        attention,
        available_paths,
        kernel_path,
        matmul,
        matmul_multi,
        quantize_q8_0,
        rmsnorm,
        rope,
        silu_mul,
        softmax,
        use_path,
    )
except ModuleNotFoundError as e:  # the extension module is not built
    if e.name != "dllama_node.kernels._kernels":
        raise
    raise ImportError(
        "dllama_node.kernels._kernels (the compiled kernels) is not built: run "
        "`pip install --no-build-isolation -e .` in the source tree, or "
        "`python setup.py build_ext --inplace` after changing a .c or .pyx file"
    ) from e

# Not a hot path (embedding rows, tests, tools): the numpy version serves both.
from dllama_node.kernels.reference import dequantize_weights  # noqa: E402,F401

__all__ = [
    "F32", "F16", "Q4_0", "Q8_0",
    "kernel_path", "available_paths", "use_path",
    "quantize_q8_0", "dequantize_weights", "matmul", "matmul_multi",
    "rmsnorm", "rope", "softmax", "silu_mul", "attention",
]
