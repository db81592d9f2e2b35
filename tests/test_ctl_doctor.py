"""dllama-ctl doctor and logs: the pure checks over the three personas' facts, the OOM
history from real captured text (a cgroup OOM kill read from /dev/kmsg, and the journal
entries the service's own code wrote about it to a real journald), and, as root, the same
against a live journald in a private mount namespace."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dllama_node.cluster.auth import generate_key, write_key
from dllama_node.common import errors
from dllama_node.common.units import MiB
from dllama_node.ctl import doctor_checks as dc
from dllama_node.ctl.cli import cli
from dllama_node.ctl.doctor import parse_kmsg_text
from dllama_node.ctl.logs import format_entry, journalctl_args
from dllama_node.daemon.journal import EVENTS
from dllama_node.daemon.kernel_log import parse_oom_kills
from tests.ctl_fake_daemon import FakeDaemon

DATA = os.path.join(os.path.dirname(__file__), "ctl_data")
KMSG = os.path.join(DATA, "kmsg_cgroup_oom.txt")          # real: a 48 MiB cgroup, pid 10282
JOURNAL = os.path.join(DATA, "journal_oom.json")          # real: journald, tests/ctl_journal_events.py
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTL = os.path.join(os.path.dirname(sys.executable), "dllama-ctl")

STATUS = {"node_id": "pi-b", "state": "serving", "root_id": "pi-a", "term": 2,
          "peers": [{"node_id": "pi-a"}], "plan": None, "plan_table": None,
          "nodes": [{"node_id": "pi-b", "planned_bytes": 600 * MiB}], "last_error": ""}


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


@pytest.fixture
def config(tmp_path):
    key = tmp_path / "cluster.key"
    write_key(key, generate_key())
    path = tmp_path / "dllama-node.conf"
    path.write_text(f"key_file = {key}\nmdns = no\n")
    return path


def doctor(config, *args, status=STATUS):
    with FakeDaemon({"status": lambda r: dict(status)}) as d:
        r = runner().invoke(cli, ["--config", str(config), "doctor", "--socket", d.path,
                                  "--json", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    out = json.loads(r.stdout)
    assert out["exit_code"] == r.exit_code
    return r.exit_code, {c["name"]: c for c in out["checks"]}


# ---- the OOM history from captured text -----------------------------------------------
def test_captured_kmsg_parses_to_the_real_kill():
    with open(KMSG) as f:
        kills = parse_oom_kills(parse_kmsg_text(f.read()))
    assert len(kills) == 1
    k = kills[0]
    assert (k.pid, k.comm, k.scope) == (10282, "python", "cgroup")
    assert k.cgroup_limit_bytes == 48 * MiB and k.anon_rss_bytes == 48664 * 1024


def test_oom_kill_without_a_plan_since_fails_with_node_phase_numbers_and_fix(config):
    code, checks = doctor(config, "--journal-file", JOURNAL, "--kmsg-file", KMSG)
    assert code == errors.EXIT_MEMORY
    h = checks["OOM history"]
    assert h["level"] == "FAIL" and h["exit_code"] == errors.EXIT_MEMORY
    assert "node pi-b, phase loading" in h["summary"]
    oom_line = next(d for d in h["details"] if "oom diagnosis" in d)
    assert "node pi-b" in oom_line and "phase loading" in oom_line
    assert "rss 47.5 MiB" in oom_line and "cgroup limit 48.0 MiB" in oom_line
    assert "its plan needed 52 MiB with 40 MiB available" in oom_line
    assert "use --max-seq-len 512" in oom_line
    assert any("memory pressure" in d and "available 18.0 MiB" in d for d in h["details"])
    # the kernel's record is explained by the diagnosis of the same pid: not listed twice
    assert not any("kernel oom kill" in d for d in h["details"])
    assert "max_seq_len" in h["fix"] and "node" in h["fix"] and "quantization" in h["fix"]
    assert checks["service"]["level"] == "OK" and checks["peers"]["level"] == "OK"


def test_a_plan_after_the_kill_makes_it_history(config, tmp_path):
    entries = [json.loads(l) for l in open(JOURNAL)]
    later = dict(entries[0], __REALTIME_TIMESTAMP=str(int(entries[-1]["__REALTIME_TIMESTAMP"])
                                                      + 10_000_000))
    path = tmp_path / "journal.json"
    path.write_text("\n".join(json.dumps(e) for e in entries + [later]) + "\n")
    code, checks = doctor(config, "--journal-file", str(path), "--kmsg-file", KMSG)
    assert code == 0
    assert checks["OOM history"]["level"] == "WARN"
    assert "a plan was made since" in checks["OOM history"]["summary"]


def test_kernel_kill_of_the_service_without_a_diagnosis(config, tmp_path):
    """Only the kernel knows: the kill's pid is one that wrote the service's journal."""
    plan = json.loads(open(JOURNAL).readline())
    plan["_PID"] = "10282"
    plan["__REALTIME_TIMESTAMP"] = "1"                    # long before the kill
    path = tmp_path / "journal.json"
    path.write_text(json.dumps(plan) + "\n")
    code, checks = doctor(config, "--journal-file", str(path), "--kmsg-file", KMSG)
    assert code == errors.EXIT_MEMORY
    line = next(d for d in checks["OOM history"]["details"] if "kernel oom kill" in d)
    assert "node pi-b" in line and "rss 47.5 MiB" in line and "cgroup limit 48.0 MiB" in line


def test_kill_of_another_process_is_a_warning(config, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    code, checks = doctor(config, "--journal-file", str(empty), "--kmsg-file", KMSG)
    assert code == 0
    h = checks["OOM history"]
    assert h["level"] == "WARN"
    assert any("pid 10282 (python)" in d and "limit 48.0 MiB" in d for d in h["details"])


def test_no_history_is_ok(config, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    code, checks = doctor(config, "--journal-file", str(empty), "--kmsg-file", str(empty))
    assert checks["OOM history"]["level"] == "OK"
    assert code == 0, checks


# ---- the other checks through the command -----------------------------------------------
def test_service_down_and_no_key_fail_as_cluster_errors(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text(f"key_file = {tmp_path / 'absent.key'}\nmdns = no\n")
    empty = tmp_path / "empty"
    empty.write_text("")
    r = runner().invoke(cli, ["--config", str(conf), "doctor", "--socket",
                              str(tmp_path / "none.sock"), "--journal-file", str(empty),
                              "--kmsg-file", str(empty)])
    assert r.exit_code == errors.EXIT_CLUSTER
    lines = r.stdout.splitlines()
    service = next(l for l in lines if l.split()[1:2] == ["service"])
    assert service.startswith("FAIL") and "not reachable" in service
    assert any(l.startswith("FAIL") and "cluster key" in l and "does not exist" in l
               for l in lines)
    assert "fix: sudo dllama-ctl key generate" in r.stdout
    assert "this shell (the service is not running)" in r.stdout
    assert lines[-1].startswith("2 FAIL")


def test_tokenizer_check_on_the_configured_model(tmp_path, config):
    from dllama_node.model.generate import PRESETS, write_random_model
    from dllama_node.tokenizer.dllama_t import write_dllama_t
    model = str(tmp_path / "tiny.gguf")
    write_random_model(model, PRESETS["tiny"], weight_type="q8_0", seed=1)
    empty = tmp_path / "empty"
    empty.write_text("")
    base = config.read_text()
    config.write_text(base + f"model = {model}\n")
    code, checks = doctor(config, "--journal-file", str(empty), "--kmsg-file", str(empty))
    assert checks["tokenizer"]["level"] == "OK", checks["tokenizer"]
    assert "round trip ok" in checks["tokenizer"]["summary"]
    t = str(tmp_path / "other.t")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [bytes([65 + i % 26]) * (1 + i // 26)
                                            for i in range(500)]
    write_dllama_t(t, tokens, [0.0] * len(tokens), bos_id=1, eos_ids=[2])
    config.write_text(base + f"model = {model}\ntokenizer = {t}\n")
    code, checks = doctor(config, "--journal-file", str(empty), "--kmsg-file", str(empty))
    assert code == errors.EXIT_TOKENIZER
    assert checks["tokenizer"]["level"] == "FAIL" and "503" in checks["tokenizer"]["summary"]


def test_limits_are_those_of_the_process_behind_the_socket(config, tmp_path):
    """The fake daemon runs in this process: SO_PEERCRED gives this pid."""
    empty = tmp_path / "empty"
    empty.write_text("")
    code, checks = doctor(config, "--journal-file", str(empty), "--kmsg-file", str(empty))
    assert f"the service (pid {os.getpid()})" in checks["locked memory"]["summary"]
    assert "this node's slice needs 600.0 MiB" in checks["locked memory"]["summary"]


# ---- pure checks: three personas ---------------------------------------------------------
def facts(uid=1000, limit=8 * MiB, ipc=False, nice_cap=False, nice=0):
    return dc.ProcessFacts("the service (pid 9)", uid, limit, ipc, nice_cap, nice)


@pytest.mark.parametrize("p, need, level", [
    (facts(limit=-1), 600 * MiB, "OK"),                    # LimitMEMLOCK=infinity
    (facts(ipc=True), 600 * MiB, "OK"),                    # ambient CAP_IPC_LOCK
    (facts(), 600 * MiB, "WARN"),                          # a plain user: 8 MiB
    (facts(), 4 * MiB, "OK"),                              # small enough anyway
    (facts(), None, "WARN"),
])
def test_memlock_personas(p, need, level):
    c = dc.check_memlock(p, need)
    assert c.level == level
    if level == "WARN":
        assert "LimitMEMLOCK=infinity" in c.fix and "CAP_IPC_LOCK" in c.fix
        assert "8.0 MiB" in c.summary


def test_priority_personas():
    assert dc.check_priority(facts(nice=-10), -10).level == "OK"
    assert dc.check_priority(facts(uid=0), -10).level == "OK"
    assert dc.check_priority(facts(nice_cap=True), -10).level == "OK"
    c = dc.check_priority(facts(), -10)
    assert c.level == "WARN" and "CAP_SYS_NICE" in c.fix and "uid 1000" in c.summary


def test_parsers_of_proc_files():
    limits = ("Limit                     Soft Limit           Hard Limit           Units\n"
              "Max locked memory         8388608              8388608              bytes\n")
    assert dc.parse_limits_memlock(limits) == 8 * MiB
    assert dc.parse_limits_memlock(limits.replace("8388608 ", "unlimited ", 1)) == -1
    stat = "812 (dllama node) S 1 812 812 0 -1 4194560 1 0 0 0 5 3 0 0 30 10 9 0"
    assert dc.parse_stat_nice(stat) == 10


def test_swap_memory_and_peers_checks():
    assert dc.check_swap(0, 0, False).level == "OK"
    assert dc.check_swap(0, 0, True).level == "WARN"
    assert "not locked" in dc.check_swap(1 << 30, 1 << 29, True).summary
    c = dc.check_memory(4 << 30, 3 << 30, 1 << 30, 1536 * MiB)
    assert c.level == "FAIL" and c.exit_code == errors.EXIT_MEMORY and "MemoryMax=" in c.fix
    assert dc.check_memory(4 << 30, 3 << 30, None, 1536 * MiB).level == "OK"
    assert dc.check_peers({"peers": []}, (), True, None).level == "WARN"
    assert "static_peers" in dc.check_peers({"peers": []}, (), True, None).fix
    assert dc.check_peers(None, (), True, ["pi-a"]).level == "OK"
    assert dc.check_peers(None, (), True, []).level == "WARN"
    assert dc.exit_code_of([dc.Check("a", "WARN", ""), dc.Check("b", "FAIL", "", "", 6),
                            dc.Check("c", "FAIL", "", "", 5)]) == 6


# ---- logs ---------------------------------------------------------------------------------
def test_logs_arguments():
    args = journalctl_args(follow=True, lines=20, oom=False, since="-1h")
    assert args[:2] == ["-o", "json"] and "-f" in args and ["-n", "20"] == args[-4:-2]
    assert "-u" in args and "dllama-node" in args and "--since=-1h" in args
    fields = next(a for a in args if a.startswith("--output-fields="))
    for f in ("NODE", "PHASE", "PLANNED_BYTES", "AVAILABLE_BYTES"):
        assert f in fields
    oom = journalctl_args(False, None, True, None)
    assert "-u" not in oom
    assert f"MESSAGE_ID={EVENTS['oom_diagnosis'].message_id}" in oom


def test_logs_format_the_captured_journal():
    r = runner().invoke(cli, ["logs", "--journal-file", JOURNAL])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    assert "pi-b INFO node  weights  KV cache (+1 lines)" in lines[0]
    assert "PHASE=planning" in lines[0]
    assert "WARNING" in lines[1] and "AVAILABLE=18.0 MiB" in lines[1]
    assert "ERR previous run: node pi-b was OOM-killed" in lines[2]
    assert "ANON_RSS=47.5 MiB" in lines[2] and "CGROUP_LIMIT=48.0 MiB" in lines[2]
    assert "PID=10282" in lines[2] and "EVENT=oom_diagnosis" in lines[2]


def test_format_entry_tolerates_odd_fields():
    line = format_entry({"MESSAGE": [104, 105], "PRIORITY": "x", "PLANNED_BYTES": "lots"})
    assert line.endswith("- - hi [PLANNED=lots]")


# ---- a real journald ------------------------------------------------------------------
JOURNALD = "/lib/systemd/systemd-journald"


@pytest.mark.skipif(os.geteuid() != 0, reason="a private journald needs root (mount, unshare)")
@pytest.mark.skipif(not os.path.exists(JOURNALD) or shutil.which("journalctl") is None,
                    reason="systemd-journald is not installed")
def test_doctor_and_logs_read_a_real_journald(tmp_path, config):
    """The service's code writes the events to a journald in a private mount namespace;
    doctor and logs read them back with journalctl, as on a board."""
    state = tmp_path / "state"
    state.mkdir()
    out = tmp_path / "out"
    script = f"""
