"""Out of memory in the daemon: kernel records (daemon/kernel_log.py), PSI and the memory watch
(memory_watch.py), diagnoses (oom_diagnosis.py), the run record (run_record.py) -- and a real
OOM kill.

The real kill runs a child in a memory cgroup limited to 64 MiB that allocates 256 MiB while
its MemoryWatch looks on: the watch warns first, the kernel kills it, /dev/kmsg has the
record, and diagnose_exit and the next start's look at the previous run both name it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from dllama_node.common.units import GiB, MiB
from dllama_node.common.memory import read_text
from dllama_node.daemon.kernel_log import (KernelLogUnavailable, kernel_oom_kills, parse_kmsg_record,
                                           parse_oom_kills)
from dllama_node.daemon.memory_watch import (PSI_MEMORY_PATH, MemorySample, MemoryWatch, Pressure,
                                             WatchThresholds, assess, parse_psi, sample_memory)
from dllama_node.daemon.oom_diagnosis import MemoryFacts, diagnose_exit, judge_previous_run, shorter_seq_len
from dllama_node.daemon.run_record import RUN_RECORD_FILE, RunRecord, start_run
from tests.as_user import effective_user

HELPER = os.path.join(os.path.dirname(__file__), "daemon_helper.py")

# Records as this machine's kernel (6.x) wrote them for a cgroup v1 OOM kill.
CGROUP_KILL = """6,397,2483772938,-;hierarchical_memory_limit 67108864
4,380,2483772900,-;memory: usage 65536kB, limit 65536kB, failcnt 141
6,421,2483772994,-;[   4235]     0  4235    55345    17990    16320     1670         0   196608        0             0 python3
6,422,2483772998,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/dl_probe_oom,task_memcg=/dl_probe_oom,task=python3,pid=4235,uid=0
3,423,2483773026,-;Memory cgroup out of memory: Killed process 4235 (python3) total-vm:221380kB, anon-rss:65280kB, file-rss:6680kB, shmem-rss:0kB, UID:0 pgtables:192kB oom_score_adj:0
"""
# The machine ran out (Raspberry Pi OS, 6.1): no memcg limit line, no cgroup scope.
GLOBAL_KILL = """6,900,912345678,-;oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/system.slice/dllama-node.service,task=dllama-node,pid=812,uid=998
3,901,912345700,-;Out of memory: Killed process 812 (dllama-node) total-vm:1402000kB, anon-rss:1153434kB, file-rss:1024kB, shmem-rss:0kB, UID:998 pgtables:2400kB oom_score_adj:0
"""
# Kernel 4.19 style: a "Kill process ... score" line, then the "Killed process" line without a prefix.
OLD_KILL = """3,50,1000000,-;Memory cgroup out of memory: Kill process 77 (my (odd) proc) score 990 or sacrifice child
3,51,1000100,-;Killed process 77 (my (odd) proc) total-vm:1000kB, anon-rss:500kB, file-rss:4kB, shmem-rss:0kB
"""


def records(text):
    return [parse_kmsg_record(line) for line in text.strip().splitlines()]


def test_parse_kmsg_record():
    rec = parse_kmsg_record("3,423,2483773026,-;Memory cgroup out of memory\n SUBSYSTEM=x\n")
    assert (rec.level, rec.seq, rec.boot_us, rec.text) == (3, 423, 2483773026, "Memory cgroup out of memory")
    assert parse_kmsg_record("14,1,2,c;x").level == 6      # facility 1 (user) << 3 | 6
    assert parse_kmsg_record("garbage") is None
    assert parse_kmsg_record("a,b,c;x") is None


def test_parse_cgroup_kill():
    (kill,) = parse_oom_kills(records(CGROUP_KILL), boot_wall_s=1000.0)
    assert kill.pid == 4235 and kill.comm == "python3" and kill.scope == "cgroup"
    assert kill.total_vm_bytes == 221380 * 1024 and kill.anon_rss_bytes == 65280 * 1024
    assert kill.file_rss_bytes == 6680 * 1024 and kill.shmem_rss_bytes == 0
    assert kill.memcg == "/dl_probe_oom" and kill.task_memcg == "/dl_probe_oom"
    assert kill.cgroup_limit_bytes == 64 * MiB and kill.cgroup_usage_bytes == 64 * MiB
    assert kill.boot_s == pytest.approx(2483.773026) and kill.time == pytest.approx(1000 + 2483.773026)


def test_parse_global_and_old_kills():
    kills = parse_oom_kills(records(GLOBAL_KILL + OLD_KILL))
    assert [(k.pid, k.comm, k.scope) for k in kills] == [(812, "dllama-node", "global"),
                                                         (77, "my (odd) proc", "global")]
    assert kills[0].anon_rss_bytes == 1153434 * 1024 and kills[0].cgroup_limit_bytes is None
    assert kills[0].task_memcg == "/system.slice/dllama-node.service" and kills[0].time is None


def test_parse_psi():
    text = ("some avg10=12.50 avg60=3.00 avg300=0.75 total=123456\n"
            "full avg10=4.25 avg60=1.00 avg300=0.10 total=6543\n")
    assert parse_psi(text) == Pressure(12.5, 3.0, 0.75, 4.25, 1.0, 0.1)
    assert parse_psi("some avg10=1.00 avg60=0.00 avg300=0.00 total=1\n") == Pressure(some_avg10=1.0)
    assert parse_psi("") is None


def test_psi_of_this_machine():
    text = read_text(PSI_MEMORY_PATH)
    if not text:
        pytest.skip("no /proc/pressure/memory (kernel without PSI)")
    p = parse_psi(text)
    assert p is not None and 0 <= p.some_avg10 <= 100 and 0 <= p.full_avg10 <= p.some_avg10 + 1e-9


def sample(available, some=0.0, full=0.0, rss=100 * MiB):
    return MemorySample(time.time(), available, rss, None, Pressure(some_avg10=some, full_avg10=full))


def test_assess_thresholds():
    t = WatchThresholds(min_available_bytes=64 * MiB, psi_some_avg10=20.0, psi_full_avg10=5.0)
    assert assess(sample(1 * GiB), t) == []
    assert assess(sample(63 * MiB), t) == ["63 MiB available, below 64 MiB"]
    assert assess(sample(1 * GiB, some=25.0), t) == ["tasks stalled on memory 25.0% of the last 10 s"]
    assert assess(sample(1 * GiB, some=30.0, full=6.0), t) == ["all tasks stalled on memory 6.0% of the last 10 s"]
    assert assess(MemorySample(0.0, 1 * GiB, 0, None, None), t) == []


def test_memory_watch_warns_once_per_episode():
    seq = iter([sample(1 * GiB), sample(10 * MiB), sample(8 * MiB), sample(1 * GiB),
                sample(1 * GiB, full=9.0)])
    got = []
    watch = MemoryWatch("b2", on_warning=got.append, sampler=lambda: next(seq))
    watch.phase = "loading"
    results = [watch.check() for _ in range(5)]
    assert [r is not None for r in results] == [False, True, False, False, True]
    assert got == [results[1], results[4]]
    assert got[0].message.startswith("node b2 is running out of memory while loading: 10 MiB available")
    assert watch.last_sample.pressure.full_avg10 == 9.0


def test_memory_watch_thread_starts_and_stops():
    calls = threading.Event()

    def sampler():
        calls.set()
        return sample(1 * GiB)
    before = set(threading.enumerate())
    with MemoryWatch("b2", interval_s=0.01, sampler=sampler) as watch:
        assert calls.wait(5)
    assert set(threading.enumerate()) == before and watch.last_sample is not None


def test_memory_watch_survives_a_broken_sampler(caplog):
    def broken():
        raise OSError("no /proc")
    watch = MemoryWatch("b2", interval_s=0.01, sampler=broken).start()
    time.sleep(0.05)
    watch.stop()
    assert "memory watch: check failed" in caplog.text


def test_real_sampler():
    s = sample_memory()
    assert s.available_bytes > 0 and s.rss_bytes > 0


# ---------------------------------------------------------------- diagnosis

def brute_force_seq_len(planned, available, max_seq_len, kv_per_token):
    fits = [s for s in list(range(256, max_seq_len, 256)) + list(range(16, 256, 16))
            if planned - (max_seq_len - s) * kv_per_token <= available]
    return max(fits) if fits else None


@pytest.mark.parametrize("planned, available, max_seq_len, kv", [
    (1.3 * GiB, 0.9 * GiB, 4096, 131072), (1000 * MiB, 990 * MiB, 2048, 65536),
    (2 * GiB, 1 * GiB, 4096, 65536), (900 * MiB, 990 * MiB, 4096, 65536), (1 * GiB, 1 * GiB - 1, 300, 1 << 20),
    (300 * GiB + 1, 200 * GiB, 131072, 1 << 20),      # a 405B-sized node: ints, no float rounding
])
def test_shorter_seq_len(planned, available, max_seq_len, kv):
    planned, available = int(planned), int(available)
    expected = brute_force_seq_len(planned, available, max_seq_len, kv) if planned > available else None
    assert shorter_seq_len(planned, available, max_seq_len, kv) == expected


GLOBAL_OOM = parse_oom_kills(records(GLOBAL_KILL), boot_wall_s=1_700_000_000.0)


def test_diagnose_global_oom_kill_with_the_plan():
    planned, available = int(1.3 * GiB), int(0.9 * GiB)
    facts = MemoryFacts(planned_bytes=planned, available_bytes=available, max_seq_len=4096,
                        kv_bytes_per_token=131072)
    d = diagnose_exit("b2", 812, -9, GLOBAL_OOM, facts, phase="loading")
    at = time.strftime("%H:%M:%S", time.localtime(GLOBAL_OOM[0].time))
    seq = brute_force_seq_len(planned, available, 4096, 131072)
    assert d.kind == "oom_killed" and d.oom.pid == 812
    assert d.message == (f"node b2 was OOM-killed by the kernel at {at} while loading: anon-rss 1.1 GiB, "
                         f"its plan needed 1.3 GiB with 921 MiB available: use --max-seq-len {seq}, "
                         f"or add a node")
    assert d.fixes == (f"use --max-seq-len {seq}", "add a node")
    assert d.fields()["anon_rss_bytes"] == 1153434 * 1024


def test_diagnose_takes_the_planners_fixes_and_names_the_cgroup():
    kills = parse_oom_kills(records(CGROUP_KILL), boot_wall_s=0.0)
    d = diagnose_exit("b3", 4235, None, kills, fixes=["--allow-swap (swap would hold b3 200 MiB)"])
    assert "(memory cgroup limit)" in d.message
    assert "its memory cgroup /dl_probe_oom is limited to 64 MiB" in d.message
    assert d.fixes == ("--allow-swap (swap would hold b3 200 MiB)", "add a node")


def test_diagnose_oom_when_the_plan_fit():
    d = diagnose_exit("b2", 812, -9, GLOBAL_OOM, MemoryFacts(planned_bytes=500 * MiB, available_bytes=900 * MiB),
                      phase="serving")
    assert "the plan fit, so something else took the memory" in d.message


@pytest.mark.parametrize("returncode, error, kind, words", [
    (0, None, "clean", "exited cleanly while serving"),
    (5, None, "exited", "exited with status 5 (a memory plan error) while serving"),
    (-signal.SIGKILL, None, "killed", "not by the OOM killer (the kernel log has no OOM kill of pid 99)"),
    (-signal.SIGKILL, "cannot read /dev/kmsg", "killed", "unreadable (cannot read /dev/kmsg), so an OOM kill "
                                                         "cannot be confirmed; its plan needed 300 MiB with 320 MiB available, "
                                                         "40 MiB left at its last report"),
    (-signal.SIGTERM, None, "killed", "stopped by SIGTERM"),
    (-signal.SIGSEGV, None, "crashed", "crashed with SIGSEGV while serving"),
    (None, None, "unknown", "without a clean exit; the kernel log has no OOM kill of pid 99"),
])
def test_diagnose_other_endings(returncode, error, kind, words):
    facts = MemoryFacts(planned_bytes=300 * MiB, available_bytes=320 * MiB, last_available_bytes=40 * MiB)
    d = diagnose_exit("b4", 99, returncode, GLOBAL_OOM, facts, phase="serving", kernel_log_error=error)
    assert d.kind == kind and words in d.message and d.message.startswith("node b4")


# ---------------------------------------------------------------- the previous run

def test_run_record_round_trip(tmp_path):
    path = str(tmp_path / "last-run.json")
    rec = RunRecord("b2", 123, "boot-a", 1000.0, path=path)
    rec.save()
    rec.update(phase="loading", planned_bytes=5 * GiB, available_bytes=6 * GiB,
               sample=sample(3 * GiB, rss=200 * MiB))
    loaded = RunRecord.load(path)
    assert loaded == rec and loaded.memory == MemoryFacts(planned_bytes=5 * GiB, available_bytes=6 * GiB,
                                                          last_available_bytes=3 * GiB,
                                                          last_rss_bytes=200 * MiB)
    with pytest.raises(TypeError, match="unknown field"):
        rec.update(plannned_bytes=1)
    (tmp_path / "last-run.json").write_text("{broken")
    assert RunRecord.load(path) is None
    assert RunRecord.load(str(tmp_path / "absent.json")) is None


def test_judge_previous_run():
    prev = RunRecord("b2", 812, "boot-a", 1_699_999_000.0, phase="loading", planned_bytes=int(1.3 * GiB),
                     available_bytes=int(0.9 * GiB))
    assert judge_previous_run(None, "boot-a") is None
    clean = RunRecord("b2", 812, "boot-a", 0.0, clean_exit=True)
    assert judge_previous_run(clean, "boot-a", lambda since: pytest.fail("not read")) is None

    asked = []
    d = judge_previous_run(prev, "boot-a", lambda since: asked.append(since) or GLOBAL_OOM)
    assert asked == [prev.started_at] and d.kind == "oom_killed" and "while loading" in d.message

    d = judge_previous_run(prev, "boot-a", lambda since: [])
    assert d.kind == "unknown" and "no OOM kill of pid 812" in d.message

    def unreadable(since):
        raise KernelLogUnavailable("cannot read the kernel log /dev/kmsg: Operation not permitted")
    d = judge_previous_run(prev, "boot-a", unreadable)
    assert "kernel log is unreadable (cannot read the kernel log /dev/kmsg" in d.message

    d = judge_previous_run(prev, "boot-b", lambda since: pytest.fail("another boot's log is gone"))
    assert d.kind == "unknown" and "reboot or power loss" in d.message and "journalctl -k -b -1" in d.message


def test_start_run_writes_and_judges(tmp_path):
    record, diagnosis = start_run(str(tmp_path), "b2", read_kills=lambda since: [])
    assert diagnosis is None and record.pid == os.getpid() and not record.clean_exit
    # Not finished: the next start finds an unclean record of this pid with no kernel record.
    record2, diagnosis = start_run(str(tmp_path), "b2", read_kills=lambda since: [])
    assert diagnosis.kind == "unknown" and f"pid {os.getpid()}" in diagnosis.message
    record2.finish()
    assert start_run(str(tmp_path), "b2", read_kills=lambda since: [])[1] is None


# ---------------------------------------------------------------- the real kernel

def _root_only(what):
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root")


def test_kmsg_unreadable_for_a_plain_user():
    _root_only("switching to user nobody")
    if read_text("/proc/sys/kernel/dmesg_restrict").strip() != "1":
        pytest.skip("kernel.dmesg_restrict is not 1: a plain user may read the kernel log here")
    # nobody's effective ids in this process (tests/as_user.py): no child process has to
    # import the package from a checkout it may not be able to read
    with effective_user(), pytest.raises(KernelLogUnavailable) as refused:
        kernel_oom_kills()
    assert os.geteuid() == 0
    message = str(refused.value)
    assert message.startswith("cannot read the kernel log /dev/kmsg"), message
    assert "CAP_SYSLOG" in message and "dmesg_restrict=1" in message


def _memory_cgroup(name):
    """A fresh memory cgroup (v1, or v2 with the memory controller); its directory and limit file."""
    v1 = "/sys/fs/cgroup/memory"
    if os.path.isfile(os.path.join(v1, "memory.limit_in_bytes")):
        return os.path.join(v1, name), "memory.limit_in_bytes"
    if "memory" in read_text("/sys/fs/cgroup/cgroup.subtree_control").split():
        return os.path.join("/sys/fs/cgroup", name), "memory.max"
    pytest.skip("no writable memory cgroup controller (v1 memory, or v2 with memory enabled)")


def test_real_oom_kill_is_found_and_diagnosed(tmp_path):
    _root_only("a memory cgroup and /dev/kmsg")
    cgroup, limit_file = _memory_cgroup(f"dllama-test-oom-{uuid.uuid4().hex[:8]}")
    limit = 64 * MiB
    os.mkdir(cgroup)
    try:
        with open(os.path.join(cgroup, limit_file), "w") as f:
            f.write(str(limit))
        swap_limit = os.path.join(cgroup, "memory.memsw.limit_in_bytes")     # v1 with swap accounting
        if os.path.exists(swap_limit):
            with open(swap_limit, "w") as f:
                f.write(str(limit))
        procs = os.path.join(cgroup, "cgroup.procs")
        state_dir = str(tmp_path / "state")
        started = time.time()

        def enter_cgroup():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        child = subprocess.Popen([sys.executable, HELPER, "oom", state_dir, str(256 * MiB), str(limit // 3)],
                                 preexec_fn=enter_cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        out, err = child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL, (child.returncode, err)
        pid = json.loads(out.splitlines()[0])["pid"]
        assert pid == child.pid

        kills = [k for k in kernel_oom_kills(since=started) if k.pid == pid]
        assert len(kills) == 1, kernel_oom_kills(since=started)
        kill = kills[0]
        assert kill.scope == "cgroup" and kill.cgroup_limit_bytes == limit
        assert kill.memcg and kill.memcg.endswith(os.path.basename(cgroup))
        assert 32 * MiB < kill.anon_rss_bytes <= limit
        assert started - 2 <= kill.time <= time.time() + 2

        # The watch warned before the kill, and recorded the sample it warned on.
        assert "[EVENT=memory_pressure PHASE=loading AVAILABLE_BYTES=" in err, err
        assert "node b2 is running out of memory while loading" in err
        record = RunRecord.load(os.path.join(state_dir, RUN_RECORD_FILE))
        assert record.pid == pid and record.phase == "loading" and not record.clean_exit
        assert 0 < record.available_bytes <= limit            # the child saw its cgroup's limit
        assert 0 <= record.last_available_bytes < limit // 3  # ... and the watch's last sample

        d = diagnose_exit("b2", pid, child.returncode, kernel_oom_kills(since=started), record.memory,
                          phase=record.phase)
        assert d.kind == "oom_killed" and d.oom.pid == pid
        assert d.message.startswith("node b2 was OOM-killed by the kernel (memory cgroup limit) at ")
        assert "while loading: anon-rss" in d.message and "is limited to 64 MiB" in d.message
        assert "its plan needed 256 MiB with" in d.message and "left at its last report" in d.message
        assert d.message.endswith("add a node")

        # The next start of the node finds the unclean record and the kernel's record of that pid.
        nxt = subprocess.run([sys.executable, HELPER, "previous", state_dir], capture_output=True,
                             text=True, timeout=60)
        assert nxt.returncode == 0, nxt.stderr
        previous = json.loads(nxt.stdout)
        assert previous["kind"] == "oom_killed" and previous["oom_pid"] == pid
        assert "[EVENT=oom_diagnosis" in nxt.stderr and "previous run: node b2 was OOM-killed" in nxt.stderr
        oom_control = read_text(os.path.join(cgroup, "memory.oom_control"))
        if oom_control:
            assert "oom_kill 1" in oom_control
    finally:
        for _ in range(50):
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.05)
