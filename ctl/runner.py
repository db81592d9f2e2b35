"""How dllama-ctl runs a model in its own process: one node, or a local cluster of N.

`run_options(...)` turns a command's options into one RunOptions (cluster/run_options.py);
`open_runner(options)` loads the model as they say, with progress bars and the plan on
stderr, and yields one of cluster/runners.py's runners (SingleRunner or ClusterRunner).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import click

from dllama_node.cluster.run_options import RunOptions
from dllama_node.cluster.runners import ClusterRunner, SingleRunner
from dllama_node.common.units import format_mib


def run_options(model_path: str, tokenizer_path: Optional[str], threads: Optional[int],
                max_seq_len: Optional[int], nodes: int = 1, split: Optional[str] = None,
                wire: str = "q8_0", stream_weights: bool = False) -> RunOptions:
    """A command's model and cluster options (ctl/cli.py) as one RunOptions, the object
    open_runner, the local cluster and its root read; --split is parsed here."""
    from dllama_node.cluster.planning import parse_split

    return RunOptions(model_path=model_path, tokenizer_path=tokenizer_path, threads=threads,
                      max_seq_len=max_seq_len, nodes=nodes, split=parse_split(split, nodes),
                      wire=wire, stream_weights=stream_weights)


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
def open_runner(options: RunOptions, quiet: bool = False) -> Iterator:
    from dllama_node.ctl.progress import byte_progress

    o = options
    if o.nodes <= 1:
        from dllama_node.engine.node import LocalNode

        with byte_progress("loading weights", enabled=not quiet) as progress:
            node = LocalNode.open(o.model_path, o.tokenizer_path, o.max_seq_len, o.threads,
                                  progress=progress, load_tokenizer_=o.load_tokenizer)
        try:
            if not quiet:
                click.echo(node.context.reason, err=True)
            yield SingleRunner(node)
        finally:
            node.close()
        return

    from dllama_node.cluster.local import LocalCluster
    from dllama_node.plan import format_plan

    with LocalCluster(o) as root:
        if not quiet:
            click.echo(f"starting {o.nodes} nodes on this machine (loopback), "
                       f"{root.threads} thread(s) each, {root.wire} on the wire, "
                       f"{root.sync_mode} all-reduce", err=True)
        with node_progress(enabled=not quiet) as streaming:
            root.start(progress=(lambda msg: click.echo(msg, err=True)) if not quiet else None,
                       stream_progress=streaming)
        if not quiet:
            click.echo(format_plan(root.plan), err=True)
            click.echo(measured_table(root.reports), err=True)
        yield ClusterRunner(root)
