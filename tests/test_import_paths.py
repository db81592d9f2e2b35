"""No top-level folder of the repository can hide an installed package while tests run.

The folders (kernels/, daemon/, api/, model/, ...) install as dllama_node.<name>. Were
the repository root on sys.path, `import kernels` inside transformers (5.25 imports
Hugging Face's `kernels` package) would get ours and fail in fixture set-up. These
tests import the installed transformers model classes and ask where each of those
names resolves from.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# the repository's top-level folders that hold Python modules (tests/ is pytest's own
# package of test modules, registered by it under that name)
TOP_LEVEL_PACKAGES = sorted(p.name for p in REPO_ROOT.iterdir()
                            if p.is_dir() and not p.name.startswith(".") and p.name != "tests"
                            and any(p.glob("*.py")))


def _inside_repo(origin) -> bool:
    """Whether a module file is one of the repository's own sources (.venv is not)."""
    if origin is None:
        return False
    path = Path(origin).resolve()
    return path.is_relative_to(REPO_ROOT) and path.relative_to(REPO_ROOT).parts[0] in TOP_LEVEL_PACKAGES


def test_the_repository_root_is_not_on_sys_path():
    roots = [e for e in sys.path if Path(e or os.curdir).resolve() == REPO_ROOT]
    assert roots == [], sys.path


def test_the_folders_are_known():
    # a guard for the test itself: the folders that caused the trouble are among those checked
    assert {"kernels", "daemon", "api", "model", "engine"} <= set(TOP_LEVEL_PACKAGES)


@pytest.mark.parametrize("name", TOP_LEVEL_PACKAGES)
def test_no_top_level_folder_is_importable_by_its_own_name(name):
    spec = importlib.util.find_spec(name) if name not in sys.modules else sys.modules[name].__spec__
    origin = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
    assert not _inside_repo(origin), f"`import {name}` resolves to the repository: {origin}"


def test_transformers_model_classes_import_with_kernels_resolved_outside():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401  (the classes the fixtures use)

    assert not _inside_repo(transformers.__file__)
    spec = importlib.util.find_spec("kernels")
    # Hugging Face's kernels package is not a test dependency: absent, or from site-packages
    assert spec is None or not _inside_repo(spec.origin), spec
    loaded = sys.modules.get("kernels")
    assert loaded is None or not _inside_repo(getattr(loaded, "__file__", None)), loaded
    # our kernels come from the dllama_node namespace
    from dllama_node import kernels
    assert _inside_repo(kernels.__file__)


def test_python_m_pytest_from_the_root_keeps_the_root_off_sys_path(tmp_path):
    """`python -m pytest` (how scripts/test runs it) puts the working directory first;
    tests/conftest.py takes it out before any test imports."""
    probe = REPO_ROOT / "tests" / f"test_zz_probe_{os.getpid()}.py"
    probe.write_text("import importlib.util, pathlib, sys\n"
                     "def test_probe():\n"
                     "    spec = importlib.util.find_spec('kernels')\n"
                     f"    assert spec is None or not spec.origin or not spec.origin.startswith({str(REPO_ROOT)!r} + '/kernels')\n"
                     f"    assert {str(REPO_ROOT)!r} not in [str(pathlib.Path(e or '.').resolve()) for e in sys.path]\n")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(probe.relative_to(REPO_ROOT))], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
