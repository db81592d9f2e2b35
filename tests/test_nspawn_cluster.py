"""Three booted systemd-nspawn containers running the .deb (issue 6, point 3): each a
bookworm root file system with systemd as PID 1, in its own network namespace on one
bridge, with dllama-node installed by `apt-get install` from a flat repository inside it.

- the units become active, the nodes find each other by mDNS on the bridge, elect a root
  and serve a plan of 3 nodes; every node reports the same root;
- `dllama-ctl generate` on a worker (forwarded to the root) answers with tokens;
- `systemctl kill -s KILL dllama-node` on a worker: systemd restarts it (NRestarts), it
  rejoins (a plan of 3 again) and generation works again;
- `journalctl -u dllama-node`: the root shows the plan table and the killed worker's
  vanishing; the worker shows the diagnosis of its previous run.

The configuration and one shared cluster key are written into each root file system before
the install: the postinst keeps an existing key (it only sets owner and mode) and dpkg keeps
the existing conffile (--force-confold), so the unit the postinst starts is already the
configured one.

Root only (nspawn, network namespaces); the rootfs tarball and the dependency .debs are
cached by tests/debian_helpers.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from tests import debian_helpers as dh

sys.path.insert(0, os.path.dirname(__file__))
from netns import NetnsBridge, netns_unavailable_reason  # noqa: E402

TOOLS = ("systemd-nspawn", "nsenter", "dpkg-buildpackage", "dpkg-scanpackages", "debootstrap",
         "unshare")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dh.is_root(), reason="needs root (systemd-nspawn, network namespaces)"),
    pytest.mark.skipif(bool(dh.missing_tools(*TOOLS)),
                       reason="missing tools: " + " ".join(dh.missing_tools(*TOOLS))),
]

N_NODES = 3
SUBNET = "10.213.11"
MODEL_IN_ROOTFS = "/srv/models/tiny.gguf"
PLAN_TABLE_ID = "55d0ae1843524aa6b0fbb8c1f220e7a2"      # daemon/journal.py EVENTS["plan_table"]
PREVIOUS_EXIT_ID = "fc4a8f63dc8f4c7c852feed46133ef68"   # EVENTS["previous_exit"]
OOM_DIAGNOSIS_ID = "0dd6bd8bafd0431b999310c376f22659"   # EVENTS["oom_diagnosis"]
GUEST_ENV = {"DEBIAN_FRONTEND": "noninteractive", "HOME": "/root", "TERM": "dumb"}


def _config(node_id: str) -> str:
    return ("[dllama-node]\n"
            f"node_id = {node_id}\n"
            f"model = {MODEL_IN_ROOTFS}\n"
            "listen = 0.0.0.0:7321\n"
            "wire = f32\n"
            "key_file = /etc/dllama-node/cluster.key\n"
            "control_socket = /run/dllama-node/control.sock\n"
            "state_dir = /var/lib/dllama-node\n"
            "mdns = yes\n")


def _children(pid: int) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def _container_init(nspawn_pid: int) -> Optional[int]:
    """The host pid of the container's PID 1: the descendant of systemd-nspawn whose last
    NSpid entry is 1 (PID 1 in its own pid namespace)."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop()
        for child in _children(pid):
            try:
                with open(f"/proc/{child}/status") as f:
                    nspid = next(ln for ln in f if ln.startswith("NSpid:")).split()[1:]
            except (OSError, StopIteration):
                continue
            if len(nspid) > 1 and nspid[-1] == "1":
                return child
            todo.append(child)
    return None


