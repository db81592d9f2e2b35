"""The repository root is never an import path while the tests run.

The repository's top-level folders (kernels/, daemon/, api/, model/, ...) are the
subpackages of dllama_node, installed under that namespace. On sys.path as top-level
names they would hide installed packages of the same names: transformers 5.25 imports
Hugging Face's `kernels`, and found ours instead. pytest runs in importlib mode
(pyproject.toml), which adds nothing to sys.path; `python -m pytest` still puts the
working directory first, so it is taken out here, before any test module imports.
tests/test_import_paths.py checks the result.
"""
from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_repo_root(entry: str) -> bool:
    return os.path.abspath(entry or os.curdir) == REPO_ROOT


sys.path[:] = [entry for entry in sys.path if not _is_repo_root(entry)]
