"""dllama-node: the per-board service.

Today it reports what this node can offer a cluster (`--check`): the kernel path its
CPU gets, memory (MemAvailable bounded by the cgroup limit), swap, the locked-memory
limit and cores. Discovery, election and serving build on this (see README: Roadmap).
"""
from __future__ import annotations

import json
import os
import resource
import sys

import click

from dllama_node.common.memory import read_memory
from dllama_node.common.units import format_bytes


def node_report() -> dict:
    from dllama_node import kernels

    mem = read_memory()
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {
        "kernel_path": kernels.kernel_path(),
        "kernel_paths_available": kernels.available_paths(),
        "cores": len(os.sched_getaffinity(0)),
        "mem_total_bytes": mem.mem_total_bytes,
        "available_ram_bytes": mem.available_bytes,
        "cgroup_limit_bytes": mem.cgroup_limit_bytes,
        "free_swap_bytes": mem.swap_free_bytes,
        "memlock_limit_bytes": -1 if soft == resource.RLIM_INFINITY else soft,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dllama-node", prog_name="dllama-node")
@click.option("--check", is_flag=True, help="Report this node's capacity and kernel path, then exit.")
@click.option("--json", "as_json", is_flag=True, help="With --check: one JSON object.")
def cli(check: bool, as_json: bool) -> None:
    """The dllama cluster service for one board.

    Run `dllama-node --check` to see what this board offers a cluster.
    """
    if not check:
        click.echo("dllama-node: serving as a cluster member is not available in this version; "
                   "run `dllama-node --check`, or `dllama-ctl generate/chat --model PATH` "
                   "to run a model on this node.", err=True)
        sys.exit(2)
    report = node_report()
    if as_json:
        click.echo(json.dumps(report))
        return
    lim = report["memlock_limit_bytes"]
    click.echo(f"kernel path       {report['kernel_path']} "
               f"(available: {', '.join(report['kernel_paths_available'])})")
    click.echo(f"cores             {report['cores']}")
    click.echo(f"available RAM     {format_bytes(report['available_ram_bytes'])} "
               f"of {format_bytes(report['mem_total_bytes'])}"
               + (f" (cgroup limit {format_bytes(report['cgroup_limit_bytes'])})"
                  if report["cgroup_limit_bytes"] else ""))
    click.echo(f"free swap         {format_bytes(report['free_swap_bytes'])}")
    click.echo(f"locked-memory     {'unlimited' if lim < 0 else format_bytes(lim)}")


def main() -> None:
    cli(prog_name="dllama-node")
