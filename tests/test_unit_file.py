"""systemd/dllama-node.service, checked by systemd itself.

`systemd-analyze verify` exits 0 even on typos, so the tests fail on any stderr output
and read back what systemd parsed (SYSTEMD_LOG_LEVEL=debug dumps the loaded unit): a
misspelled capability or an unknown option would be dropped silently otherwise. The
hardening is read back from `systemd-analyze security --offline=true --json=short`.

The unit is verified from a copy whose ExecStart points at a stub: the real
/usr/bin/dllama-node exists only once the package is installed (the nspawn test runs
the unmodified unit under a real systemd). The man pages named in Documentation= are
the package's, found through MANPATH, so a Documentation= line without its page fails.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "dllama-node.service"
DEBIAN = ROOT / "packaging" / "debian"
EXEC = "/usr/bin/dllama-node"
# The figure systemd/README.md reports; a change to the unit that raises it fails here.
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")


@pytest.fixture(scope="module")
def unit_copy(tmp_path_factory) -> Dict[str, object]:
    """The unit with ExecStart's program replaced by an executable stub, and a MANPATH
    holding the package's man pages."""
    d = tmp_path_factory.mktemp("unit")
    stub = d / "dllama-node"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={EXEC} ") == 1
    (d / UNIT.name).write_text(text.replace(f"ExecStart={EXEC} ", f"ExecStart={stub} "))
    for page in DEBIAN.glob("*.[18]"):
        section = d / "man" / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section / page.name)
    env = dict(os.environ, MANPATH=str(d / "man"), LC_ALL="C.UTF-8")
    env.pop("SYSTEMD_LOG_LEVEL", None)
    return {"dir": d, "unit": d / UNIT.name, "env": env, "stub": stub}


