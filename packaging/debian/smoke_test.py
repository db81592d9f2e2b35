"""Build-time check of the compiled kernels (debian/rules override_dh_auto_test): every
instruction-set path this CPU offers against the numpy reference, with Debian's numpy."""
import numpy as np

from dllama_node import kernels
from dllama_node.kernels import reference

rng = np.random.default_rng(0)
n_rows, k = 67, 96            # not powers of two
w = rng.standard_normal((n_rows, k)).astype(np.float32)
x = rng.standard_normal((3, k)).astype(np.float32)
expected = np.empty((3, n_rows), np.float32)
reference.matmul(w, kernels.F32, x, expected)
for path in kernels.available_paths():
    kernels.use_path(path)
    out = np.empty((3, n_rows), np.float32)
    kernels.matmul(w, kernels.F32, x, out, 2)
    error = float(np.max(np.abs(out - expected)))
    assert error < 1e-3, f"kernel path {path}: matmul f32 differs from the reference by {error}"
    print(f"kernel path {path}: matmul f32 within {error:.2e} of the reference")
