"""Run a few lines as another user inside the test process: effective uid and gid only.

Tests that check what a plain user is refused (a key file of root's, the kernel log)
used to start a child process as nobody, which must then import dllama_node from the
checkout: impossible where the checkout sits under a home of mode 0700. Switching only
the effective ids needs no import and no readable checkout. The kernel checks files
against the effective ids, and a change of the effective uid from 0 clears the effective
capabilities (capabilities(7)), so the lines run with a plain user's rights; the saved
uid stays 0 and everything is restored on exit. The switch is process-wide: keep the
block short and free of other threads' work.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

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
