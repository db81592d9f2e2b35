"""The real test of the appliance (issue 4, point 9): dllama-node daemons in their own
network namespaces on one bridge, finding each other by real mDNS.

- n1, n2: plenty of memory, hold the model; n3: holds it too, but lives in a 1 GiB memory
  cgroup; n4: no model, in a 256 MiB cgroup (too small for any slice); n5: the wrong key.
- They elect a root, n3 gets a smaller slice than n1/n2, n4 is left out with its numbers,
  n5 is refused; a generation asked of a worker's control socket (forwarded to the root)
  equals the single-node result (f32 on the wire).
- SIGKILL the root: a new root within 5 s, a new plan, generation works again; the new
  root journals the vanished node, and when it restarts, its report of how it ended.

The model is KV-dominated (MHA, a 512Ki context) so that memory, not speed, decides the
slices: 4 GiB of KV cache in all, 512 MiB per head. Memory is not locked (DLLAMA_LOCK_MEMORY
=no) so the cache stays virtual: the planner's numbers are what is tested.

Needs root (namespaces, cgroups); CI runs as root.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from dllama_node.cluster.auth import generate_key, write_key
from dllama_node.daemon.control import request
from dllama_node.engine.forward import Transformer
from dllama_node.engine.generate import Session
from dllama_node.engine.load import load_weights
from dllama_node.engine.sampler import Sampler, SamplerSettings
from dllama_node.model import open_model
from dllama_node.model.config import ModelConfig
from dllama_node.model.generate import write_random_model

sys.path.insert(0, os.path.dirname(__file__))
from netns import NetnsBridge, require_netns  # noqa: E402

NODE = os.path.join(os.path.dirname(sys.executable), "dllama-node")
MiB = 1 << 20
GiB = 1 << 30
SEQ = 524288
PROMPT = [1, 5, 9, 200, 17, 3]
N_TOKENS = 24

pytestmark = pytest.mark.slow


def _memory_cgroup(name: str, limit: int) -> str:
    v1 = "/sys/fs/cgroup/memory"
    if os.path.isfile(os.path.join(v1, "memory.limit_in_bytes")):
        path, limit_file = os.path.join(v1, name), "memory.limit_in_bytes"
    elif os.path.isfile("/sys/fs/cgroup/cgroup.subtree_control") and "memory" in open(
            "/sys/fs/cgroup/cgroup.subtree_control").read().split():
        path, limit_file = os.path.join("/sys/fs/cgroup", name), "memory.max"
    else:
        pytest.skip("no writable memory cgroup controller")
    os.mkdir(path)
    with open(os.path.join(path, limit_file), "w") as f:
        f.write(str(limit))
    return path


def _remove_cgroup(path: str) -> None:
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)


class Cluster:
    def __init__(self, net: NetnsBridge, work: str, model: str, key: str):
        self.net, self.work, self.model, self.key = net, work, model, key
        self.procs = {}

    def sock(self, i: int) -> str:
        return os.path.join(self.work, f"ctl{i}.sock")

    def log(self, i: int) -> str:
        return os.path.join(self.work, f"n{i + 1}.log")

    def start(self, i: int, *, model: bool = True, key: str = None, cgroup: str = None,
              lock: bool = False):
        argv = [NODE, "--config", "/nonexistent.conf", "--node-id", f"n{i + 1}",
                "--listen", f"{self.net.ip(i)}:7321", "--control-socket", self.sock(i),
                "--state-dir", os.path.join(self.work, f"state{i}"),
                "--key-file", key or self.key, "--max-seq-len", str(SEQ)]
        if model:
            argv += ["--model", self.model]
        def enter_cgroup():  # before entering the namespace; inherited
            if cgroup:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("1000")      # the OOM killer's first choice (the unit says 500)
        env = dict(os.environ, DLLAMA_WIRE="f32", DLLAMA_LOCK_MEMORY="yes" if lock else "no",
                   DLLAMA_NICE="0")
        self.procs[i] = self.net.popen(i, argv, env=env, stdout=subprocess.DEVNULL,
                                       stderr=open(self.log(i), "a"), preexec_fn=enter_cgroup,
                                       own_sys=False)     # the daemon reads its cgroup's limit

    def status(self, i: int) -> dict:
        try:
            return list(request(self.sock(i), {"op": "status", "local": True}, timeout_s=5))[-1]
        except Exception as e:           # not listening (yet, or any more)
            return {"state": f"down ({e})"}

    def wait(self, pred, what: str, timeout_s: float = 60.0):
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = pred()
            if last:
                return last
            time.sleep(0.1)
        logs = "\n".join(f"--- n{i + 1}\n" + open(self.log(i)).read()[-3000:] for i in self.procs)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")

    def generate(self, i: int) -> dict:
        answer = list(request(self.sock(i), {"op": "generate", "prompt_tokens": PROMPT,
                                             "max_tokens": N_TOKENS, "temperature": 0},
                              timeout_s=120))
        return answer[-1]

    def journal(self, i: int) -> str:
        with open(self.log(i)) as f:
            return f.read()


def _serving_root(c: Cluster, members) -> callable:
    """A predicate: one of `members` is root and serving a plan of exactly len(members)
    slices; returns that root's status."""
    def pred():
        for i in members:
            s = c.status(i)
            if s.get("root_id") == f"n{i + 1}" and s.get("state") == "serving" and s.get("plan"):
                return s
        return None
    return pred


