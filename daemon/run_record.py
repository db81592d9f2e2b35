"""The record of this run, kept on disk so that the next start can tell how it ended.

A process killed by the OOM killer cannot say why it died; its next start can, if it knows
what the dead run was doing. Each start writes state_dir/last-run.json (node, pid, boot,
then its phase, its plan's numbers and the memory watch's last sample as they change) and a
clean shutdown marks it finished. start_run reads the previous run's record first: one not
marked finished is judged (daemon/oom_diagnosis.judge_previous_run, which looks for the
kernel's OOM kill of the old pid) and journaled as a previous_exit or oom_diagnosis event.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple

from dllama_node.common.memory import read_text

from .journal import log_event
from .kernel_log import OomKill, kernel_oom_kills
from .memory_watch import MemorySample
from .oom_diagnosis import Diagnosis, MemoryFacts, judge_previous_run

log = logging.getLogger(__name__)

RUN_RECORD_FILE = "last-run.json"


def boot_id() -> str:
    return read_text("/proc/sys/kernel/random/boot_id").strip()


@dataclass
class RunRecord:
    """What a node writes about its run, for the next start to judge how it ended."""

    node_id: str
    pid: int
    boot_id: str
    started_at: float
    phase: str = "starting"
    planned_bytes: Optional[int] = None          # the fields of MemoryFacts, flat for the JSON
    available_bytes: Optional[int] = None
    last_available_bytes: Optional[int] = None
    last_rss_bytes: Optional[int] = None
    max_seq_len: Optional[int] = None
    kv_bytes_per_token: Optional[int] = None
    clean_exit: bool = False
    ended_at: Optional[float] = None
    exit_status: Optional[int] = None
    path: str = field(default="", repr=False, compare=False)

    @classmethod
    def load(cls, path: str) -> Optional["RunRecord"]:
        try:
            with open(path) as f:
                data = json.load(f)
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "path"}
            return cls(**known, path=path)
        except (OSError, ValueError, TypeError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("ignoring the unreadable run record %s: %s", path, e)
            return None

    def save(self) -> None:
        """Atomically (write, fsync, rename): a record is whole or absent after a crash."""
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        tmp = f"{self.path}.tmp"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @property
    def memory(self) -> MemoryFacts:
        return MemoryFacts(**{name: getattr(self, name) for name in MemoryFacts.__dataclass_fields__})

    def update(self, *, phase: Optional[str] = None, sample: Optional[MemorySample] = None,
               **plan: Optional[int]) -> None:
        """Record a new phase, the last memory sample, and plan numbers (planned_bytes,
        available_bytes the plan counted on, max_seq_len, kv_bytes_per_token); written at once."""
        if phase is not None:
            self.phase = phase
        if sample is not None:
            self.last_available_bytes, self.last_rss_bytes = sample.available_bytes, sample.rss_bytes
        for name, value in plan.items():
            if name not in ("planned_bytes", "available_bytes", "max_seq_len", "kv_bytes_per_token"):
                raise TypeError(f"RunRecord.update: unknown field {name}")
            setattr(self, name, value)
        self.save()

    def finish(self, exit_status: int = 0) -> None:
        """Mark the run as ended on purpose (call on a clean shutdown)."""
        self.clean_exit, self.ended_at, self.exit_status = True, time.time(), exit_status
        self.save()


def start_run(state_dir: str, node_id: str,
              read_kills: Callable[[float], List[OomKill]] = kernel_oom_kills
              ) -> Tuple[RunRecord, Optional[Diagnosis]]:
    """At start: judge the previous run (logging a previous_exit / oom_diagnosis event when it
    ended badly) and write this run's record. Returns (this run's record, the diagnosis)."""
    path = os.path.join(state_dir, RUN_RECORD_FILE)
    current_boot = boot_id()
    diagnosis = judge_previous_run(RunRecord.load(path), current_boot, read_kills)
    if diagnosis is not None:
        kind = "oom_diagnosis" if diagnosis.kind == "oom_killed" else "previous_exit"
        log_event(kind, f"previous run: {diagnosis.message}", logger=log, **diagnosis.fields())
    record = RunRecord(node_id, os.getpid(), current_boot, time.time(), path=path)
    record.save()
    return record, diagnosis
