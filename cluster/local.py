"""A cluster on this machine: the root in this process, N-1 worker processes on
loopback. What `dllama-ctl generate/bench --nodes N` runs, with the run's options
(cluster/run_options.py) as they came from the command line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence, Type

from dllama_node.cluster.auth import generate_key, write_key
from dllama_node.cluster.planning import local_capacities
from dllama_node.cluster.root import ClusterRoot, WorkerAddress
from dllama_node.cluster.run_options import RunOptions
from dllama_node.common.errors import ClusterError


def spawn_worker(node_id: str, key_file: str, timeout_s: float = 10.0, verbose: bool = False,
                 state_dir: Optional[str] = None,
                 program: Sequence[str] = ClusterRoot.worker_program) -> tuple:
    """Start one worker process on 127.0.0.1 (python `program`); returns (process, host,
    port)."""
    cmd = [sys.executable, *program, "--listen", "127.0.0.1:0",
           "--node-id", node_id, "--timeout", str(timeout_s), "--key-file", key_file]
    cmd += ["-v"] if verbose else []
    if state_dir:
        cmd += ["--state-dir", os.path.join(state_dir, node_id)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    line = proc.stdout.readline().strip()
    if not line.startswith("listening "):
        proc.kill()
        raise ClusterError(f"worker {node_id} did not start (it printed {line!r}, "
                           f"exit status {proc.wait()})")
    host, _, port = line.split()[1].rpartition(":")
    return proc, host, int(port)


class LocalCluster:
    """Context manager: options.nodes nodes on this machine, torn down on exit.
    state_dir: where the workers keep their state (slice cache); None: their default.
    root_class: the root, and through its worker_program the workers (bench/star_sync.py
    runs its star this way)."""

    def __init__(self, options: RunOptions, state_dir: Optional[str] = None,
                 root_class: Type[ClusterRoot] = ClusterRoot):
        caps = local_capacities(options.nodes, options.threads or 1)
        self.processes: List[subprocess.Popen] = []
        # a key for this run only, readable by this user alone
        self.key_dir = tempfile.mkdtemp(prefix="dllama-key-")
        key_file = os.path.join(self.key_dir, "cluster.key")
        key = generate_key()
        write_key(key_file, key)
        workers = []
        try:
            for cap in caps[1:]:
                proc, host, port = spawn_worker(cap.node_id, key_file, options.timeout_s,
                                                state_dir=state_dir,
                                                program=root_class.worker_program)
                self.processes.append(proc)
                workers.append(WorkerAddress(host, port, cap, proc))
            self.root = root_class(options, caps[0], workers, key)
        except BaseException:
            self._stop()
            raise

    def __enter__(self) -> ClusterRoot:
        return self.root

    def __exit__(self, *exc) -> None:
        try:
            self.root.close()
        finally:
            self._stop()

    def _stop(self) -> None:
        shutil.rmtree(self.key_dir, ignore_errors=True)
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
