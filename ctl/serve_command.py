"""`dllama-ctl serve`: the OpenAI-compatible HTTP API over a model, without the daemon.

Registered in ctl/cli.py with `cli.add_command(serve)`. Loads the model on this node (or
on N local nodes with --nodes), prints the URL on standard output, and serves until
SIGINT or SIGTERM. The address is bound before the model loads, so a port in use fails at
once, in one line; each request is one access line on stderr (api/server.py access_log).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from typing import Iterator, Optional, Tuple

import click

from dllama_node.api.backend import model_id_from_path as default_model_id
from dllama_node.common.errors import UsageError

DEFAULT_LISTEN = "127.0.0.1:8080"
# Why a bind fails, in words a person can act on (else the system's own words).
LISTEN_FAILURES = {
    errno.EADDRINUSE: "address already in use (is another dllama-ctl serve or dllama-node "
                      "running? choose another --listen)",
    errno.EACCES: "permission denied (ports below 1024 need root: choose another --listen)",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address (choose another "
                         "--listen)",
}


def parse_listen(text: str) -> Tuple[str, int]:
    """'HOST:PORT', '[::1]:PORT' or 'PORT' (on 127.0.0.1) -> (host, port)."""
    text = text.strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise UsageError(f"--listen {text!r}: the port {port_text!r} is not 0-65535") from None
    return host, port


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening) before the model loads, so that a
    port in use fails at once, in one line, not after the load."""
    from dllama_node.api.server import host_port

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = LISTEN_FAILURES.get(e.errno, e.strerror or str(e))
        raise UsageError(f"cannot listen on {host_port(host, port)}: {reason}") from None
    return sock


@contextlib.contextmanager
def access_log_on_stderr() -> Iterator[None]:
    """The HTTP API's access log (one line per request) on stderr, as uvicorn shows it,
    whatever -v says; the logger as it was afterwards."""
    from dllama_node.api.server import access_log

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = access_log.level, access_log.propagate
    access_log.setLevel(logging.INFO)
    access_log.propagate = False                  # once, not again through -v's handler
    access_log.addHandler(handler)
    try:
        yield
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(level)
        access_log.propagate = propagate


async def _serve(backend, config, listener: socket.socket, announce) -> None:
    from dllama_node.api.server import ApiServer

    server = ApiServer(backend, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start(listener)
    announce(server)
    try:
        await stop.wait()
    finally:
        await server.stop()


@click.command("serve")
@click.option("--model", "-m", "model_path", required=True, metavar="PATH",
              help="Model file: GGUF (llama architecture) or distributed-llama .m.")
@click.option("--tokenizer", "tokenizer_path", metavar="PATH",
              help="Tokenizer file; default: the one inside the GGUF.")
@click.option("--threads", "-t", type=click.IntRange(1, 1024), default=None,
              help="Compute threads (default: the cores this process may use).")
@click.option("--max-seq-len", type=int, default=None,
              help="Context length (prompt and answer together) to reserve KV cache for.")
@click.option("--nodes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Start this many nodes on this machine (loopback) and split the model.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Address to serve on. Any address other than loopback needs --key-file; "
                   "port 0 picks a free one.")
@click.option("--key-file", metavar="PATH", default=None,
              help="Cluster key file: clients send its 64 hex digits as "
                   "'Authorization: Bearer ...' (required off loopback).")
@click.option("--queue", "queue_size", type=click.IntRange(0, 4096), default=8,
              show_default=True,
              help="Requests that may wait while one generates; more get 503 + Retry-After.")
@click.option("--model-id", default=None,
              help="The model's name in /v1/models (default: the file name without extension).")
def serve(model_path: str, tokenizer_path: Optional[str], threads: Optional[int],
          max_seq_len: Optional[int], nodes: int, listen: str, key_file: Optional[str],
          queue_size: int, model_id: Optional[str]) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, without the daemon.

    \b
    Endpoints: POST /v1/chat/completions, POST /v1/completions (both stream with
    "stream": true), GET /v1/models, GET /health, GET /metrics (Prometheus).
    \b
    Example:
      dllama-ctl serve --model small.gguf --listen 127.0.0.1:8080
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    With the openai package: OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused").
    """
    from dllama_node.api.backend import EngineBackend
    from dllama_node.api.server import ApiConfig, needs_auth
    from dllama_node.cluster.auth import read_key
    from dllama_node.ctl.runner import open_runner, run_options

    host, port = parse_listen(listen)
    key = read_key(key_file) if key_file else None
    if needs_auth(host) and key is None:
        raise UsageError(f"--listen {listen}: serving beyond loopback needs --key-file (clients "
                         "authenticate with the cluster key as a bearer token)")
    config = ApiConfig(host=host, port=port, key=key, queue_size=queue_size)
    model_id = model_id or default_model_id(model_path)

    def announce(server) -> None:
        click.echo(f"serving {model_id} at {server.url}/v1", err=True)
        click.echo(f"{server.url}/v1")          # stdout: the URL alone, for scripts

    with bind_listener(host, port) as listener, access_log_on_stderr(), \
            open_runner(run_options(model_path, tokenizer_path, threads, max_seq_len,
                                    nodes)) as runner:
        backend = EngineBackend(runner, model_id)
        asyncio.run(_serve(backend, config, listener, announce))
    click.echo("stopped", err=True)
