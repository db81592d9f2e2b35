"""The test environment is the pinned one: every Python package in the virtual environment
that runs the tests is listed in constraints.txt at exactly the version installed, and
scripts/setup hands that file to every pip call. A package that moved on in the registry,
or one installed by hand, shows up here by name and version.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO_ROOT / "constraints.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict:
    """'name==version' lines (comments and blanks skipped) -> {canonical name: version};
    anything else is an error, so the file stays a list of exact pins."""
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s=<>!~;]+)", line)
        if not m:
            raise ValueError(f"constraints.txt line {number}: {line!r} is not an exact pin name==version")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def test_read_pins_refuses_ranges():
    assert read_pins("# c\nNumPy==2.4.6\ntyping_extensions==4.16.0  # why\n") == {
        "numpy": "2.4.6", "typing-extensions": "4.16.0"}
    with pytest.raises(ValueError, match="line 2: 'transformers>=4.40'"):
        read_pins("numpy==2.4.6\ntransformers>=4.40\n")


def test_every_test_dependency_is_pinned():
    pins = read_pins(CONSTRAINTS.read_text())
    for name in ("pytest", "transformers", "torch", "tokenizers", "gguf", "openai", "hypothesis",
                 "numpy", "cython", "pip", "setuptools"):
        assert name in pins, f"{name} is not pinned in constraints.txt"


def test_scripts_setup_installs_with_the_constraints():
    setup = (REPO_ROOT / "scripts" / "setup").read_text()
    pip_calls = [line for line in setup.splitlines() if "pip install" in line and "echo" not in line]
    assert pip_calls and all("-c constraints.txt" in line for line in pip_calls), pip_calls


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not in a virtual environment: the "
                    "pins describe .venv, made by scripts/setup")
def test_the_virtual_environment_matches_the_pins():
    pins = read_pins(CONSTRAINTS.read_text())
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("dllama-node", None)
    unpinned = {n: v for n, v in installed.items() if n not in pins}
    wrong = {n: (v, pins[n]) for n, v in installed.items() if n in pins and v != pins[n]}
    assert not unpinned, f"installed but not in constraints.txt: {unpinned}"
    assert not wrong, f"installed version differs from constraints.txt (installed, pinned): {wrong}"


# distribution name -> the module it installs, where they differ
IMPORT_NAMES = {"systemd-python": "systemd.journal", "protobuf": "google.protobuf"}


def test_every_dependency_imports():
    """Each runtime and test dependency of pyproject.toml, and torch (installed by
    scripts/setup before the project), imports in this environment."""
    import importlib
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"] + ["torch"]
    names = [canonical(re.split(r"[<>=!~;\[ ]", r, 1)[0]) for r in requirements]
    assert {"transformers", "torch", "gguf", "numpy"} <= set(names)
    failed = {}
    for name in names:
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        try:
            importlib.import_module(module)
        except ImportError as e:
            failed[name] = f"import {module}: {e}"
    assert not failed, failed
