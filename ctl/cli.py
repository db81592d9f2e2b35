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
    Quick start on one machine:
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


def model_options(f):
    """Options shared by every command that loads a model."""
    options = [
        click.option("--model", "-m", "model_path", required=True, metavar="PATH",
                     help="Model file: GGUF (llama architecture) or distributed-llama .m."),
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


@cli.command()
@model_options
@sampler_options
@cluster_options
@click.option("--prompt", "-p", default=None, help="Prompt text (default: read standard input).")
@click.option("--max-tokens", "-n", type=int, default=256, show_default=True,
              help="Most tokens to generate.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--chat-format", "chat_format", is_flag=True,
              help="Wrap the prompt in the model's chat template as one user turn.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: prompt_tokens, tokens, text, timings.")
def generate(model_path, tokenizer_path, threads, max_seq_len, temperature, top_k, top_p,
             repetition_penalty, seed, nodes, split, wire, stream_weights, prompt, max_tokens, stop,
             chat_format, as_json):
    """Generate text from a prompt, streaming it to standard output."""
    if prompt is None:
        prompt = sys.stdin.read()
    local_commands.generate(
        model_path=model_path, tokenizer_path=tokenizer_path, threads=threads,
        max_seq_len=max_seq_len,
        sampler=local_commands.sampler_settings(temperature, top_k, top_p, repetition_penalty, seed),
        prompt=prompt, max_tokens=max_tokens, stop=stop, chat_format=chat_format,
        as_json=as_json, nodes=nodes, split=split, wire=wire, stream_weights=stream_weights)


@cli.command()
@model_options
@sampler_options
@click.option("--system", default=None, help="System prompt for the conversation.")
@click.option("--max-tokens", "-n", type=int, default=512, show_default=True,
              help="Most tokens per answer.")
def chat(model_path, tokenizer_path, threads, max_seq_len, temperature, top_k, top_p,
         repetition_penalty, seed, system, max_tokens):
    """Talk with the model. Type a message and press Enter.

    \b
    /reset         forget the conversation
    /system TEXT   set the system prompt and start over
    /exit          leave (or Ctrl-D)
    Ctrl-C stops the answer being written, not the session.
    """
    local_commands.chat(
        model_path=model_path, tokenizer_path=tokenizer_path, threads=threads,
        max_seq_len=max_seq_len,
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
    local_commands.bench(model_path=model_path, tokenizer_path=tokenizer_path, threads=threads,
                         max_seq_len=max_seq_len, prompt_tokens=prompt_tokens,
                         gen_tokens=gen_tokens, as_json=as_json, nodes=nodes, split=split,
                         wire=wire, stream_weights=stream_weights)


@cli.command()
@click.option("--model", "-m", "model_path", required=True, metavar="PATH")
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
def plan(model_path, nodes, node_ram, split, max_seq_len, allow_swap, as_json):
    """Print the shard plan for a model, without loading it.

    \b
    Per node: query heads, KV heads, FFN rows and vocabulary rows it would compute, and
    its bytes: weights, KV cache, buffers, reserve, available RAM, swap, headroom.
    Exits 5 with the numbers and what would fit when the model does not fit.
    """
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
    local_commands.info(model_path, as_json)


cli.add_command(key_group)


def main(argv: Optional[list] = None) -> None:
    cli.main(args=argv, prog_name="dllama-ctl")


if __name__ == "__main__":  # pragma: no cover
    main()
