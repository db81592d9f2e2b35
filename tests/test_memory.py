from dllama_node.common.memory import (MemoryReading, parse_cgroup_paths, parse_limit,
                                       parse_meminfo, read_memory)

MEMINFO = """MemTotal:       24000000 kB
MemFree:         1000000 kB
MemAvailable:   20000000 kB
SwapFree:              0 kB
"""


def test_meminfo_in_bytes():
    info = parse_meminfo(MEMINFO)
    assert info["MemAvailable"] == 20000000 * 1024
    assert info["MemTotal"] == 24000000 * 1024


def test_cgroup_v1_and_v2_paths():
    v1 = "12:memory:/dllama/node1\n11:cpu,cpuacct:/\n0::/"
    assert parse_cgroup_paths(v1)["memory"] == "/dllama/node1"
    assert parse_cgroup_paths("0::/system.slice/dllama-node.service")[""] == \
        "/system.slice/dllama-node.service"


def test_limits():
    assert parse_limit("max\n") is None
    assert parse_limit("9223372036854771712\n") is None   # v1 "unlimited"
    assert parse_limit("1073741824\n") == 1 << 30
    assert parse_limit(str(5 * (1 << 40))) == 5 * (1 << 40)  # 5 TiB: no 32-bit anywhere


def test_available_is_bounded_by_the_cgroup():
    r = MemoryReading(24 << 30, 20 << 30, 0, cgroup_limit_bytes=1 << 30,
                      cgroup_usage_bytes=300 << 20)
    assert r.available_bytes == (1 << 30) - (300 << 20)
    r = MemoryReading(24 << 30, 20 << 30, 0, None, None)
    assert r.available_bytes == 20 << 30


def test_reads_this_machine():
    r = read_memory()
    assert 0 < r.available_bytes <= r.mem_total_bytes