class Container:
    """One booted container: its rootfs, the nspawn process, commands inside via nsenter."""

    def __init__(self, rootfs: Path, netns: str, log_path: Path):
        self.rootfs, self.netns, self.log_path = rootfs, netns, log_path
        self.proc: Optional[subprocess.Popen] = None
        self.init_pid: Optional[int] = None

    def boot(self) -> None:
        argv = ["systemd-nspawn", "-D", str(self.rootfs), "--register=no", "--keep-unit",
                "--capability=CAP_IPC_LOCK", f"--network-namespace-path=/run/netns/{self.netns}",
                "--console=read-only", "-b"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.log_path, "wb"),
                                     stderr=subprocess.STDOUT,
                                     env={"PATH": dh.CLEAN_PATH, "LC_ALL": "C.UTF-8"})

    def wait_booted(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.init_pid is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.rootfs.name} did not boot (nspawn exit "
                                     f"{self.proc.poll()}):\n{self.console()}")
            self.init_pid = _container_init(self.proc.pid)
            time.sleep(0.1)
        while True:      # "offline" (or nothing) until systemd has exec'd and listens
            r = self.sh("systemctl is-system-running --wait", check=False,
                        timeout=max(1.0, deadline - time.monotonic()))
            state = r.stdout.strip()
            if state not in ("offline", "") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert state in ("running", "degraded"), (state, self.console())
        if state == "degraded":
            failed = self.sh("systemctl --failed --no-legend", check=False).stdout
            print(f"{self.rootfs.name}: degraded; failed units:\n{failed}")

    def console(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def sh(self, script: str, *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a shell script inside the container (every namespace of its PID 1)."""
        return dh.run(["nsenter", "-t", str(self.init_pid), "-a", "/bin/sh", "-c", script],
                      check=check, timeout=timeout, env=GUEST_ENV)

    def status(self) -> dict:
        r = self.sh("dllama-ctl status --json", check=False, timeout=30)
        if r.returncode != 0:
            return {"error": (r.stdout + r.stderr).strip()[-500:]}
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {"error": f"not JSON: {r.stdout[-500:]}"}

    def journal(self, args: str = "") -> str:
        return self.sh(f"journalctl -u dllama-node --no-pager -o cat {args}", check=False).stdout

    def poweroff(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.init_pid is not None:
            try:
                os.kill(self.init_pid, signal.SIGRTMIN + 4)    # systemd: poweroff
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait(pred: Callable[[], object], what: str, timeout_s: float,
          diagnose: Callable[[], str] = lambda: "") -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{diagnose()}")
        time.sleep(0.5)


def _prepare_rootfs(rootfs: Path, node_id: str, debs: List[Path], model: Path, key: Path) -> None:
    (rootfs / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")   # one per "board"
    dh.flat_repo(rootfs / "srv/repo", debs)
    (rootfs / "etc/apt/sources.list").write_text(dh.sources_list(mirror=False))
    (rootfs / "etc/apt/apt.conf.d/98dllama-confold").write_text(
        'Dpkg::Options { "--force-confdef"; "--force-confold"; };\n')
    models = rootfs / MODEL_IN_ROOTFS.lstrip("/")
    models.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, models)
    os.chmod(models, 0o644)
    etc = rootfs / "etc/dllama-node"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "dllama-node.conf").write_text(_config(node_id))
    shutil.copy(key, etc / "cluster.key")
    os.chmod(etc / "cluster.key", 0o600)


def _plan_ids(status: dict) -> set:
    plan = status.get("plan") or {}
    return {n["node_id"] for n in plan.get("nodes", [])}


def test_three_booted_containers_install_elect_serve_and_restart_a_killed_worker(tmp_path):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from dllama_node.cluster.auth import generate_key, write_key
    from dllama_node.model.generate import PRESETS, write_random_model

    times: Dict[str, float] = {}
    t0 = time.monotonic()
    deb = dh.build_deb()
    debs = [deb] + dh.dependency_debs(deb)
    times["deb and dependencies"] = time.monotonic() - t0

    model = tmp_path / "tiny.gguf"
    write_random_model(str(model), PRESETS["tiny"], weight_type="q8_0", seed=11)
    key = tmp_path / "cluster.key"
    write_key(str(key), generate_key())
    ctl = os.path.join(os.path.dirname(sys.executable), "dllama-ctl")
    key_id = dh.run([ctl, "key", "id", "--key-file", str(key)], check=False).stdout.strip()

    containers: List[Container] = []
    roots = [tmp_path / f"n{i + 1}" for i in range(N_NODES)]
    try:
        t = time.monotonic()
        tarball = dh.rootfs_tarball("amd64")
        for i, root in enumerate(roots):
            dh.unpack(tarball, root)
            _prepare_rootfs(root, f"n{i + 1}", debs, model, key)
        times["unpack and prepare"] = time.monotonic() - t

        with NetnsBridge(N_NODES, subnet=SUBNET) as net:
            try:
                t = time.monotonic()
                for i, root in enumerate(roots):
                    c = Container(root, net.ns(i), tmp_path / f"n{i + 1}.console")
                    containers.append(c)
                    c.boot()
                for c in containers:
                    c.wait_booted()
                times["boot"] = time.monotonic() - t

                # --- apt-get install in all three at once ------------------------------------
                t = time.monotonic()
                installs = [subprocess.Popen(
                    ["nsenter", "-t", str(c.init_pid), "-a", "/bin/sh", "-c",
                     "apt-get update -qq && apt-get install -y -q dllama-node"],
                    env=dict(GUEST_ENV, PATH=dh.CLEAN_PATH, LC_ALL="C.UTF-8"),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in containers]
                for c, p in zip(containers, installs):
                    out, _ = p.communicate(timeout=300)
                    assert p.returncode == 0, f"apt-get install in {c.rootfs.name}:\n{out[-4000:]}"
                times["apt-get install"] = time.monotonic() - t

                def journals() -> str:
                    return "\n".join(f"--- {c.rootfs.name}: journalctl -u dllama-node\n"
                                     f"{c.journal('-n 40')}" for c in containers)

                for c in containers:
                    r = c.sh("systemctl is-active dllama-node; stat -c '%U %a' /etc/dllama-node/cluster.key; "
                             "dllama-ctl key id", check=False)
                    lines = r.stdout.split("\n")
                    assert lines[0] == "active", (c.rootfs.name, r.stdout, c.journal())
                    assert lines[1] == "dllama 600", lines           # the postinst kept our key
                    if key_id:
                        assert lines[2] == key_id, lines

                # --- discovery, election, a plan of 3 -----------------------------------------
                t = time.monotonic()

                def agreed():
                    st = [c.status() for c in containers]
                    roots_seen = {s.get("root_id") for s in st}
                    if len(roots_seen) == 1 and None not in roots_seen and \
                            all(_plan_ids(s) == {"n1", "n2", "n3"} for s in st):
                        return st
                    return None
                statuses = _wait(agreed, "one root and a plan of 3 nodes seen from every node", 90,
                                 lambda: json.dumps([c.status() for c in containers], indent=1)[-3000:]
                                 + "\n" + journals())
                times["discover, elect, plan, load"] = time.monotonic() - t
                root_id = statuses[0]["root_id"]
                root = int(root_id[1:]) - 1
                worker = (root + 1) % N_NODES
                other = (root + 2) % N_NODES
                assert statuses[root]["state"] == "serving", statuses[root]

                # --- generation asked of a worker -----------------------------------------------
                def generate(c: Container) -> dict:
                    r = c.sh("dllama-ctl generate --json --max-tokens 8 --temperature 0 hello",
                             check=False, timeout=120)
                    assert r.returncode == 0, (c.rootfs.name, r.stdout, r.stderr, journals())
                    return json.loads(r.stdout)
                t = time.monotonic()
                answer = generate(containers[worker])
                times["generate on a worker"] = time.monotonic() - t
                assert len(answer["tokens"]) >= 1, answer
                assert len(answer["tokens"]) <= 8, answer

                # --- SIGKILL a worker: systemd restarts it, it rejoins ---------------------------
                victim = containers[other]
                victim_id = f"n{other + 1}"
                before = victim.sh("systemctl show -p NRestarts --value dllama-node").stdout.strip()
                assert before == "0", before
                main_pid = victim.sh("systemctl show -p MainPID --value dllama-node").stdout.strip()
                assert main_pid.isdigit() and main_pid != "0", main_pid
                t = time.monotonic()
                r = victim.sh("systemctl kill -s KILL dllama-node", check=False)
                if r.returncode != 0:
                    # systemd 252 in a container on a cgroup v1 host: the main process gets
                    # the SIGKILL, then the walk of the unit's cgroup for the others fails
                    # ("Failed to send signal SIGKILL to auxiliary processes: Input/output
                    # error"). The main process is what counts (an OOM kill hits it alone).
                    assert "auxiliary processes" in r.stderr, r.stderr
                    print(f"\nsystemctl kill: {r.stderr.strip()}")
                _wait(lambda: victim.sh(f"kill -0 {main_pid}", check=False).returncode != 0,
                      f"the worker's main process (pid {main_pid} in the container) to die", 10)
                _wait(lambda: victim.sh("systemctl show -p NRestarts --value dllama-node").stdout.strip()
                      == "1", "systemd to restart the killed worker", 30, journals)
                _wait(lambda: victim.sh("systemctl is-active dllama-node", check=False).stdout.strip()
                      == "active", "the restarted worker to be active", 60, journals)
                _wait(lambda: all(_plan_ids(s) == {"n1", "n2", "n3"} and s.get("root_id") == root_id
                                  for s in (c.status() for c in containers)),
                      "the restarted worker back in a plan of 3", 90, journals)
                times["kill, restart, rejoin"] = time.monotonic() - t
                answer2 = generate(containers[worker])
                assert answer2["tokens"] == answer["tokens"], (answer, answer2)   # greedy, f32 wire
                answer3 = generate(victim)
                assert answer3["tokens"] == answer["tokens"], (answer, answer3)

                # --- what the journals say ----------------------------------------------------
                root_c = containers[root]
                plan_entries = root_c.journal(f"MESSAGE_ID={PLAN_TABLE_ID}")
                assert "node" in plan_entries and "role" in plan_entries, root_c.journal()
                for nid in ("n1", "n2", "n3"):
                    assert nid in plan_entries, plan_entries
                root_j = root_c.journal()
                assert re.search(rf"node {victim_id} \({re.escape(SUBNET)}\.{other + 1}\) vanished while",
                                 root_j), root_j[-3000:]
                victim_j = (victim.journal(f"MESSAGE_ID={PREVIOUS_EXIT_ID}")
                            + victim.journal(f"MESSAGE_ID={OOM_DIAGNOSIS_ID}"))
                assert re.search(rf"previous run: node {victim_id} \(pid {main_pid}\).* without a "
                                 r"clean exit", victim_j), victim.journal()[-3000:]
                _wait(lambda: f"node {victim_id} is back; its previous run" in root_c.journal(),
                      "the root to journal the returning worker's report", 15,
                      lambda: root_c.journal()[-3000:])
                times["total"] = time.monotonic() - t0
                print(f"root {root_id}; plan table:\n{plan_entries[-1500:]}\nworker {victim_id} after "
                      f"the kill:\n{victim_j[-800:]}")
            finally:
                print("\n" + "\n".join(f"{k}: {v:.1f} s" for k, v in times.items()))
                for c in containers:    # before the namespaces go
                    c.poweroff()
    finally:
        for c in containers:
            c.poweroff()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
