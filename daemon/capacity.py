"""What this node offers a cluster: memory, swap, the locked-memory limit, cores and speed.

measure_capacity() is what a node reports before planning (a dllama_node.plan.NodeCapacity).
The speed score comes from a short benchmark of the q4_0 matvec kernel -- the operation
that dominates decoding -- over a weight matrix bigger than the caches of a small board, so
it measures what a token costs: memory bandwidth as much as arithmetic. The score reads
as tokens per second of a model holding SPEED_MODEL_BYTES (1 GiB) of q4_0 weights on this
node alone. It is cached in state_dir, keyed by CPU model, kernel path and thread count, so
a node measures once.

NUMA: the topology (/sys/devices/system/node) is reported and logged; weights are never
replicated per NUMA node (one copy, first-touch placement).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from dllama_node.common.memory import read_memory
from dllama_node.common.process_limits import lockable_bytes
from dllama_node.common.units import GiB, MiB, format_bytes
from dllama_node.plan.data import NodeCapacity

from .journal import log_event

log = logging.getLogger(__name__)

SPEED_MODEL_BYTES = 1 * GiB          # the score is tokens/s of this much q4_0 weight
BENCH_VERSION = 1                    # bump when the benchmark changes: old cache entries are ignored
BENCH_K = 4096                       # columns of the benchmark matrix (a 7B model's dim)
BENCH_WEIGHT_BYTES = 64 * MiB        # bigger than the caches (a board's 1 MiB L2, a PC's L3)
BENCH_MIN_WEIGHT_BYTES = 4 * MiB
SPEED_CACHE_FILE = "speed-cache.json"
QK = 32
Q4_0_BLOCK_BYTES = 18
Q8_0_BLOCK_BYTES = 34


# ---------------------------------------------------------------- NUMA

@dataclass(frozen=True)
class NumaNode:
    node: int
    cpus: Tuple[int, ...]
    mem_total_bytes: int


@dataclass(frozen=True)
class NumaTopology:
    nodes: Tuple[NumaNode, ...]

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def describe(self) -> str:
        if self.n_nodes <= 1:
            return "1 NUMA node" if self.nodes else "no NUMA information"
        parts = ", ".join(f"node{n.node}: {len(n.cpus)} CPUs {format_bytes(n.mem_total_bytes)}"
                          for n in self.nodes)
        return f"{self.n_nodes} NUMA nodes ({parts}); weights are held once, not per NUMA node"


def parse_cpu_list(text: str) -> Tuple[int, ...]:
    """Kernel CPU list '0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11); '' -> ()."""
    cpus = []
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return tuple(cpus)


