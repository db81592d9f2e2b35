"""daemon.resources: mlock and nice, with three personas run as real processes.

root (CAP_IPC_LOCK, CAP_SYS_NICE), a plain user (nobody: RLIMIT_MEMLOCK binds, nice is
refused) and a plain user with the ambient capabilities a unit's AmbientCapabilities= gives.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from dllama_node.daemon.resources import (CAP_IPC_LOCK, CAP_SYS_NICE, PAGE_BYTES, _memlock_refusal,
                                          has_capability, lock_memory, memlock_limit_bytes,
                                          page_ranges, raise_priority, region_span, unlock_memory)

from tests.as_user import AS_NOBODY, python_for_nobody

HELPER = os.path.join(os.path.dirname(__file__), "daemon_helper.py")
P = PAGE_BYTES


def test_page_ranges_align_and_merge():
    spans = [(10 * P + 5, 10), (3 * P, 2 * P), (4 * P + 1, P), (20 * P, 0), (7 * P, 1)]
    assert page_ranges(spans) == [(3 * P, 6 * P), (7 * P, 8 * P), (10 * P, 11 * P)]
    assert page_ranges([]) == []


def test_region_spans():
    a = np.zeros((4, 6), np.float32)
    base = a.ctypes.data
    assert region_span(a) == (base, a.nbytes)
    assert region_span(a[1:3, 2:4]) == (base + 1 * 24 + 8, 24 + 8)       # rows 1-2, cols 2-3
    assert region_span(a[::-1]) == (base, a.nbytes)                      # negative stride
    assert region_span(a[:0]) == (base, 0)
    assert region_span((123, 456)) == (123, 456)
    buf = bytearray(1000)
    assert region_span(buf)[1] == 1000
    with mmap.mmap(-1, 3 * P) as mm:
        assert region_span(mm)[1] == 3 * P


def test_capability_parsing():
    status = "Name:\tx\nCapEff:\t0000000000804000\n"
    assert has_capability(CAP_IPC_LOCK, status) and has_capability(CAP_SYS_NICE, status)
    assert not has_capability(21, status)          # CAP_SYS_ADMIN
    assert not has_capability(CAP_IPC_LOCK, "CapEff:\t0000000000000000\n")


def test_refusal_texts_name_the_numbers_and_the_fix():
    reason, fix = _memlock_refusal(errno.ENOMEM, 1 << 30, 8 << 20, has_cap=False)
    assert "1.0 GiB (1073741824 bytes)" in reason and "8.0 MiB (8388608 bytes)" in reason
    assert "lacks CAP_IPC_LOCK" in reason
    assert "LimitMEMLOCK=infinity" in fix and "AmbientCapabilities=CAP_IPC_LOCK" in fix
    reason, fix = _memlock_refusal(errno.ENOMEM, 1 << 30, -1, has_cap=True)
    assert "too little free RAM" in reason and "unlimited" in reason and "--max-seq-len" in fix


def test_lock_and_unlock_a_small_array_in_process():
    limit = memlock_limit_bytes()
    if 0 <= limit < (1 << 20) and not has_capability(CAP_IPC_LOCK):
        pytest.skip(f"RLIMIT_MEMLOCK is {limit} bytes here, below the 1 MiB this test locks")
    a = np.ones(1 << 20, np.uint8)
    result = lock_memory([a, a[10:20]])
    try:
        assert result.ok and result.errno == 0
        assert result.requested_bytes == result.locked_bytes
        assert (1 << 20) <= result.locked_bytes <= (1 << 20) + 2 * P
    finally:
        unlock_memory(result)


def test_nothing_to_lock():
    result = lock_memory([np.zeros(0, np.uint8)])
    assert result.ok and result.requested_bytes == 0


def test_priority_bounds():
    with pytest.raises(ValueError, match="outside"):
        raise_priority(-21)


def test_priority_already_lower_is_a_no_op():
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if now == 19:
        pytest.skip("already at the lowest priority")
    result = raise_priority(19)
    assert result.ok and result.nice == now and result.errno == 0


# ---------------------------------------------------------------- personas

BIG_BYTES = 64 << 20
NICE = -5
PERSONAS = {
    "root": [],
    "user": AS_NOBODY,
    "user+caps": AS_NOBODY + ["--inh-caps=+ipc_lock,+sys_nice", "--ambient-caps=+ipc_lock,+sys_nice"],
}


def _persona_skip_reason() -> str:
    if os.geteuid() != 0:
        return "needs root to switch personas"
    if not shutil.which("setpriv"):
        return "needs setpriv (util-linux)"
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= BIG_BYTES:
        return f"RLIMIT_MEMLOCK ({soft}) is not below the {BIG_BYTES} bytes a refusal needs"
    return ""


@pytest.fixture(scope="module")
def personas():
    reason = _persona_skip_reason()
    if reason:
        pytest.skip(reason)
    # in /tmp itself: pytest's own temporary folders are root's, mode 0700
    workdir = Path(tempfile.mkdtemp(prefix="dllama-as-nobody-"))
    try:        # a checkout nobody cannot read (under a 0700 home) gets a readable copy
        python, env = python_for_nobody(HELPER, workdir, "import dllama_node.daemon.resources")
        out = {}
        for name, prefix in PERSONAS.items():
            proc = subprocess.run(prefix + python + ["persona", str(BIG_BYTES), str(NICE)],
                                  capture_output=True, text=True, timeout=60, cwd="/",
                                  env={**os.environ, **env})
            assert proc.returncode == 0, proc.stderr
            out[name] = dict(json.loads(proc.stdout), stderr=proc.stderr)
    except LookupError as e:
        pytest.skip(str(e))
    finally:
        shutil.rmtree(workdir)
    return out


def test_root_locks_and_raises_priority(personas):
    r = personas["root"]
    assert r["uid"] == 0
    assert r["big"]["ok"] and r["big"]["has_cap_ipc_lock"] and r["big"]["locked_bytes"] >= BIG_BYTES
    assert r["vm_lck_kib"] * 1024 >= BIG_BYTES + (1 << 20)      # the kernel's own count
    assert r["priority"]["ok"] and r["priority"]["nice"] == NICE
    assert r["worker_nice"] == NICE                # a thread started before the call follows too


def test_plain_user_gets_the_fixes(personas):
    u = personas["user"]
    assert u["uid"] == 65534
    assert u["small"]["ok"]                       # under RLIMIT_MEMLOCK: allowed without privileges
    big = u["big"]
    assert not big["ok"] and big["locked_bytes"] == 0 and big["errno_name"] in ("ENOMEM", "EPERM")
    limit = memlock_limit_bytes()
    assert big["limit_bytes"] == limit and big["requested_bytes"] >= BIG_BYTES
    assert f"{big['requested_bytes']} bytes" in big["reason"] and f"{limit} bytes" in big["reason"]
    assert "LimitMEMLOCK=infinity" in big["fix"] and "AmbientCapabilities=CAP_IPC_LOCK" in big["fix"]
    assert u["vm_lck_kib"] * 1024 <= (1 << 20) + 2 * P   # the refused lock left nothing locked
    prio = u["priority"]
    assert not prio["ok"] and prio["errno_name"] in ("EACCES", "EPERM") and prio["nice"] == prio["previous_nice"]
    assert u["worker_nice"] == prio["previous_nice"]
    assert "CAP_SYS_NICE" in prio["reason"]
    assert f"Nice={NICE}" in prio["fix"] and "AmbientCapabilities=CAP_SYS_NICE" in prio["fix"]
    # Both refusals reached the log as events, with the numbers.
    assert "[EVENT=memlock_refused PHASE=lock" in u["stderr"] and f"LIMIT_BYTES={limit}" in u["stderr"]
    assert "[EVENT=priority_refused" in u["stderr"]


def test_user_with_ambient_capabilities(personas):
    c = personas["user+caps"]
    assert c["uid"] == 65534
    assert c["big"]["ok"] and c["big"]["has_cap_ipc_lock"]
    assert c["vm_lck_kib"] * 1024 >= BIG_BYTES
    assert c["priority"]["ok"] and c["priority"]["nice"] == NICE and c["priority"]["has_cap_sys_nice"]
    assert c["worker_nice"] == NICE
    assert "refused" not in c["stderr"]
