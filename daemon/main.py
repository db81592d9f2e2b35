"""dllama-node: the per-board service.

Runs under systemd (Type=notify: READY, STATUS in words, WATCHDOG from the working loop)
or in the foreground. Configuration: /etc/dllama-node/dllama-node.conf, then DLLAMA_*
environment variables, then these flags. `--check` reports what this board offers a
cluster and exits.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

import click

from dllama_node.common.errors import DllamaError
from dllama_node.common.memory import read_memory
from dllama_node.common.process_limits import lockable_bytes
from dllama_node.common.units import format_bytes


def node_report() -> dict:
    from dllama_node import kernels

    mem = read_memory()
    return {
        "kernel_path": kernels.kernel_path(),
        "kernel_paths_available": kernels.available_paths(),
        "cores": len(os.sched_getaffinity(0)),
        "mem_total_bytes": mem.mem_total_bytes,
        "available_ram_bytes": mem.available_bytes,
        "cgroup_limit_bytes": mem.cgroup_limit_bytes,
        "free_swap_bytes": mem.swap_free_bytes,
        "memlock_limit_bytes": lockable_bytes(),
    }


def print_report(report: dict) -> None:
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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dllama-node", prog_name="dllama-node")
@click.option("--check", is_flag=True, help="Report this node's capacity and kernel path, then exit.")
@click.option("--json", "as_json", is_flag=True, help="With --check: one JSON object.")
@click.option("--config", "config_path", metavar="PATH", default=None,
              help="Configuration file (default /etc/dllama-node/dllama-node.conf).")
@click.option("--node-id", default=None, help="This node's name (default: the host name).")
@click.option("--cluster", default=None, help="Cluster name; only nodes with the same one join.")
@click.option("--model", default=None, metavar="PATH", help="The model file this node holds.")
@click.option("--tokenizer", default=None, metavar="PATH")
@click.option("--listen", default=None, metavar="HOST:PORT", help="The cluster port (TCP and UDP).")
@click.option("--control-socket", default=None, metavar="PATH", help="Where dllama-ctl connects.")
@click.option("--http-listen", default=None, metavar="HOST:PORT|off",
              help="The OpenAI-compatible HTTP API (default 127.0.0.1:8080; beyond loopback "
                   "the cluster key is the bearer token).")
@click.option("--state-dir", default=None, metavar="DIR")
@click.option("--key-file", default=None, metavar="PATH", help="The cluster key.")
@click.option("--static-peer", "static_peers", multiple=True, metavar="HOST:PORT",
              help="A peer to reach directly where multicast is blocked (repeatable).")
@click.option("--no-mdns", "mdns", flag_value=False, default=None, help="Do not use mDNS.")
@click.option("--interface", "interfaces", multiple=True, help="Interface address for mDNS.")
@click.option("--threads", type=int, default=None)
@click.option("--max-seq-len", type=int, default=None)
@click.option("--allow-swap", is_flag=True, default=None)
@click.option("--coordinator-only", is_flag=True, default=None,
              help="May be the root, holds no slice.")
@click.option("--never-root", is_flag=True, default=None, help="Never become the root.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(check, as_json, config_path, verbose, **flags) -> None:
    """The dllama cluster service for one board.

    \b
    Finds its peers by mDNS (or --static-peer), elects a root, plans the model across
    the nodes by their free memory and speed, loads this node's slice, and serves.
    dllama-ctl talks to it through the control socket; journalctl -u dllama-node
    explains what it did and why, out-of-memory kills above all.
    """
    if check:
        report = node_report()
        click.echo(json.dumps(report)) if as_json else print_report(report)
        return
    from dllama_node.daemon import journal
    from dllama_node.daemon.config import ConfigSource
    from dllama_node.daemon.service import NodeService

    flags = {k: v for k, v in flags.items() if v not in (None, (), False) or k == "mdns"}
    if flags.get("mdns") is None:
        flags.pop("mdns", None)
    try:
        source = ConfigSource(config_path, flags)
        config = source.load()
        journal.setup_logging(config.node_id, logging.DEBUG if verbose else logging.INFO)
        asyncio.run(NodeService(config, source).run())
    except DllamaError as e:
        logging.getLogger("dllama_node.node").error("%s", e)
        click.echo(f"dllama-node: error: {e}", err=True)
        sys.exit(e.exit_code)


def main() -> None:
    cli(prog_name="dllama-node")