def read_numa_topology(root: str = "/sys/devices/system/node") -> NumaTopology:
    """The NUMA nodes under root (cpulist and MemTotal of each); empty when not exposed."""
    nodes = []
    try:
        names = sorted((n for n in os.listdir(root) if n.startswith("node") and n[4:].isdigit()),
                       key=lambda n: int(n[4:]))
    except OSError:
        return NumaTopology(())
    for name in names:
        base = os.path.join(root, name)
        try:
            with open(os.path.join(base, "cpulist")) as f:
                cpus = parse_cpu_list(f.read())
        except OSError:
            cpus = ()
        mem = 0
        try:
            with open(os.path.join(base, "meminfo")) as f:
                for line in f:      # "Node 0 MemTotal:       24587412 kB"
                    if "MemTotal:" in line:
                        mem = int(line.split()[-2]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        nodes.append(NumaNode(int(name[4:]), cpus, mem))
    return NumaTopology(tuple(nodes))


# ---------------------------------------------------------------- speed

def cpu_model(cpuinfo_text: Optional[str] = None) -> str:
    """A name for this CPU: x86 'model name', else the board 'Model', else implementer/part."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ""
    fields: Dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    for key in ("model name", "Model"):
        if fields.get(key):
            return fields[key]
    if "CPU part" in fields:
        return f"{platform.machine()} implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
    return platform.machine() or "unknown"


def _bench_weights(rows: int, k: int) -> np.ndarray:
    """A q4_0 matrix (rows, k // 32 * 18) of random nibbles with a fixed, finite scale."""
    row = np.random.default_rng(0).integers(0, 256, size=(k // QK, Q4_0_BLOCK_BYTES), dtype=np.uint8)
    row[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    w = np.empty((rows, k // QK * Q4_0_BLOCK_BYTES), np.uint8)
    w[...] = row.reshape(1, -1)     # the values do not change the speed; every page is touched
    return w


def benchmark_speed(n_threads: int, duration_s: float = 0.3,
                    weight_bytes: int = BENCH_WEIGHT_BYTES) -> float:
    """Run the q4_0 matvec for about duration_s; the median rate as tokens/s of a model with
    SPEED_MODEL_BYTES of q4_0 weights. The matrix takes weight_bytes (bounded by an eighth of
    the RAM available, so a small board is not pushed into swap)."""
    from dllama_node import kernels

    k = BENCH_K
    weight_bytes = max(BENCH_MIN_WEIGHT_BYTES, min(weight_bytes, read_memory().available_bytes // 8))
    row_bytes = k // QK * Q4_0_BLOCK_BYTES
    rows = max(32, weight_bytes // row_bytes // 32 * 32)
    w = _bench_weights(rows, k)
    x = np.zeros((1, k // QK * Q8_0_BLOCK_BYTES), np.uint8)
    kernels.quantize_q8_0(np.random.default_rng(1).standard_normal((1, k), dtype=np.float32), x)
    out = np.empty((1, rows), np.float32)
    kernels.matmul(w, kernels.Q4_0, x, out, n_threads)          # warm up: page in, spin threads
    times = []
    deadline = time.perf_counter() + duration_s
    while True:
        t0 = time.perf_counter()
        kernels.matmul(w, kernels.Q4_0, x, out, n_threads)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 >= deadline and len(times) >= 3:
            break
    median_s = float(np.median(times))
    return w.nbytes / median_s / SPEED_MODEL_BYTES


def speed_cache_key(cpu: str, kernel_path: str, n_threads: int) -> str:
    return f"{cpu}|{kernel_path}|threads={n_threads}|bench={BENCH_VERSION}"


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot cache the speed score in %s: %s; it will be measured again next start",
                    path, e)


def speed_score(state_dir: Optional[str], n_threads: int, *, refresh: bool = False,
                duration_s: float = 0.3) -> Tuple[float, bool]:
    """(score, cached): from state_dir's cache when this CPU, kernel path and thread count
    were measured before, else measured now and cached."""
    from dllama_node import kernels

    key = speed_cache_key(cpu_model(), kernels.kernel_path(), n_threads)
    path = os.path.join(state_dir, SPEED_CACHE_FILE) if state_dir else None
    cache = _read_cache(path) if path else {}
    entry = cache.get(key)
    if not refresh and isinstance(entry, dict) and isinstance(entry.get("speed"), (int, float)) \
            and entry["speed"] > 0:
        return float(entry["speed"]), True
    speed = benchmark_speed(n_threads, duration_s)
    if path:
        cache[key] = {"speed": speed, "measured_at": time.time()}
        _write_cache(path, cache)
    return speed, False


# ---------------------------------------------------------------- capacity

def measure_capacity(node_id: str, state_dir: Optional[str], *, n_threads: Optional[int] = None,
                     refresh_speed: bool = False, coordinator_only: bool = False) -> NodeCapacity:
    """This node's report for the planner.

    available RAM: MemAvailable bounded by the cgroup's headroom (common.memory);
    free swap; what it may lock (common.process_limits: RLIMIT_MEMLOCK, -1 when unlimited or
    lifted by CAP_IPC_LOCK); cores this process may run on; the speed score (cached in
    state_dir; None: measured every time). Logged as a `capacity` event.
    """
    mem = read_memory()
    cores = len(os.sched_getaffinity(0))
    threads = n_threads or cores
    speed, cached = speed_score(state_dir, threads, refresh=refresh_speed)
    numa = read_numa_topology()
    cap = NodeCapacity(node_id=node_id, available_ram_bytes=mem.available_bytes,
                       free_swap_bytes=mem.swap_free_bytes, memlock_limit_bytes=lockable_bytes(),
                       cores=cores, speed=speed, coordinator_only=coordinator_only)
    lim = cap.memlock_limit_bytes
    log_event("capacity",
              f"node {node_id}: {format_bytes(cap.available_ram_bytes)} RAM available"
              + (f" (cgroup limit {format_bytes(mem.cgroup_limit_bytes)})" if mem.cgroup_limit_bytes else "")
              + f", {format_bytes(cap.free_swap_bytes)} swap free, locked-memory limit "
              + ("unlimited" if lim < 0 else format_bytes(lim))
              + f", {cores} cores, speed {speed:.2f}{' (cached)' if cached else ''}, {numa.describe()}",
              logger=log, available_bytes=cap.available_ram_bytes, swap_free_bytes=cap.free_swap_bytes,
              memlock_limit_bytes=lim, cores=cores, speed=f"{speed:.3f}", numa_nodes=numa.n_nodes)
    return cap