def test_daemons_in_namespaces_elect_plan_serve_and_survive_the_root(tmp_path):
    require_netns()
    work = str(tmp_path)
    model = os.path.join(work, "kv.gguf")
    cfg = ModelConfig(arch="llama", dim=256, hidden_dim=704, n_layers=4, n_heads=8, n_kv_heads=8,
                      head_dim=32, vocab_size=512, seq_len=SEQ)
    write_random_model(model, cfg, weight_type="q8_0", seed=7)
    key = os.path.join(work, "cluster.key")
    write_key(key, generate_key())
    wrong_key = os.path.join(work, "other.key")
    write_key(wrong_key, generate_key())
    with open_model(model) as m:       # the single-node answer
        session = Session(Transformer(load_weights(m), 256, 1, 64))
        expected = list(session.generate(PROMPT, N_TOKENS, Sampler(SamplerSettings(temperature=0))))

    tag = uuid.uuid4().hex[:8]
    small = _memory_cgroup(f"dllama-e2e-small-{tag}", 1 * GiB)
    tiny = _memory_cgroup(f"dllama-e2e-tiny-{tag}", 256 * MiB)
    try:
        with NetnsBridge(5, subnet="10.213.9") as net:
            c = Cluster(net, work, model, key)
            c.start(0)
            c.start(1)
            c.start(2, cgroup=small, lock=True)     # its KV cache locked: really resident
            c.start(3, model=False, cgroup=tiny)
            c.start(4, key=wrong_key)

            # --- discovery, election, plan ------------------------------------------------
            status = c.wait(_serving_root(c, range(4)), "a root serving a plan", 90)   # n5 may serve alone
            root = int(status["root_id"][1:]) - 1
            assert root in (0, 1), f"the root should be n1 or n2 (most memory), is {status['root_id']}"
            c.wait(lambda: all(c.status(i).get("root_id") == status["root_id"] for i in (0, 1, 2, 3)),
                   "every member to agree on the root")
            plan = status["plan"]
            by_id = {n["node_id"]: n for n in plan["nodes"]}
            assert set(by_id) == {"n1", "n2", "n3"}, plan["nodes"]
            heads = {k: n["q_heads"][1] - n["q_heads"][0] for k, n in by_id.items()}
            assert heads["n3"] < heads["n1"] and heads["n3"] < heads["n2"], heads
            assert by_id["n3"]["memory"]["total"] < by_id["n1"]["memory"]["total"]
            assert by_id["n3"]["memory"]["available"] < 1 * GiB       # what its cgroup leaves
            assert plan["max_seq_len"] == SEQ
            excluded = {x["node_id"]: x["reason"] for x in plan["excluded"]}
            assert "n4" in excluded and "smallest slice needs" in excluded["n4"], excluded
            assert "n5" not in by_id and "n5" not in excluded     # not a member at all
            journal = c.journal(root)
            assert re.search(r"n4 left out: has \d+ MiB available, its smallest slice needs", journal)
            assert re.search(r"node n5 \(10\.213\.9\.5\) is not a member: cluster key mismatch", journal)
            assert re.search(r"node n[1-4] \(10\.213\.9\.\d\) is not a member: cluster key "
                             r"mismatch", c.journal(4))    # and n5 refuses them in turn

            # --- a generation asked of a worker equals the single-node result ----------------
            worker = 2                            # n3: a worker in its small cgroup
            answer = c.generate(worker)
            assert "error" not in answer, answer
            assert answer["tokens"] == expected
            assert c.generate(3)["tokens"] == expected      # n4, left out, still forwards

            # --- the HTTP API: the root serves, a worker says who does; both advertised ----
            health = ("import urllib.request, urllib.error\n"
                      "try:\n  r = urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=5)\n"
                      "  print(r.status, r.read().decode())\n"
                      "except urllib.error.HTTPError as e:\n  print(e.code, e.read().decode())\n")
            out = net.run(root, [sys.executable, "-c", health]).stdout
            assert out.startswith("200"), out
            out = net.run(2, [sys.executable, "-c", health]).stdout
            assert out.startswith("503") and f"ask node n{root + 1}" in out, out
            peers = {p["node_id"]: p for p in c.status(2)["peers"]}
            assert peers[f"n{root + 1}"]["http_port"] == 8080

            # --- SIGKILL the root -----------------------------------------------------------
            survivor = 1 - root
            old_term = status["term"]
            killed_at = time.monotonic()
            os.kill(c.procs[root].pid, signal.SIGKILL)
            c.procs[root].wait()
            new = c.wait(lambda: (lambda s: s if s.get("root_id") == f"n{survivor + 1}"
                                  and s.get("term", 0) > old_term else None)(c.status(2)),
                         "a new root", 15)
            took = time.monotonic() - killed_at
            assert took < 5.0, f"new root after {took:.1f} s"
            status2 = c.wait(_serving_root(c, [survivor]), "the new root serving", 60)
            plan2 = {n["node_id"] for n in status2["plan"]["nodes"]}
            assert plan2 == {f"n{survivor + 1}", "n3"}, status2["plan"]["nodes"]
            answer = c.generate(2)
            assert "error" not in answer, answer
            assert answer["tokens"] == expected
            j = c.journal(survivor)
            assert re.search(rf"node n{root + 1} \(10\.213\.9\.{root + 1}\) vanished while serving: "
                             r"it last reported [\d.]+ [GM]iB available", j), j[-2000:]

            # --- the killed node returns and reports how its last run ended -----------------
            c.start(root)
            c.wait(lambda: f"node n{root + 1} is back; its previous run" in c.journal(survivor),
                   "the root to journal the returning node's report", 30)
            line = next(ln for ln in c.journal(survivor).splitlines()
                        if f"node n{root + 1} is back" in ln)
            assert "without a clean exit" in line or "SIGKILL" in line, line
            assert new["term"] > old_term

            # --- n3 OOM-killed for real in its cgroup; back, it says so, the root journals it
            c.wait(_serving_root(c, [survivor]), "the root serving again", 60)
            c.wait(lambda: "locked" in c.journal(2).rsplit("loading slice", 1)[-1],
                   "n3 to lock its slice")
            balloon = subprocess.Popen(
                [sys.executable, "-c", "import time\nchunks = []\nwhile True:\n"
                 "    chunks.append(bytearray(16 << 20)); time.sleep(0.01)"],
                preexec_fn=lambda: open(os.path.join(small, "cgroup.procs"), "w").write(
                    str(os.getpid())))
            try:
                assert c.procs[2].wait(timeout=60) == -signal.SIGKILL
            finally:
                balloon.kill()
                balloon.wait()
            c.wait(lambda: re.search(r"node n3 \(10\.213\.9\.3\) vanished while serving: it last "
                                     r"reported .* available.*; its slice needed [\d.]+ [GM]iB",
                                     c.journal(survivor)), "the root to journal n3's vanishing", 15)
            c.start(2, cgroup=small, lock=True)
            c.wait(lambda: "node n3 is back; its previous run: node n3 was OOM-killed"
                   in c.journal(survivor), "the root to journal n3's OOM kill", 30)
            line = next(ln for ln in c.journal(survivor).splitlines()
                        if "node n3 is back; its previous run" in ln)
            assert "memory cgroup limit" in line and "anon-rss" in line, line
            assert "while serving" in line and "its plan needed" in line, line
            assert "the plan fit, so something else took the memory" in line, line
            assert "PLANNED_BYTES=" in line and "AVAILABLE_BYTES=" in line, line
            assert "EVENT=oom_diagnosis" in line and "NODE=n3" in line, line
    finally:
        _remove_cgroup(small)
        _remove_cgroup(tiny)