set -e
mount -t tmpfs tmpfs /run; mkdir -p /var/log/journal; mount -t tmpfs tmpfs /var/log/journal
mkdir -p /run/systemd/journal; {JOURNALD} & JPID=$!
for i in $(seq 50); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
cd {HERE}
{sys.executable} tests/ctl_journal_events.py {state} {KMSG} pi-b > {out}.events
sleep 0.3
set +e
{CTL} --config {config} doctor --socket /nonexistent.sock --kmsg-file {KMSG} --json \
    > {out}.doctor; echo $? > {out}.rc
{CTL} logs --oom > {out}.logs 2> {out}.logs.err
kill $JPID
"""
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert open(f"{out}.events").read().strip() == "oom_killed"
    rc = int(open(f"{out}.rc").read())
    report = json.loads(open(f"{out}.doctor").read())
    checks = {c["name"]: c for c in report["checks"]}
    h = checks["OOM history"]
    assert h["level"] == "FAIL", h
    assert "journal since -7d" in h["summary"]
    assert any("oom diagnosis" in d and "node pi-b" in d and "phase loading" in d
               and "use --max-seq-len 512" in d for d in h["details"])
    assert checks["service"]["level"] == "FAIL"                   # no service here
    assert rc == errors.EXIT_CLUSTER                              # the first FAIL: service
    logs = open(f"{out}.logs").read().splitlines()
    assert any("OOM-killed" in l and "ANON_RSS=47.5 MiB" in l and "PID=10282" in l
               for l in logs), logs
    assert any("memory_pressure" in l for l in logs)
    assert not any("plan_table" in l for l in logs)               # --oom: memory events only
