"""scripts/setup skips itself when nothing it depends on changed (scripts/run calls it
before every command: `bash scripts/run info ...` must not spend 17 s in pip first).

Run on a copy of the files the set-up reads, with a .venv whose python is this one, so
the real .venv is left alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs dpkg-query (Debian)")


@pytest.fixture
def checkout(tmp_path) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "setup", root / "scripts" / "setup")
    for name in ("constraints.txt", "pyproject.toml", "setup.py"):
        shutil.copy(REPO_ROOT / name, root / name)
    shutil.copytree(REPO_ROOT / "kernels", root / "kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "harness"))
    for source in (REPO_ROOT / "kernels" / "src").glob("*.[ch]"):
        shutil.copy(source, root / "kernels" / "src" / source.name)
    (root / "cluster").mkdir()
    for name in ("_mesh_exchange.pyx", "mesh_exchange.h"):
        shutil.copy(REPO_ROOT / "cluster" / name, root / "cluster" / name)
    (root / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, root / ".venv" / "bin" / "python")
    return root


def setup(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/setup", *args], cwd=root, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})


def test_unchanged_inputs_skip_the_set_up(checkout):
    digest = setup(checkout, "--digest").stdout.strip()
    assert len(digest) == 16
    (checkout / ".venv" / ".setup-test").write_text(digest + "\n")
    for args in ((), ("--for", "demo")):                  # a test set-up serves the demo too
        r = setup(checkout, *args)
        assert r.returncode == 0, r.stderr
        assert "setup: .venv is up to date (set up for test" in r.stdout, r.stdout + r.stderr
        assert "pip" not in r.stdout
    assert not (checkout / ".venv" / "pip.log").exists()


def test_each_input_changes_the_digest(checkout):
    before = setup(checkout, "--digest").stdout
    for name in ("constraints.txt", "kernels/src/ops.c", "kernels/_kernels.pyx", "setup.py",
                 "cluster/_mesh_exchange.pyx", "cluster/mesh_exchange.h"):
        path = checkout / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert setup(checkout, "--digest").stdout != before, name
        path.write_bytes(original)
    assert setup(checkout, "--digest").stdout == before


def test_a_demo_set_up_does_not_count_for_the_tests(checkout):
    digest = setup(checkout, "--digest").stdout.strip()
    (checkout / ".venv" / ".setup-demo").write_text(digest + "\n")
    # a .venv python that fails at once: the set-up must get as far as its first pip call
    fake = checkout / ".venv" / "bin" / "python"
    fake.unlink()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    r = setup(checkout)
    assert "up to date" not in r.stdout
    assert r.returncode == 1 and "setup: pip install --upgrade pip" in r.stderr, r.stdout + r.stderr
