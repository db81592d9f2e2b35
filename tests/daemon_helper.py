"""A separate process for the daemon tests: `python tests/daemon_helper.py MODE [ARGS]`.

notify                     send READY/STATUS/WATCHDOG/RELOADING/STOPPING through daemon.systemd
journal TEST_RUN           log one event of each kind to the journal; print the handler used
persona BIG_BYTES NICE     lock a small and a big array, raise priority; print the results as JSON
oom STATE_DIR ALLOC WARN   start a run record, phase "loading", watch memory (warning below
                           WARN bytes available) and allocate ALLOC bytes: killed in a small cgroup
previous STATE_DIR         start a run (judging the previous one); print the diagnosis as JSON
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading

import numpy as np


def notify() -> None:
    from dllama_node.daemon import systemd

    interval = systemd.watchdog_interval_s()
    systemd.status("loading slice 3 of 4")
    systemd.ready("serving layers 0-15\nof 32")
    systemd.watchdog_ping()
    systemd.reloading()
    systemd.extend_timeout(90)
    systemd.stopping()
    print(json.dumps({"enabled": systemd.enabled(), "watchdog_interval_s": interval,
                      "pid": os.getpid()}))


def journal(test_run: str) -> None:
    from dllama_node.daemon.journal import EVENTS, log_event, setup_logging

    handler = setup_logging("b2", logging.DEBUG)
    print(type(handler).__name__)
    for kind in EVENTS:
        log_event(kind, f"event {kind} from node b2\nsecond line", test_run=test_run, phase="loading",
                  planned_bytes=1395864371, available_bytes=966367641)
    log_event("plan_table", "x" * 300_000, test_run=test_run, size="big")    # memfd path
    logging.getLogger("dllama_node.test").warning("plain record", extra={})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log_event("plan_rejected", "with a traceback", test_run=test_run, exc_info=True)


def persona(big_bytes: int, nice: int) -> None:
    from dllama_node.daemon.journal import setup_logging
    from dllama_node.daemon.resources import lock_memory, raise_priority, unlock_memory

    setup_logging("b3", logging.INFO)
    small = np.ones(1 << 20, np.uint8)             # 1 MiB: under any RLIMIT_MEMLOCK we meet
    big = np.ones(big_bytes, np.uint8)
    small_result = lock_memory([small], node_id="b3")
    big_result = lock_memory([big, big[::2], (big.ctypes.data, 4096)], node_id="b3")
    started, done = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), done.wait()))
    worker.start()
    started.wait()
    prio = raise_priority(nice, node_id="b3")
    worker_nice = os.getpriority(os.PRIO_PROCESS, worker.native_id)
    done.set()
    worker.join()
    with open("/proc/self/status") as f:
        vm_lck = next((line.split()[1] for line in f if line.startswith("VmLck:")), "0")
    unlock_memory(small_result)
    unlock_memory(big_result)
    print(json.dumps({"uid": os.getuid(), "small": small_result.to_dict(), "big": big_result.to_dict(),
                      "priority": prio.to_dict(), "worker_nice": worker_nice,
                      "vm_lck_kib": int(vm_lck)}))


def oom(state_dir: str, alloc_bytes: int, warn_below_bytes: int) -> None:
    import time

    from dllama_node.daemon.journal import setup_logging
    from dllama_node.daemon.memory_watch import MemoryWatch, WatchThresholds, sample_memory
    from dllama_node.daemon.run_record import start_run

    setup_logging("b2", logging.INFO)
    record, _ = start_run(state_dir, "b2")
    at_plan = sample_memory()       # what this node reported for the plan
    record.update(phase="loading", sample=at_plan, planned_bytes=alloc_bytes,
                  available_bytes=at_plan.available_bytes, max_seq_len=4096, kv_bytes_per_token=8192)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    # What the daemon does: watch memory while loading, keep the last warning's sample.
    watch = MemoryWatch("b2", WatchThresholds(min_available_bytes=warn_below_bytes),
                        on_warning=lambda w: record.update(sample=w.sample), interval_s=0.005)
    watch.phase = "loading"
    with watch:
        chunks = []
        for _ in range(alloc_bytes // (4 << 20)):
            chunks.append(np.ones(4 << 20, np.uint8))    # touched: really resident
            time.sleep(0.03)
    record.finish(0)                                     # not reached when the limit is below


def previous(state_dir: str) -> None:
    from dllama_node.daemon.journal import setup_logging
    from dllama_node.daemon.run_record import start_run

    setup_logging("b2", logging.INFO)
    record, diagnosis = start_run(state_dir, "b2")
    record.finish(0)
    print(json.dumps(None if diagnosis is None else {
        "kind": diagnosis.kind, "message": diagnosis.message, "fixes": list(diagnosis.fixes),
        "oom_pid": diagnosis.oom.pid if diagnosis.oom else None}))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "notify":
        notify()
    elif mode == "journal":
        journal(args[0])
    elif mode == "persona":
        persona(int(args[0]), int(args[1]))
    elif mode == "oom":
        oom(args[0], int(args[1]), int(args[2]))
    elif mode == "previous":
        previous(args[0])
    else:
        sys.exit(f"daemon_helper: unknown mode {mode}")
