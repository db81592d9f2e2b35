"""A cluster on this machine: the root in this process, N-1 worker processes on
loopback. What `dllama-ctl generate/bench --nodes N` runs."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Optional, Sequence

from dllama_node.cluster.planning import local_capacities
from dllama_node.cluster.root import ClusterRoot, WorkerAddress
from dllama_node.common.errors import ClusterError


def spawn_worker(node_id: str, timeout_s: float = 10.0, verbose: bool = False,
                 state_dir: Optional[str] = None) -> tuple:
    """Start one worker process on 127.0.0.1; returns (process, host, port)."""
    cmd = [sys.executable, "-m", "dllama_node.cluster.worker", "--listen", "127.0.0.1:0",
           "--node-id", node_id, "--timeout", str(timeout_s)] + (["-v"] if verbose else [])
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
    """Context manager: N nodes on this machine, torn down on exit."""

    def __init__(self, model_path: str, n_nodes: int, threads: int = 1, wire: str = "q8_0",
                 max_seq_len: Optional[int] = None, split: Optional[Sequence[float]] = None,
                 batch: int = 64, timeout_s: float = 10.0, tokenizer_path: Optional[str] = None,
                 load_tokenizer: bool = True, stream_weights: bool = False,
                 state_dir: Optional[str] = None):
        caps = local_capacities(n_nodes, threads, split)
        self.processes: List[subprocess.Popen] = []
        workers = []
        try:
            for cap in caps[1:]:
                proc, host, port = spawn_worker(cap.node_id, timeout_s, state_dir=state_dir)
                self.processes.append(proc)
                workers.append(WorkerAddress(host, port, cap, proc))
            self.root = ClusterRoot(model_path, caps[0], workers, threads, wire, max_seq_len,
                                    split, batch, timeout_s, tokenizer_path, load_tokenizer,
                                    stream_weights)
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
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
