"""One interface for the commands over a single node or a local cluster.

`open_runner(...)` gives an object with .session (generation), .tokenizer, .seq_len,
.reason (why that context), .threads, .weights_bytes, .kv_cache_bytes, and for a
cluster the plan, per-node reports and sync statistics.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import click

from dllama_node.common.units import format_mib


class SingleRunner:
    def __init__(self, node):
        self.node = node
        self.session = node.session
        self.tokenizer = node.tokenizer
        self.seq_len = node.context.seq_len
        self.reason = node.context.reason
        self.threads = node.transformer.n_threads
        self.weights_bytes = node.weights.nbytes()
        self.kv_cache_bytes = node.transformer.cache.nbytes
        self.plan = None
        self.reports = []
        self.sync_stats = None

    def generate(self, *args, **kw):
        return self.session.generate(*args, **kw)


class ClusterRunner:
    def __init__(self, root):
        self.root = root
        self.tokenizer = root.tokenizer
        self.plan = root.plan
        self.seq_len = root.plan.max_seq_len
        self.reason = root.plan.seq_len_reason
        self.threads = root.threads
        self.reports = root.reports
        self.weights_bytes = sum(r.weights_bytes for r in root.reports)
        self.kv_cache_bytes = sum(r.kv_cache_bytes for r in root.reports)

    @property
    def session(self):
        return self.root.session

    @property
    def sync_stats(self):
        return self.root.sync.stats

    def node_stats(self, reset: bool = False) -> dict:
        return self.root.node_stats(reset)

    def generate(self, *args, **kw):
        return self.root.generate(*args, **kw)


def measured_table(reports) -> str:
    """Per node: planned bytes next to what was measured after load."""
    lines = [f"{'node':8}{'role':8}{'planned':>12}{'weights':>12}{'KV cache':>12}{'RSS':>12}"
             f"{'RSS/plan':>10}{'load s':>8}  source"]
    for r in reports:
        ratio = r.rss_bytes / r.planned_bytes if r.planned_bytes else float("nan")
        lines.append(f"{r.node_id:8}{r.role:8}{format_mib(r.planned_bytes):>12}"
                     f"{format_mib(r.weights_bytes):>12}{format_mib(r.kv_cache_bytes):>12}"
                     f"{format_mib(r.rss_bytes):>12}{ratio:>10.2f}{r.load_s:>8.2f}  {r.source}")
    return "\n".join(lines)


@contextlib.contextmanager
def node_progress(enabled: bool):
    """stream_progress(node_id, done, total): one bar per node while its slice streams."""
    from dllama_node.ctl.progress import byte_progress

    bars = {}
    with contextlib.ExitStack() as stack:
        def update(node_id: str, done: int, total: int) -> None:
            if node_id not in bars:
                bars[node_id] = stack.enter_context(
                    byte_progress(f"streaming slice to {node_id}", enabled))
            bars[node_id](done, total)
        yield update


@contextlib.contextmanager
def open_runner(model_path: str, tokenizer_path: Optional[str], threads: Optional[int],
                max_seq_len: Optional[int], nodes: int = 1, split: Optional[Sequence[float]] = None,
                wire: str = "q8_0", quiet: bool = False, load_tokenizer: bool = True,
                stream_weights: bool = False) -> Iterator:
    from dllama_node.ctl.progress import byte_progress

    if nodes <= 1:
        from dllama_node.engine.node import LocalNode

        with byte_progress("loading weights", enabled=not quiet) as progress:
            node = LocalNode.open(model_path, tokenizer_path, max_seq_len, threads,
                                  progress=progress, load_tokenizer_=load_tokenizer)
        try:
            if not quiet:
                click.echo(node.context.reason, err=True)
            yield SingleRunner(node)
        finally:
            node.close()
        return

    from dllama_node.cluster.local import LocalCluster
    from dllama_node.plan import format_plan

    with LocalCluster(model_path, nodes, threads or 1, wire, max_seq_len, split,
                      tokenizer_path=tokenizer_path, load_tokenizer=load_tokenizer,
                      stream_weights=stream_weights) as root:
        if not quiet:
            click.echo(f"starting {nodes} nodes on this machine (loopback), "
                       f"{threads or 1} thread(s) each, {wire} on the wire, "
                       f"{root.sync_mode} all-reduce", err=True)
        with node_progress(enabled=not quiet) as streaming:
            root.start(progress=(lambda msg: click.echo(msg, err=True)) if not quiet else None,
                       stream_progress=streaming)
        if not quiet:
            click.echo(format_plan(root.plan), err=True)
            click.echo(measured_table(root.reports), err=True)
        yield ClusterRunner(root)
