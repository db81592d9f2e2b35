"""The memory watch: a warning while there is still time to act, before the OOM killer does.

The kernel kills without notice; the signs come earlier. This module samples available
memory (MemAvailable bounded by the cgroup, common/memory.py) and memory pressure (PSI,
/proc/pressure/memory), judges a sample against WatchThresholds with the pure assess(), and
MemoryWatch warns once per episode -- a journal event and a callback -- from a thread of its
own or from a loop that runs anyway. Its last sample is what the node reports to the root
and writes into its run record (daemon/run_record.py) for a later diagnosis.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from dllama_node.common.memory import current_rss_bytes, read_memory, read_text
from dllama_node.common.units import MiB
from dllama_node.plan.advice import have, needs

from .journal import log_event

log = logging.getLogger(__name__)

PSI_MEMORY_PATH = "/proc/pressure/memory"


@dataclass(frozen=True)
class Pressure:
    """Memory PSI: % of time some / all tasks stalled on memory, over 10, 60, 300 s."""
    some_avg10: float = 0.0
    some_avg60: float = 0.0
    some_avg300: float = 0.0
    full_avg10: float = 0.0
    full_avg60: float = 0.0
    full_avg300: float = 0.0


def parse_psi(text: str) -> Optional[Pressure]:
    """'/proc/pressure/memory' text -> Pressure; None when there is no 'some' line."""
    values = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind not in ("some", "full"):
            continue
        for pair in rest.split():
            name, _, value = pair.partition("=")
            if name in ("avg10", "avg60", "avg300"):
                values[f"{kind}_{name}"] = float(value)
    return Pressure(**values) if "some_avg10" in values else None


@dataclass(frozen=True)
class MemorySample:
    time: float
    available_bytes: int            # MemAvailable bounded by the cgroup's headroom
    rss_bytes: int                  # of this process
    cgroup_limit_bytes: Optional[int]
    pressure: Optional[Pressure]


def sample_memory(psi_path: str = PSI_MEMORY_PATH) -> MemorySample:
    mem = read_memory()
    return MemorySample(time.time(), mem.available_bytes, current_rss_bytes(), mem.cgroup_limit_bytes,
                        parse_psi(read_text(psi_path)))


@dataclass(frozen=True)
class WatchThresholds:
    min_available_bytes: int = 64 * MiB   # warn below this much memory left
    psi_some_avg10: float = 20.0          # warn when tasks stall on memory this % of the time
    psi_full_avg10: float = 5.0           # ... or all of them do


def assess(sample: MemorySample, thresholds: WatchThresholds) -> List[str]:
    """The reasons this sample is dangerous (empty: fine). Pure."""
    reasons = []
    if sample.available_bytes < thresholds.min_available_bytes:
        reasons.append(f"{have(sample.available_bytes)} available, below {needs(thresholds.min_available_bytes)}")
    p = sample.pressure
    if p is not None and p.full_avg10 >= thresholds.psi_full_avg10:
        reasons.append(f"all tasks stalled on memory {p.full_avg10:.1f}% of the last 10 s")
    elif p is not None and p.some_avg10 >= thresholds.psi_some_avg10:
        reasons.append(f"tasks stalled on memory {p.some_avg10:.1f}% of the last 10 s")
    return reasons


@dataclass(frozen=True)
class MemoryWarning:
    node_id: str
    phase: str
    reasons: Tuple[str, ...]
    sample: MemorySample

    @property
    def message(self) -> str:
        return (f"node {self.node_id} is running out of memory while {self.phase or 'running'}: "
                f"{'; '.join(self.reasons)} (rss {have(self.sample.rss_bytes)}): the OOM killer may act")


class MemoryWatch:
    """Warns once each time memory turns dangerous (again after it recovers).

    Drive it with check() from a loop that runs anyway, or start() a thread polling every
    interval_s. `phase` (loading, serving ...) goes into the warning; last_sample is what the
    node reports to the root and records for a later diagnosis.
    """

    def __init__(self, node_id: str, thresholds: WatchThresholds = WatchThresholds(),
                 on_warning: Optional[Callable[[MemoryWarning], None]] = None, interval_s: float = 1.0,
                 sampler: Callable[[], MemorySample] = sample_memory):
        self.node_id = node_id
        self.thresholds = thresholds
        self.on_warning = on_warning
        self.interval_s = interval_s
        self.sampler = sampler
        self.phase = ""
        self.last_sample: Optional[MemorySample] = None
        self._warned = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def check(self) -> Optional[MemoryWarning]:
        sample = self.sampler()
        self.last_sample = sample
        reasons = assess(sample, self.thresholds)
        if not reasons:
            self._warned = False
            return None
        if self._warned:
            return None
        self._warned = True
        warning = MemoryWarning(self.node_id, self.phase, tuple(reasons), sample)
        p = sample.pressure
        log_event("memory_pressure", warning.message, logger=log, phase=self.phase or None,
                  available_bytes=sample.available_bytes, rss_bytes=sample.rss_bytes,
                  psi_some_avg10=p.some_avg10 if p else None, psi_full_avg10=p.full_avg10 if p else None)
        if self.on_warning is not None:
            self.on_warning(warning)
        return warning

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:           # a broken reader must not kill the node
                log.exception("memory watch: check failed")
            self._stop.wait(self.interval_s)

    def start(self) -> "MemoryWatch":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "MemoryWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
