"""The README's two commands on a fresh machine: bench/fresh_machine.sh clones this
checkout's HEAD into a bookworm minbase root file system (no Python, no compiler) and runs
there
- `bash scripts/run`: the set-up installs what the demo needs from Debian's and PyPI's
  registries, builds the kernels, and the demo answers with three daemons in network
  namespaces;
- `bash scripts/setup` (what `bash scripts/test` starts with): every test dependency is
  installed at its pinned version and imports, transformers' model classes among them,
  with no folder of the repository shadowing an installed package.
The times printed are reported, not asserted (bench/, not a timed test)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests import debian_helpers as dh

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dh.is_root(), reason="needs root (chroot, mounts, namespaces)"),
    pytest.mark.skipif(bool(dh.missing_tools("debootstrap", "unshare", "git")),
                       reason="needs debootstrap, unshare and git"),
]


def fresh_machine(mode: str) -> str:
    r = subprocess.run(["bash", str(ROOT / "bench" / "fresh_machine.sh"), mode], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, TERM="dumb"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "0 of python3, gcc present" in out           # it really was fresh
    return out


def test_scripts_run_on_a_fresh_bookworm(record_property):
    out = fresh_machine("run")
    assert "setup: installing Debian packages: build-essential python3-dev python3-venv" in out
    assert "setup: kernels built, path" in out
    # the demo itself: three boards, the loads, the plan, and a story
    assert re.search(r"board\d\s+root\s+loaded\s+\[#+\] 100%", out), out[-4000:]
    assert len(re.findall(r"^board\d\s+worker\s+loaded\s+\[#+\] 100%", out, re.M)) == 2
    assert "total   3 nodes" in out
    story = next(line for line in out.splitlines() if line.startswith("Once upon a time"))
    assert len(story.split(". ")) >= 5 and "dragon" in story
    took = re.search(r"on a fresh machine: exit 0, (\d+) s in all", out)
    assert took, out[-2000:]
    record_property("fresh_machine_demo_s", int(took.group(1)))
    print(f"\nbash scripts/run on a fresh bookworm: {took.group(1)} s, set-up included")


def test_scripts_setup_on_a_fresh_bookworm(record_property):
    out = fresh_machine("setup")
    assert "setup: installing Debian packages: build-essential" in out
    assert "setup: .venv: torch (CPU) and the test tools" in out
    assert "setup: kernels built, path" in out
    # test_setup_pins (pins, imports) and test_import_paths (no shadowing) passed there
    summary = re.search(r"^(\d+) passed", out, re.M)
    assert summary and int(summary.group(1)) >= 20 and " failed" not in out, out[-4000:]
    took = re.search(r"bash scripts/setup on a fresh machine: exit 0, (\d+) s in all", out)
    assert took, out[-2000:]
    record_property("fresh_machine_setup_s", int(took.group(1)))
    print(f"\nbash scripts/setup on a fresh bookworm: {took.group(1)} s, then {summary.group(0)}")
