"""daemon.capacity: the node's report, its speed score and cache, CPU and NUMA parsing."""
from __future__ import annotations

import json
import os
import resource

import pytest

from dllama_node.common.memory import read_memory
from dllama_node.common.units import GiB, MiB
from dllama_node.daemon import capacity
from dllama_node.daemon.capacity import (SPEED_CACHE_FILE, SPEED_MODEL_BYTES, cpu_model, measure_capacity,
                                         parse_cpu_list, read_numa_topology, speed_cache_key, speed_score)
from dllama_node.plan.data import NodeCapacity

kernels = pytest.importorskip("dllama_node.kernels", reason="the compiled kernels are not built")

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu avx2
processor\t: 1
model name\t: AMD EPYC 7B13 64-Core Processor
"""
PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
CPU implementer\t: 0x41
CPU part\t: 0xd08
Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
ARM_CPUINFO = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd03\n"


@pytest.mark.parametrize("text, expected", [
    ("0-3,8,10-11\n", (0, 1, 2, 3, 8, 10, 11)), ("5", (5,)), ("", ()), ("\n", ()), ("0-0", (0,)),
])
def test_parse_cpu_list(text, expected):
    assert parse_cpu_list(text) == expected


def test_cpu_model_names():
    assert cpu_model(X86_CPUINFO) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_model(PI4_CPUINFO) == "Raspberry Pi 4 Model B Rev 1.4"
    assert cpu_model(ARM_CPUINFO).endswith("implementer 0x41 part 0xd03")
    assert cpu_model("")          # never empty


def _fake_node(root, index, cpulist, mem_kib):
    d = root / f"node{index}"
    d.mkdir()
    (d / "cpulist").write_text(cpulist + "\n")
    (d / "meminfo").write_text(f"Node {index} MemTotal:       {mem_kib} kB\nNode {index} MemFree: 1 kB\n")


def test_numa_topology_from_sysfs(tmp_path):
    _fake_node(tmp_path, 0, "0-3", 8 * 1024 * 1024)
    _fake_node(tmp_path, 1, "4-7", 8 * 1024 * 1024)
    _fake_node(tmp_path, 10, "8-9", 1024)
    (tmp_path / "online").write_text("0-1,10\n")          # not a node directory
    topo = read_numa_topology(str(tmp_path))
    assert topo.n_nodes == 3
    assert [n.node for n in topo.nodes] == [0, 1, 10]
    assert topo.nodes[1].cpus == (4, 5, 6, 7) and topo.nodes[0].mem_total_bytes == 8 * GiB
    assert "3 NUMA nodes" in topo.describe() and "not per NUMA node" in topo.describe()


def test_numa_topology_missing(tmp_path):
    assert read_numa_topology(str(tmp_path / "absent")).n_nodes == 0


def test_numa_topology_of_this_machine():
    topo = read_numa_topology()
    if os.path.isdir("/sys/devices/system/node/node0"):
        cpus = sorted(c for n in topo.nodes for c in n.cpus)
        assert topo.n_nodes >= 1 and len(cpus) >= len(os.sched_getaffinity(0))


def test_measure_capacity_reports_this_node(tmp_path):
    before = read_memory()
    cap = measure_capacity("b1", str(tmp_path))
    after = read_memory()
    assert isinstance(cap, NodeCapacity) and cap.node_id == "b1" and not cap.coordinator_only
    low = min(before.available_bytes, after.available_bytes) - 256 * MiB
    high = max(before.available_bytes, after.available_bytes) + 256 * MiB
    assert low <= cap.available_ram_bytes <= high
    assert cap.free_swap_bytes == pytest.approx(after.swap_free_bytes, abs=64 * MiB)
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    from dllama_node.common.process_limits import CAP_IPC_LOCK, has_capability
    unlimited = soft == resource.RLIM_INFINITY or has_capability(CAP_IPC_LOCK)
    assert cap.memlock_limit_bytes == (-1 if unlimited else soft)   # CAP_IPC_LOCK: no limit
    assert cap.cores == len(os.sched_getaffinity(0))
    # The score is bytes of q4_0 weights per second over 1 GiB: a plausible bandwidth.
    bytes_per_s = cap.speed * SPEED_MODEL_BYTES
    assert 50e6 < bytes_per_s < 2e12, bytes_per_s


def test_speed_is_cached_per_cpu_kernel_path_and_threads(tmp_path):
    speed, cached = speed_score(str(tmp_path), 1, duration_s=0.1)
    assert speed > 0 and not cached
    data = json.loads((tmp_path / SPEED_CACHE_FILE).read_text())
    key = speed_cache_key(cpu_model(), kernels.kernel_path(), 1)
    assert list(data) == [key] and data[key]["speed"] == speed
    assert kernels.kernel_path() in key and "threads=1" in key

    def no_benchmark(*args, **kwargs):
        raise AssertionError("a cached score must not run the benchmark")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(capacity, "benchmark_speed", no_benchmark)
        again, cached = speed_score(str(tmp_path), 1)
    assert cached and again == speed

    other, cached = speed_score(str(tmp_path), 2, duration_s=0.1)   # another thread count: measured
    assert not cached and len(json.loads((tmp_path / SPEED_CACHE_FILE).read_text())) == 2

    fresh, cached = speed_score(str(tmp_path), 1, refresh=True, duration_s=0.1)
    assert not cached and fresh > 0


def test_old_benchmark_versions_and_broken_caches_are_ignored(tmp_path):
    key = speed_cache_key(cpu_model(), kernels.kernel_path(), 1)
    old_key = key.replace(f"bench={capacity.BENCH_VERSION}", "bench=0")
    (tmp_path / SPEED_CACHE_FILE).write_text(json.dumps({old_key: {"speed": 1e9}}))
    speed, cached = speed_score(str(tmp_path), 1, duration_s=0.1)
    assert not cached and speed < 1e9
    (tmp_path / SPEED_CACHE_FILE).write_text("{not json")
    speed, cached = speed_score(str(tmp_path), 1, duration_s=0.1)
    assert not cached and speed > 0
    (tmp_path / SPEED_CACHE_FILE).write_text(json.dumps({key: {"speed": -1}}))
    assert speed_score(str(tmp_path), 1, duration_s=0.1)[1] is False


def test_no_state_dir_measures_every_time():
    speed, cached = speed_score(None, 1, duration_s=0.05)
    assert speed > 0 and not cached


def test_benchmark_respects_a_small_node(monkeypatch):
    """On a node with 64 MiB available the benchmark matrix takes at most 8 MiB."""
    sizes = []
    real = capacity._bench_weights

    def spy(rows, k):
        w = real(rows, k)
        sizes.append(w.nbytes)
        return w
    monkeypatch.setattr(capacity, "_bench_weights", spy)
    small = read_memory().__class__(64 * MiB, 64 * MiB, 0, None, None)
    monkeypatch.setattr(capacity, "read_memory", lambda: small)
    assert capacity.benchmark_speed(1, duration_s=0.02) > 0
    assert sizes and sizes[0] <= 8 * MiB
