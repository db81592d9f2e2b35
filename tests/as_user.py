"""Run a few lines as another user inside the test process: effective uid and gid only.

Tests that check what a plain user is refused (a key file of root's, the kernel log)
used to start a child process as nobody, which must then import dllama_node from the
checkout: impossible where the checkout sits under a home of mode 0700. Switching only
the effective ids needs no import and no readable checkout. The kernel checks files
against the effective ids, and a change of the effective uid from 0 clears the effective
capabilities (capabilities(7)), so the lines run with a plain user's rights; the saved
uid stays 0 and everything is restored on exit. The switch is process-wide: keep the
block short and free of other threads' work.

Where a whole process must be another user's (ambient capabilities, nice, mlock limits),
python_for_nobody() gives a child an interpreter and a copy of the package it can read.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
NOBODY_UID = 65534
NOGROUP_GID = 65534


@contextmanager
def effective_user(uid: int = NOBODY_UID, gid: int = NOGROUP_GID) -> Iterator[None]:
    if os.geteuid() != 0:
        raise PermissionError("effective_user needs root")
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


# ---- a whole process as another user -----------------------------------------------------

AS_NOBODY = ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOGROUP_GID}", "--clear-groups"]
SOURCE_PACKAGES = ("common", "model", "kernels", "tokenizer", "engine", "plan", "cluster",
                   "discovery", "daemon", "ctl", "api")
DEBIAN_PYTHON = "/usr/bin/python3"


def python_for_nobody(script: str, workdir: Path, probe: str) -> Tuple[List[str], Dict[str, str]]:
    """(argv prefix running `script`, extra environment) for a child process of user nobody
    that imports dllama_node (`probe`: an import it must manage).

    This interpreter, where nobody can read the checkout and its .venv. Otherwise (a clone
    under a home of mode 0700) Debian's python3 with its numpy, over a readable copy of the
    package's sources and compiled modules in `workdir`, and of `script`. Raises
    LookupError with the reason when neither works."""
    def works(argv, env) -> subprocess.CompletedProcess:
        return subprocess.run(AS_NOBODY + argv + ["-c", probe], capture_output=True, text=True,
                              env={**os.environ, **env}, cwd="/", timeout=60)
    here = works([sys.executable], {})
    if here.returncode == 0:
        return [sys.executable, script], {}
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        raise LookupError(f"user nobody cannot import the package here ({here.stderr.strip()[-160:]}) "
                          f"and there is no {DEBIAN_PYTHON} to run a readable copy")
    package = workdir / "dllama_node"
    for name in SOURCE_PACKAGES:
        (package / name).mkdir(parents=True, exist_ok=True)
        for source in (REPO_ROOT / name).iterdir():
            if source.suffix in (".py", ".so"):
                shutil.copy(source, package / name / source.name)
    shutil.copy(script, workdir / os.path.basename(script))
    for path in [workdir, *workdir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    env = {"PYTHONPATH": str(workdir)}
    copy = works([DEBIAN_PYTHON], env)
    if copy.returncode != 0:
        raise LookupError(f"user nobody cannot import the package here, nor a readable copy with "
                          f"{DEBIAN_PYTHON}: {copy.stderr.strip()[-200:]}")
    return [DEBIAN_PYTHON, str(workdir / os.path.basename(script))], env
