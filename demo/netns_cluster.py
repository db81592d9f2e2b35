"""The demo's cluster when run as root: three dllama-node daemons, each in its own network
namespace on one bridge (three "boards"), finding each other by mDNS, electing a root and
planning the model; then one chat turn asked of a node that is not the root.

    python demo/netns_cluster.py MODEL "MESSAGE" [TEMPERATURE]

Everything it makes (namespaces 10.213.99.0/24, a temporary key and state) is removed on
exit; the daemons' logs are printed when something fails. Traffic stays in the namespaces.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

N = 3
SUBNET = "10.213.99"
BIN = os.path.dirname(sys.executable)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def build(prefix: str) -> list:
    made = []
    br = f"{prefix}-br"
    ip("netns", "add", br)
    made.append(br)
    ip("-n", br, "link", "set", "lo", "up")
    ip("-n", br, "link", "add", "br0", "type", "bridge")
    ip("-n", br, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
    ip("-n", br, "link", "set", "br0", "up")
    for i in range(N):
        ns = f"{prefix}-n{i}"
        ip("netns", "add", ns)
        made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", br)
        ip("-n", br, "link", "set", f"p{i}", "master", "br0")
        ip("-n", br, "link", "set", f"p{i}", "up")
        ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
    return made


def status(sock: str) -> dict:
    r = subprocess.run([f"{BIN}/dllama-ctl", "status", "--json", "--socket", sock],
                       capture_output=True, text=True, timeout=20)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}


def main(model: str, message: str, temperature: str = "0") -> int:
    work = tempfile.mkdtemp(prefix="dllama-demo-")
    prefix = f"dldemo{os.getpid()}"
    made, procs = [], []
    key = os.path.join(work, "cluster.key")
    subprocess.run([f"{BIN}/dllama-ctl", "key", "generate", "--key-file", key], check=True,
                   capture_output=True)
    try:
        made = build(prefix)
        for i in range(N):
            argv = ["ip", "netns", "exec", f"{prefix}-n{i}", f"{BIN}/dllama-node",
                    "--config", os.path.join(work, "none.conf"), "--node-id", f"board{i + 1}",
                    "--model", os.path.abspath(model), "--listen", f"{SUBNET}.{i + 1}:7321",
                    "--control-socket", os.path.join(work, f"board{i + 1}.sock"),
                    "--state-dir", os.path.join(work, f"state{i + 1}"), "--key-file", key]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                          stderr=open(os.path.join(work, f"board{i + 1}.log"), "w"),
                                          env=dict(os.environ, DLLAMA_NICE="0")))
        print(f"== three boards: network namespaces {SUBNET}.1-{N} on one bridge; "
              "finding each other by mDNS, electing a root, planning", flush=True)
        # the bars: one per board while its slice loads (stderr), until the cluster serves
        for _ in range(100):
            if os.path.exists(os.path.join(work, "board2.sock")):
                break
            time.sleep(0.1)
        subprocess.run([f"{BIN}/dllama-ctl", "status", "--wait", "--wait-timeout", "60",
                        "--json", "--socket", os.path.join(work, "board2.sock")],
                       stdout=subprocess.DEVNULL, timeout=90, check=False)
        deadline, s, root = time.monotonic() + 60, {}, None
        while time.monotonic() < deadline:
            s = status(os.path.join(work, "board1.sock"))
            plan = s.get("plan") or {}
            if s.get("root_id") and len(plan.get("nodes", [])) == N:
                root = s["root_id"]
                break
            time.sleep(0.5)
        if root is None:
            raise RuntimeError(f"no root serving a {N}-node plan within 60 s (last status: "
                               f"{json.dumps(s)[:300]})")
        asker = next(f"board{i + 1}" for i in range(N) if f"board{i + 1}" != root)
        subprocess.run([f"{BIN}/dllama-ctl", "status", "--socket",
                        os.path.join(work, f"{asker}.sock")], check=False)
        print(f"\n== one chat turn, typed on {asker} (the root is {root}; the request is "
              "forwarded to it)", flush=True)
        print(f"user> {message}", flush=True)
        r = subprocess.run([f"{BIN}/dllama-ctl", "chat", "--socket",
                            os.path.join(work, f"{asker}.sock"), "--temperature", temperature],
                           input=message + "\n", text=True, timeout=120)
        return r.returncode
    except Exception as e:      # show what the daemons said
        for i in range(N):
            log = os.path.join(work, f"board{i + 1}.log")
            if os.path.exists(log):
                print(f"--- board{i + 1}\n" + open(log).read()[-2000:], file=sys.stderr)
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
