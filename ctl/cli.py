"""dllama-ctl: generate, chat, bench, and make test models, from the command line.

Options map one to one onto the engine's settings; this module only translates. Errors
the user can act on (DllamaError) are caught once, here at the edge, and printed on one
line with a named exit code; --debug shows the traceback instead.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

import click

from dllama_node.common import errors
from dllama_node.ctl import local_commands
from dllama_node.ctl.key import key_group
from dllama_node.ctl.runner import run_options

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 failure, 2 bad usage or option value, 3 model file error, "
    "4 tokenizer error, 5 does not fit in memory, 6 cluster error, 130 interrupted."
)


class DllamaGroup(click.Group):
    """Catches DllamaError at the edge: one line on stderr, the error's exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except errors.DllamaError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"dllama-ctl: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("dllama-ctl: interrupted", err=True)
            ctx.exit(errors.EXIT_INTERRUPTED)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("dllama-node")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


@click.group(cls=DllamaGroup, epilog=EXIT_CODES_HELP)
@click.version_option(_version(), prog_name="dllama-ctl")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.option("--config", "config_path", metavar="PATH", default=None,
              help="The service's configuration file, for its key file, control socket and "
                   "model (default /etc/dllama-node/dllama-node.conf).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int, config_path: Optional[str]) -> None:
    """Run a Llama-family model on this node or a dllama cluster.

    \b
    On a node of a cluster (the dllama-node service running):
      dllama-ctl status                 # the nodes, the root, the plan
      dllama-ctl chat                   # talk to the model, from any node
      dllama-ctl doctor                 # what to fix, OOM kills above all
      dllama-ctl logs --oom             # the journal's memory events

    \b
    Quick start on one machine, without the service:
      dllama-ctl make-model --preset small -o small.gguf
      dllama-ctl generate --model small.gguf --prompt "Once upon a time" --temperature 0
      dllama-ctl chat --model small.gguf
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["config_path"] = config_path
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _options(*options):
    """A decorator applying click options in the order listed."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


def model_options(f=None, *, required: bool = True):
    """Options shared by every command that loads a model. With required=False, leaving
    out --model means: go through the dllama-node service instead."""
    if f is None:
        return lambda g: model_options(g, required=required)
    model_help = "Model file: GGUF (llama architecture) or distributed-llama .m."
    if not required:
        model_help += (" Run it here, in this process; without --model the request goes to "
                       "the dllama-node service (the cluster).")
    options = [
        click.option("--model", "-m", "model_path", required=required, metavar="PATH",
                     help=model_help),
        click.option("--tokenizer", "tokenizer_path", metavar="PATH",
                     help="Tokenizer file (tokenizer.model or distributed-llama .t); "
                          "default: the one inside the GGUF."),
        click.option("--threads", "-t", type=click.IntRange(1, 1024), default=None,
                     help="Compute threads (default: the cores this process may use)."),
        click.option("--max-seq-len", type=int, default=None,
                     help="Context length to reserve KV cache for (default: what fits memory, "
                          "at most 4096 and the model's context)."),
    ]
    return _options(*options)(f)


def cluster_options(f):
    """Run on N nodes of this machine: real processes over loopback TCP."""
    options = [
        click.option("--nodes", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Start this many nodes on this machine (loopback), one thread each "
                          "unless --threads, and split the model across them."),
        click.option("--split", metavar="W1,W2,...", default=None,
                     help="Relative share of the work per node, e.g. 2,1,1 (default: equal)."),
        click.option("--wire", type=click.Choice(["q8_0", "f32"]), default="q8_0",
                     show_default=True, help="How activations cross the network."),
        click.option("--stream-weights", is_flag=True,
                     help="Workers get their slices from the root (hash-checked, cached on "
                          "disk) instead of reading their own copy of the model file."),
    ]
    return _options(*options)(f)


def socket_option(f):
    """Where the service listens, for the commands that talk to it."""
    return click.option(
        "--socket", "socket_path", metavar="PATH", default=None,
        help="The service's control socket (default: $DLLAMA_CONTROL_SOCKET, else "
             "control_socket in the config, /run/dllama-node/control.sock).")(f)


def _client(socket_path: Optional[str], without_service: str = ""):
    from dllama_node.ctl.daemon_client import DaemonClient
    ctx = click.get_current_context()
    return DaemonClient.from_settings(socket_path, (ctx.obj or {}).get("config_path"),
                                      without_service)


def _runs_here(command: str) -> str:
    """What a command that goes to the service can do without it: run a model file here."""
    return f"dllama-ctl {command} --model FILE runs a model file in this process"


def _no_local_options(**given) -> None:
    """Options that only mean something for a model run here, given without --model."""
    for name, value in given.items():
        if value not in (None, False, 1, "q8_0"):
            raise errors.UsageError(
                f"--{name.replace('_', '-')} needs --model: without --model, generation goes "
                "to the dllama-node service, which has its own settings")


def wait_option(default: Optional[float]):
    text = ("If the cluster is not serving yet, wait this long (seconds) for it, with a "
            "progress bar per node while the slices load; 0 fails at once.")
    if default is None:
        text = ("With --wait: give up after this long (seconds).")
    return click.option("--wait-timeout", "wait_s", type=click.FloatRange(0), metavar="SECONDS",
                        default=default if default is not None else 600.0, show_default=True,
                        help=text)


def sampler_options(f):
    options = [
        click.option("--temperature", type=float, default=0.8, show_default=True,
                     help="0 is greedy: always the most likely token."),
        click.option("--top-k", type=int, default=40, show_default=True, help="0 is off."),
        click.option("--top-p", type=float, default=0.95, show_default=True, help="1.0 is off."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
                     help="Above 1 discourages repeating the last 64 tokens; 1.0 is off."),
        click.option("--seed", type=int, default=None, help="Seed for sampling; same seed, same text."),
    ]
    return _options(*options)(f)


def _prompt(prompt: Optional[str], words: tuple) -> str:
    """--prompt, else the arguments, else standard input when it is piped: a terminal's
    would wait in silence for text nobody knows to type."""
    if prompt is not None and words:
        raise errors.UsageError(f"prompt given twice: --prompt and {len(words)} argument(s)")
    if prompt is not None:
        return prompt
    if words:
        return " ".join(words)
    if sys.stdin is None or sys.stdin.isatty():
        raise errors.UsageError("no prompt: give it with --prompt TEXT, as arguments "
                                "(dllama-ctl generate Once upon a time), or pipe it in "
                                "(echo TEXT | dllama-ctl generate)")
    return sys.stdin.read()


@cli.command()
@model_options(required=False)
@sampler_options
@cluster_options
@socket_option
@click.argument("words", nargs=-1, metavar="[PROMPT]...")
@click.option("--prompt", "-p", default=None, help="Prompt text (default: the arguments, else "
                                                     "standard input when it is not a terminal).")
@click.option("--max-tokens", "-n", type=int, default=256, show_default=True,
              help="Most tokens to generate.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--chat-format", "chat_format", is_flag=True,
              help="Wrap the prompt in the model's chat template as one user turn.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: prompt_tokens, tokens, text, timings.")
@wait_option(600.0)
def generate(model_path, tokenizer_path, threads, max_seq_len, temperature, top_k, top_p,
             repetition_penalty, seed, nodes, split, wire, stream_weights, socket_path, words,
             prompt, max_tokens, stop, chat_format, as_json, wait_s):
    """Generate text from a prompt, streaming it to standard output.

    \b
    Through the cluster (the dllama-node service on this machine):
      dllama-ctl generate Once upon a time
      echo "Summarise: ..." | dllama-ctl generate --chat-format --json
    With a model file, in this process (or --nodes N processes on this machine):
      dllama-ctl generate --model small.gguf --temperature 0 "Once upon a time"
    """
    prompt = _prompt(prompt, words)
    if model_path is None:
        from dllama_node.ctl import remote_commands
        _no_local_options(tokenizer=tokenizer_path, threads=threads, max_seq_len=max_seq_len,
                          nodes=nodes, split=split, wire=wire, stream_weights=stream_weights)
        params = remote_commands.generation_params(temperature, top_k, top_p,
                                                   repetition_penalty, seed, max_tokens, stop)
        remote_commands.generate(_client(socket_path, _runs_here("generate")), prompt,
                                 chat_format, params, as_json, wait_s)
        return
    local_commands.generate(
        run_options(model_path, tokenizer_path, threads, max_seq_len, nodes, split, wire,
                    stream_weights),
        sampler=local_commands.sampler_settings(temperature, top_k, top_p, repetition_penalty, seed),
        prompt=prompt, max_tokens=max_tokens, stop=stop, chat_format=chat_format,
        as_json=as_json)


@cli.command()
@model_options(required=False)
@sampler_options
@cluster_options
@socket_option
@click.option("--system", default=None, help="System prompt for the conversation.")
@click.option("--max-tokens", "-n", type=int, default=512, show_default=True,
              help="Most tokens per answer.")
@wait_option(600.0)
def chat(model_path, tokenizer_path, threads, max_seq_len, temperature, top_k, top_p,
         repetition_penalty, seed, nodes, split, wire, stream_weights, socket_path, system,
         max_tokens, wait_s):
    """Talk with the model. Type a message and press Enter.

    \b
    /reset         forget the conversation
    /system TEXT   set the system prompt and start over
    /help          the commands
    /exit          leave (or Ctrl-D)
    A line ending in \\ continues; \"\"\" opens and closes a block of lines.
    Ctrl-C stops the answer being written, not the session.

    \b
    Without --model, the chat goes through the dllama-node service (works on any node):
      dllama-ctl chat --system "Answer in one sentence."
    With --model, the model runs in this process (or --nodes N processes on this machine):
      dllama-ctl chat --model small.gguf
      dllama-ctl chat --model small.gguf --nodes 3
    """
    if model_path is None:
        from dllama_node.ctl import remote_commands
        _no_local_options(tokenizer=tokenizer_path, threads=threads, max_seq_len=max_seq_len,
                          nodes=nodes, split=split, wire=wire, stream_weights=stream_weights)
        params = remote_commands.generation_params(temperature, top_k, top_p,
                                                   repetition_penalty, seed, max_tokens)
        remote_commands.chat(_client(socket_path, _runs_here("chat")), params, system, wait_s)
        return
    local_commands.chat(
        run_options(model_path, tokenizer_path, threads, max_seq_len, nodes, split, wire,
                    stream_weights),
        sampler=local_commands.sampler_settings(temperature, top_k, top_p, repetition_penalty, seed),
        system=system, max_tokens=max_tokens)


@cli.command()
@model_options
@cluster_options
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--gen-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def bench(model_path, tokenizer_path, threads, max_seq_len, nodes, split, wire, stream_weights,
          prompt_tokens, gen_tokens, as_json):
    """Measure prompt evaluation and decode speed, and peak memory.

    Evaluates PROMPT_TOKENS fixed token ids as one prompt, then generates GEN_TOKENS
    greedy tokens. Prints tokens per second for both, peak RSS and the kernel path; with
    --nodes, also the plan, each node's measured memory next to it, the sync time and the
    bytes on the wire per token.
    """
    local_commands.bench(run_options(model_path, tokenizer_path, threads, max_seq_len, nodes,
                                     split, wire, stream_weights),
                         prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, as_json=as_json)


@cli.command()
@click.option("--model", "-m", "model_path", default=None, metavar="PATH",
              help="Model file (with --nodes/--node-ram: required; for the cluster: default "
                   "the model the service holds).")
@click.option("--nodes", type=click.IntRange(1, 64), default=None,
              help="Plan for this many nodes like this machine (each an equal share of its "
                   "memory).")
@click.option("--node-ram", metavar="SIZE,SIZE,...", default=None,
              help="Plan for nodes with this much available RAM each, e.g. 1G,2G,512M "
                   "(the first is the root).")
@click.option("--split", metavar="W1,W2,...", default=None,
              help="Relative share of the work per node (default: by speed, here equal).")
@click.option("--max-seq-len", type=int, default=None,
              help="Context to plan for (default: the largest that fits every node).")
@click.option("--allow-swap", is_flag=True, help="Let weights that do not fit in RAM use swap.")
@click.option("--json", "as_json", is_flag=True, help="The plan as one JSON object.")
@socket_option
def plan(model_path, nodes, node_ram, split, max_seq_len, allow_swap, as_json, socket_path):
    """Print the shard plan for a model, without loading it.

    \b
    Per node: query heads, KV heads, FFN rows and vocabulary rows it would compute, and
    its bytes: weights, KV cache, buffers, reserve, available RAM, swap, headroom.
    Exits 5 with the numbers and what would fit when the model does not fit.

    \b
    On the running cluster (a dry run: the service's nodes as they are now):
      dllama-ctl plan
      dllama-ctl plan --model other.gguf --max-seq-len 2048
    For capacities you give (offline, nothing running needed):
      dllama-ctl plan --model model.gguf --node-ram 1G,2G,512M
      dllama-ctl plan --model model.gguf --nodes 4
    """
    if nodes is None and node_ram is None:
        from dllama_node.ctl import remote_commands
        if split is not None or allow_swap:
            raise errors.UsageError("--split and --allow-swap need --nodes or --node-ram: the "
                                    "cluster plans with the service's own settings")
        remote_commands.plan(_client(socket_path), model_path, max_seq_len, as_json)
        return
    if model_path is None:
        raise errors.UsageError("--nodes/--node-ram plan a model file: give --model PATH")
    local_commands.plan(model_path, nodes, node_ram, split, max_seq_len, allow_swap, as_json)


@cli.command("make-model")
@click.option("--preset", type=click.Choice(["tiny", "small", "tinyllama-1.1b"]), default="small",
              show_default=True, help="Model shape (tinyllama-1.1b: dim 2048, 22 layers, vocab 32000).")
@click.option("--type", "weight_type", type=click.Choice(["f32", "f16", "q8_0", "q4_0"]),
              default="q4_0", show_default=True, help="Weight type of the matrices.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", "-o", required=True, metavar="PATH", help="GGUF file to write.")
def make_model(preset, weight_type, seed, output):
    """Write a GGUF llama model with random weights, for tests and benchmarks."""
    local_commands.make_model(preset, weight_type, seed, output)


@cli.command()
@click.option("--model", "-m", "model_path", required=True, metavar="PATH")
@click.option("--json", "as_json", is_flag=True)
def info(model_path, as_json):
    """Show a model file's shape, tensor types and sizes, without loading it."""
    from dllama_node.ctl.model_info import info as show_info
    show_info(model_path, as_json)


@cli.command()
@socket_option
@click.option("--json", "as_json", is_flag=True, help="The service's answer as one JSON object.")
@click.option("--wait", is_flag=True,
              help="Wait until the cluster serves, with a progress bar per node while the "
                   "slices load (on stderr), then show the status.")
@wait_option(None)
def status(socket_path, as_json, wait, wait_s):
    """Show the cluster: every node's role, address, RAM, swap, slice, whether its memory is
    locked, tokens/s and state; the root; the plan.

    \b
      dllama-ctl status
      dllama-ctl status --wait          # after `systemctl start dllama-node`: watch it load
      dllama-ctl status --json | jq '.nodes[] | select(.locked == false)'
    """
    from dllama_node.ctl import remote_commands
    remote_commands.status(_client(socket_path), as_json, wait_s if wait else None)


@cli.command()
@socket_option
@click.option("--json", "as_json", is_flag=True)
def models(socket_path, as_json):
    """List the models the cluster's nodes hold, and which nodes hold each."""
    from dllama_node.ctl import remote_commands
    remote_commands.models(_client(socket_path), as_json)


@cli.command()
@socket_option
@click.option("--json", "as_json", is_flag=True, help="The checks as one JSON object.")
@click.option("--since", default="-7d", show_default=True, metavar="TIME",
              help="How far back the OOM history goes (journalctl --since syntax).")
@click.option("--journal-file", metavar="PATH", default=None,
              help="Read `journalctl -o json` output saved from a node instead of the journal.")
@click.option("--kmsg-file", metavar="PATH", default=None,
              help="Read saved /dev/kmsg records (cat /dev/kmsg) instead of the kernel log.")
@click.option("--browse-s", type=click.FloatRange(0, 30), default=1.5, show_default=True,
              help="How long to listen for peers by mDNS when the service is not running.")
def doctor(socket_path, as_json, since, journal_file, kmsg_file, browse_s):
    """Check this node: locked memory, priority, memory and cgroup limit, swap, NUMA,
    peers (multicast), the cluster key, the tokenizer, and the OOM history.

    \b
    Each check prints OK, WARN or FAIL with what it found and, when not OK, the fix.
    The limits checked are the running service's (LimitMEMLOCK=, Nice=, capabilities,
    MemoryMax=), read from its /proc entry. The OOM history comes from the journal
    (journalctl, last 7 days) and the kernel log (/dev/kmsg: root only):
      sudo dllama-ctl doctor
      dllama-ctl doctor --journal-file pi3.json --kmsg-file pi3.kmsg    # a board's saved logs
    Exit code 0 without FAIL; else that of the first FAIL: 5 memory, 6 cluster,
    4 tokenizer.
    """
    from dllama_node.ctl.doctor import DoctorOptions, doctor as run_doctor
    ctx = click.get_current_context()
    code = run_doctor(DoctorOptions(socket_path, (ctx.obj or {}).get("config_path"),
                                    journal_file, kmsg_file, since, browse_s), as_json)
    ctx.exit(code)


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new entries (Ctrl-C stops).")
@click.option("-n", "--lines", type=int, default=None, metavar="N",
              help="Only the last N entries.")
@click.option("--oom", is_flag=True,
              help="Only memory events: OOM diagnoses, memory pressure, vanished peers, "
                   "rejected plans, refused locks.")
@click.option("--since", default=None, metavar="TIME", help="journalctl --since, e.g. -1h.")
@click.option("--journal-file", metavar="PATH", default=None,
              help="Format saved `journalctl -o json` output instead.")
def logs(follow, lines, oom, since, journal_file):
    """The service's journal with the diagnosis fields (node, phase, bytes) shown.

    \b
      dllama-ctl logs -n 50
      dllama-ctl logs --oom --since -1d      # why did a node die?
      dllama-ctl logs -f
    Same entries as journalctl -u dllama-node; the fields are those of
    journalctl -u dllama-node -o verbose. Exit code 1 when there is no journal to read
    (journalctl not found, no entries at all, not allowed to read them).
    """
    from dllama_node.ctl import logs as logs_module
    logs_module.logs(follow, lines, oom, since, journal_file)


cli.add_command(key_group)
try:                                     # the HTTP API (api/), when installed with it
    from dllama_node.ctl.serve_command import serve as _serve
except ImportError as _e:                # pragma: no cover - a build without api/
    logging.getLogger(__name__).debug("no serve command: %s", _e)
else:
    cli.add_command(_serve)


def main(argv: Optional[list] = None) -> None:
    cli.main(args=argv, prog_name="dllama-ctl")


if __name__ == "__main__":  # pragma: no cover
    main()
