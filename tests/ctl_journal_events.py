"""Writes the journal events of one node's life through the service's own code, for the
doctor tests: `python tests/ctl_journal_events.py STATE_DIR KMSG_FILE NODE`.

A plan is made (plan_table), memory runs low while loading (memory_pressure), the node
dies; at its next start daemon/run_record.py's start_run judges the previous run against the
kernel's OOM records in KMSG_FILE (captured from a real cgroup OOM kill of pid 10282) and
logs oom_diagnosis. Run under a journald (TESTING.md "systemd").
"""
from __future__ import annotations

import logging
import os
import sys
import time

from dllama_node.common.units import MiB
from dllama_node.ctl.doctor import parse_kmsg_text
from dllama_node.daemon.journal import log_event, setup_logging
from dllama_node.daemon.kernel_log import boot_wall_time, parse_oom_kills
from dllama_node.daemon.run_record import RunRecord, boot_id, start_run

KILLED_PID = 10282                  # the pid in tests/ctl_data/kmsg_cgroup_oom.txt


def main(state_dir: str, kmsg_file: str, node: str) -> None:
    setup_logging(node, logging.INFO, target="journal")
    log_event("plan_table", "node  weights  KV cache\npi-a  300 MiB  44 MiB", node=node,
              phase="planning", planned_bytes=700 * MiB)
    time.sleep(0.05)
    log_event("memory_pressure", f"node {node}: 18 MiB available while loading", node=node,
              phase="loading", available_bytes=18 * MiB)
    previous = RunRecord(node, KILLED_PID, boot_id(), time.time() - 5, phase="loading",
                         planned_bytes=52 * MiB, available_bytes=40 * MiB, max_seq_len=2048,
                         kv_bytes_per_token=8192,
                         path=os.path.join(state_dir, "last-run.json"))
    previous.save()
    with open(kmsg_file) as f:
        kills = parse_oom_kills(parse_kmsg_text(f.read()), boot_wall_time())
    time.sleep(0.05)
    record, diagnosis = start_run(state_dir, node, read_kills=lambda since: kills)
    record.finish(0)
    print(diagnosis.kind if diagnosis else "none")


if __name__ == "__main__":
    main(*sys.argv[1:4])
