"""Builds the two compiled modules: dllama_node.kernels._kernels, the math, and
dllama_node.cluster._mesh_exchange, the mesh all-reduce's socket step.

The kernels' C sources pick their instruction sets per file with `#pragma GCC target`,
so one build carries the scalar, AVX2 and AVX-512 VNNI paths on x86 (NEON and dotprod on
ARM) and the best one is chosen at run time. A small pthread pool (kernels/src/matmul.c)
spreads matrix rows over threads.
Compiles with Cython 3.x (pip) and Cython 0.29 (Debian bookworm's cython3).
"""
import os
import platform

from Cython.Build import cythonize
from setuptools import Extension, setup

SOURCES = [
    "kernels/_kernels.pyx",
    "kernels/src/dispatch.c",
    "kernels/src/matmul.c",
    "kernels/src/ops.c",
    "kernels/src/isa_scalar.c",
    "kernels/src/isa_x86_avx2.c",
    "kernels/src/isa_x86_avx512.c",
    "kernels/src/isa_arm_neon.c",
]

compile_args = ["-O3", "-pthread", "-std=gnu11", "-Wall", "-Wno-unused-function"]
machine = platform.machine()
if machine.startswith("arm") and not machine.startswith("arm64"):
    # 32-bit ARM: NEON is chosen at run time, the baseline stays VFP-only.
    compile_args.append("-mfp16-format=ieee")
if os.environ.get("DLLAMA_KERNELS_DEBUG"):
    compile_args = [a if a != "-O3" else "-O0" for a in compile_args] + ["-g"]

kernels = Extension(
    "dllama_node.kernels._kernels",
    sources=SOURCES,
    include_dirs=["kernels/src"],
    extra_compile_args=compile_args,
    extra_link_args=["-pthread"],
)
# sends, polls and receives without the GIL (cluster/mesh_exchange.h): cluster code, no math
mesh_exchange = Extension(
    "dllama_node.cluster._mesh_exchange",
    sources=["cluster/_mesh_exchange.pyx"],
    include_dirs=["cluster"],
    extra_compile_args=compile_args,
)

setup(
    ext_modules=cythonize(
        [kernels, mesh_exchange],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        # a second build (scripts/test builds with Debian's Cython 0.29 too) keeps its
        # generated C apart from the tree's
        build_dir=os.environ.get("DLLAMA_CYTHON_BUILD_DIR"),
    )
)
