"""What dllama-ctl does with a model: on this node, or on N local nodes (--nodes), as the
run's options (cluster/run_options.py, built once by ctl/cli.py) say."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import click
import numpy as np

from dllama_node.cluster.run_options import RunOptions
from dllama_node.common.errors import UsageError
from dllama_node.common.memory import peak_rss_bytes
from dllama_node.common.units import format_bytes
from dllama_node.engine.sampler import Sampler, SamplerSettings


def sampler_settings(temperature, top_k, top_p, repetition_penalty, seed) -> SamplerSettings:
    return SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed).validate()


def _open(options: RunOptions, quiet: bool = False):
    from dllama_node.ctl.runner import open_runner

    return open_runner(options, quiet)


def generate(options: RunOptions, sampler: SamplerSettings, prompt: str, max_tokens: int,
             stop: Sequence[str], chat_format: bool, as_json: bool) -> None:
    from dllama_node.engine.generate_text import generate_text, outcome_of, sampled
    from dllama_node.tokenizer.conversation_fit import (LIMIT_CONTEXT, AnswerBudget,
                                                        stopped_note)

    if max_tokens < 0:
        raise UsageError(f"max-tokens {max_tokens}: expected 0 or more")
    sampler_ = Sampler(sampler)  # validates before the model loads
    with _open(options, quiet=as_json) as node:
        tok = node.tokenizer
        if chat_format:
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = tok.encode(prompt)
        budget = AnswerBudget(max_tokens, node.seq_len, len(ids))   # what the context leaves

        def show(piece) -> None:
            if not as_json and piece.text:
                click.echo(piece.text, nl=False)
        outcome = outcome_of(generate_text(sampled(node, sampler_), tok, ids, budget, stop),
                             show)
        t = node.session.timings
        if as_json:
            click.echo(json.dumps({
                "prompt_tokens": list(map(int, ids)),
                "tokens": outcome.tokens,
                "text": outcome.text,
                "finish_reason": outcome.finish_reason,
                "limit": outcome.limit,
                "max_seq_len": node.seq_len,
                "nodes": options.nodes,
                "prompt_tok_s": round(t.prompt_tok_s, 3),
                "decode_tok_s": round(t.decode_tok_s, 3),
            }))
        else:
            click.echo("")
            click.echo(f"[{len(ids)} prompt tokens at {t.prompt_tok_s:.1f} tok/s, "
                       f"{outcome.completion_tokens} generated at {t.decode_tok_s:.1f} tok/s]",
                       err=True)
            if outcome.limit == LIMIT_CONTEXT:
                click.echo(stopped_note(LIMIT_CONTEXT, node.seq_len), err=True)


def chat(options: RunOptions, sampler: SamplerSettings, system: Optional[str],
         max_tokens: int) -> None:
    """The same chat as through the service (ctl/chat_repl.py: multi-line input, /reset,
    /system, /help, Ctrl-C, history), answered by the model on this machine: one process,
    or --nodes N processes over loopback."""
    from dllama_node.ctl.chat_repl import chat_in_terminal
    from dllama_node.engine.generate_text import Outcome, generate_text, sampled
    from dllama_node.tokenizer.conversation_fit import AnswerBudget, answer_reserve, fit_chat

    sampler_ = Sampler(sampler)
    if max_tokens < 0:
        raise UsageError(f"max-tokens {max_tokens}: expected 0 or more")
    with _open(options) as node:
        tok = node.tokenizer

        def send(messages):
            ids, fit = fit_chat(tok, messages, node.seq_len, answer_reserve(node.seq_len,
                                                                             max_tokens))
            budget = AnswerBudget(max_tokens, node.seq_len, len(ids))
            if fit.dropped_turns:
                yield {"dropped_turns": fit.dropped_turns, "max_seq_len": node.seq_len}
            for event in generate_text(sampled(node, sampler_), tok, ids, budget):
                if isinstance(event, Outcome):
                    yield {"done": True, "text": event.text, "tokens": event.tokens,
                           "dropped_turns": fit.dropped_turns, **event.finish()}
                elif event.text:
                    yield {"token": event.token, "text": event.text}

        where = f"{options.nodes} nodes of this machine" if options.nodes > 1 else "this machine"
        chat_in_terminal(send, system,
                         f"Chat with {os.path.basename(options.model_path)} on {where}.")


def bench(options: RunOptions, prompt_tokens: int, gen_tokens: int, as_json: bool) -> None:
    """Token ids only (no tokenizer loaded), in a context just long enough unless asked."""
    from dllama_node import kernels

    t0 = time.perf_counter()
    need = prompt_tokens + gen_tokens + 1
    run = dataclasses.replace(options, max_seq_len=options.max_seq_len or need,
                              load_tokenizer=False)
    with _open(run, quiet=as_json) as node:
        load_s = time.perf_counter() - t0
        vocab = node.session.transformer.cfg.vocab_size
        rng = np.random.default_rng(0)
        prompt = [1] + rng.integers(3, vocab, prompt_tokens - 1).tolist()
        greedy = Sampler(SamplerSettings(temperature=0))
        if node.sync_stats is not None:
            # prompt first, then the decode steps alone for the per-token sync figures
            list(node.generate(prompt, 1, greedy))
            prompt_timing = node.session.timings
            node.node_stats(reset=True)
            produced = 1 + sum(1 for _ in node.generate(node.session.cached, gen_tokens - 1,
                                                         greedy))
            decode_timing = node.session.timings
        else:
            produced = sum(1 for _ in node.generate(prompt, gen_tokens, greedy))
            prompt_timing = decode_timing = node.session.timings
        result = {
            "model": options.model_path,
            "kernel_path": kernels.kernel_path(),
            "nodes": options.nodes,
            "threads": node.threads,
            "prompt_tokens": prompt_tokens,
            "gen_tokens": produced,
            "prompt_tok_s": round(prompt_timing.prompt_tok_s, 3),
            "decode_tok_s": round(decode_timing.decode_tok_s, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "weights_bytes": node.weights_bytes,
            "kv_cache_bytes": node.kv_cache_bytes,
            "max_seq_len": node.seq_len,
            "load_s": round(load_s, 3),
        }
        if node.sync_stats is not None:
            per_node = node.node_stats()
            st = node.sync_stats
            steps = max(st.steps, 1)
            wall_ms = 1000 * decode_timing.decode_s / max(decode_timing.decode_steps, 1)
            slowest_ms = max(1000 * d["compute_s"] / max(d["steps"], 1) for d in per_node.values())
            result.update({
                # what the exchange costs per token beyond the slowest node's own compute
                "sync_ms_per_token": round(wall_ms - slowest_ms, 3),
                "root_sync_wait_ms_per_token": round(1000 * st.sync_s / steps, 3),
                "compute_ms_per_token": {k: round(1000 * d["compute_s"] / max(d["steps"], 1), 3)
                                         for k, d in per_node.items()},
                "wire": options.wire,
                "sync": node.root.sync_mode,
                "wire_bytes_per_token": (st.bytes_sent + st.bytes_received) // steps,
                "per_node": [{"node_id": r.node_id, "role": r.role,
                              "planned_bytes": r.planned_bytes, "rss_bytes": r.rss_bytes,
                              "weights_bytes": r.weights_bytes} for r in node.reports],
            })
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"model          {options.model_path}")
    click.echo(f"kernel path    {result['kernel_path']}, "
               f"{options.nodes} node(s) x {result['threads']} threads")
    click.echo(f"prompt eval    {result['prompt_tok_s']:.2f} tok/s ({prompt_tokens} tokens)")
    click.echo(f"decode         {result['decode_tok_s']:.2f} tok/s ({produced} tokens)")
    click.echo(f"peak RSS       {format_bytes(result['peak_rss_bytes'])} "
               f"(weights {format_bytes(result['weights_bytes'])}, "
               f"KV cache {format_bytes(result['kv_cache_bytes'])})")
    if "sync_ms_per_token" in result:
        compute = ", ".join(f"{k} {v:.2f}" for k, v in result["compute_ms_per_token"].items())
        click.echo(f"compute        ms per token: {compute}")
        click.echo(f"sync           {result['sync_ms_per_token']:.2f} ms per token beyond the slowest "
                   f"node's compute; {format_bytes(result['wire_bytes_per_token'])} on the wire "
                   f"per token at the root ({options.wire})")
        for r in result["per_node"]:
            click.echo(f"memory {r['node_id']:8}RSS {format_bytes(r['rss_bytes'])}, planned "
                       f"{format_bytes(r['planned_bytes'])} "
                       f"({r['rss_bytes'] / max(r['planned_bytes'], 1):.2f} of plan)")


def make_model(preset: str, weight_type: str, seed: int, output: str) -> None:
    from dllama_node.model.generate import PRESETS, write_random_model

    from dllama_node.ctl.progress import byte_progress

    with byte_progress(f"writing {preset} ({weight_type})") as progress:
        write_random_model(output, PRESETS[preset], weight_type=weight_type, seed=seed,
                           progress=progress)
    click.echo(output)


def parse_sizes(text: str) -> list:
    """'1G,512M,2048' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    out = []
    for part in text.split(","):
        p = part.strip().upper().rstrip("IB").rstrip("B") if part.strip() else ""
        try:
            out.append(int(float(p[:-1]) * units[p[-1]]) if p and p[-1] in units else int(p))
        except (ValueError, IndexError):
            raise UsageError(f"--node-ram {part!r}: expected a size such as 512M or 2G") from None
    return out


def plan(model_path, nodes, node_ram, split, max_seq_len, allow_swap, as_json) -> None:
    from dllama_node.cluster.planning import local_capacities, make_plan, parse_split
    from dllama_node.model import open_model
    from dllama_node.plan import NodeCapacity, format_plan

    if node_ram:
        sizes = parse_sizes(node_ram)
        caps = [NodeCapacity(f"n{i}", size, 0, -1, 1, 1.0) for i, size in enumerate(sizes)]
    else:
        caps = local_capacities(nodes or 1)
    with open_model(model_path) as model:
        shard_plan = make_plan(model, caps, max_seq_len, parse_split(split, len(caps)),
                               allow_swap=allow_swap)
    if as_json:
        click.echo(json.dumps(shard_plan.to_dict()))
    else:
        click.echo(format_plan(shard_plan))