def analyze(unit_copy, *args, debug=False) -> subprocess.CompletedProcess:
    env = dict(unit_copy["env"])
    if debug:
        env["SYSTEMD_LOG_LEVEL"] = "debug"
    return subprocess.run(["systemd-analyze", *args, str(unit_copy["unit"])], env=env,
                          cwd=unit_copy["dir"], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def parsed(unit_copy) -> Dict[str, List[str]]:
    """Key -> values of the unit as systemd loaded it (the debug dump's 'Key: value'
    lines from '-> Unit dllama-node.service:' on)."""
    r = analyze(unit_copy, "verify", debug=True)
    dump = r.stderr + r.stdout
    start = dump.find("-> Unit dllama-node.service:")
    assert start >= 0, dump[-2000:]
    values: Dict[str, List[str]] = {}
    last = None
    for line in dump[start:].splitlines():
        m = re.match(r"^\t\t(?:-> )?([A-Za-z][A-Za-z ]*?):\s?(.*)$", line)
        if line.startswith("\t\t\t") and last is not None:
            values[last].append(line.strip())       # e.g. ExecStart's "Command Line: ..."
        elif m:
            last = m.group(1)
            values.setdefault(last, []).append(m.group(2))
    return values


def test_verify_prints_nothing(unit_copy):
    r = analyze(unit_copy, "verify")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    assert r.stdout == ""


def test_verify_fails_on_a_missing_man_page(unit_copy, tmp_path):
    """The check above can fail: without the man pages systemd complains."""
    env = dict(unit_copy["env"], MANPATH=str(tmp_path))
    r = subprocess.run(["systemd-analyze", "verify", str(unit_copy["unit"])], env=env,
                       capture_output=True, text=True, timeout=60)
    assert "man dllama-node(8)" in r.stderr


def test_service_values(parsed):
    one = {k: v[0] for k, v in parsed.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure"
    assert one["WatchdogSec"] == "30s"
    assert one["OOMPolicy"] == "stop"
    assert one["User"] == "dllama" and one["Group"] == "dllama"
    assert one["Nice"] == "-5"
    assert one["OOMScoreAdjust"] == "500"
    assert one["LimitMEMLOCK"] == str(2**64 - 1)            # infinity
    assert one["LimitMEMLOCKSoft"] == str(2**64 - 1)
    assert parsed["Documentation"][:2] == ["man:dllama-node(8)", "man:dllama-ctl(1)"]
    command = parsed["ExecStart"][1]
    assert command.startswith("Command Line: ") and "--config /etc/dllama-node/dllama-node.conf" in command


def test_capabilities_parsed_exactly(parsed):
    """A misspelled capability name is dropped without a word: compare the parsed sets."""
    caps = {"cap_ipc_lock", "cap_sys_nice", "cap_syslog"}
    assert set(parsed["AmbientCapabilities"][0].split()) == caps
    assert set(parsed["CapabilityBoundingSet"][0].split()) == caps


def test_directories_match_the_daemon_defaults(parsed):
    """The daemon's documented defaults live in the folders the unit creates."""
    one = {k: v[0] for k, v in parsed.items()}
    assert one["RuntimeDirectory"] == "dllama-node"
    assert one["RuntimeDirectoryMode"] == "0750"
    assert one["StateDirectory"] == "dllama-node"
    assert one["ConfigurationDirectory"] == "dllama-node"
    assert one["ReadWritePaths"] == "/var/lib/dllama-node"
    assert one["UMask"] == "0027"
    conf = configparser.ConfigParser()
    conf.read(ROOT / "daemon" / "dllama-node.conf")
    section = conf["dllama-node"]
    assert os.path.dirname(section["control_socket"]) == "/run/" + one["RuntimeDirectory"]
    assert section["state_dir"] == "/var/lib/" + one["StateDirectory"]
    assert os.path.dirname(section["key_file"]) == "/etc/" + one["ConfigurationDirectory"]


def test_hardening_values(parsed):
    one = {k: v[0] for k, v in parsed.items()}
    for key, value in [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
                       ("ProtectControlGroups", "yes"), ("ProtectClock", "yes"),
                       ("ProtectHostname", "yes"), ("ProtectProc", "invisible"),
                       ("LockPersonality", "yes"), ("MemoryDenyWriteExecute", "yes"),
                       ("RestrictRealtime", "yes"), ("RestrictSUIDSGID", "yes"),
                       ("SystemCallArchitectures", "native"), ("SystemCallErrorNumber", "EPERM"),
                       ("DevicePolicy", "closed"),
                       # both would hide /dev/kmsg, which the OOM diagnosis reads
                       ("ProtectKernelLogs", "no"), ("PrivateDevices", "no")]:
        assert one[key] == value, key
    assert "/dev/kmsg r" in parsed["DeviceAllow"]


def test_syscall_filter_lets_the_daemon_work(parsed):
    allowed = set(" ".join(parsed["SystemCallFilter"]).split())
    needed = {"mlock", "mlock2", "mlockall", "munlock", "setpriority", "getpriority",
              "sched_setaffinity", "memfd_create", "sendmsg", "recvmsg", "socket", "bind",
              "setsockopt", "mmap", "madvise", "clone3", "futex", "getrandom", "prlimit64",
              "epoll_wait"}
    assert needed <= allowed, sorted(needed - allowed)
    for refused in ("mount", "reboot", "kexec_load", "init_module", "ptrace", "swapon",
                    "settimeofday", "capset"):
        assert refused not in allowed, refused


def security(unit_copy) -> List[dict]:
    r = analyze(unit_copy, "security", "--offline=true", "--json=short")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_security_settings(unit_copy):
    checks = {c["name"]: c for c in security(unit_copy)}
    for name in ["NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=",
                 "PrivateMounts=", "RestrictAddressFamilies=~AF_PACKET",
                 "RestrictAddressFamilies=~…", "RestrictNamespaces=~user", "RestrictNamespaces=~net",
                 "CapabilityBoundingSet=~CAP_SYS_ADMIN", "CapabilityBoundingSet=~CAP_NET_ADMIN",
                 "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
                 "SystemCallFilter=~@privileged", "SystemCallFilter=~@mount", "RemoveIPC=",
                 "User=/DynamicUser="]:
        assert checks[name]["set"] is True, name
    # what the daemon needs, and so stays open
    for name in ["CapabilityBoundingSet=~CAP_IPC_LOCK", "CapabilityBoundingSet=~CAP_SYSLOG",
                 "RestrictAddressFamilies=~AF_(INET|INET6)", "PrivateNetwork="]:
        assert checks[name]["set"] is False, name


def test_security_exposure(unit_copy, capsys):
    r = analyze(unit_copy, "security", "--offline=true")
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for dllama-node.service: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout[-1000:]
    exposure = float(m.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security: dllama-node.service exposure {exposure} {m.group(2)}")
    assert exposure <= MAX_EXPOSURE
    readme = (ROOT / "systemd" / "README.md").read_text()
    assert f"{MAX_EXPOSURE}" in readme
