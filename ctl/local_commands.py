"""What dllama-ctl does when it runs the model in this process (no cluster given)."""
from __future__ import annotations

import json
import sys
import time
from typing import Optional, Sequence

import click
import numpy as np

from dllama_node.common.errors import UsageError
from dllama_node.common.memory import peak_rss_bytes
from dllama_node.common.units import format_bytes
from dllama_node.engine.sampler import Sampler, SamplerSettings


def sampler_settings(temperature, top_k, top_p, repetition_penalty, seed) -> SamplerSettings:
    return SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed).validate()


def _open(model_path, tokenizer_path, threads, max_seq_len, quiet=False, **kw):
    from dllama_node.ctl.progress import byte_progress
    from dllama_node.engine.node import LocalNode

    with byte_progress("loading weights", enabled=not quiet) as progress:
        node = LocalNode.open(model_path, tokenizer_path, max_seq_len, threads,
                              progress=progress, **kw)
    if not quiet:
        click.echo(f"{node.context.reason}", err=True)
    return node


def _stop_ids(tok) -> set:
    ids = set(getattr(tok, "eot_ids", ()) or ())
    if tok.eos_id is not None:
        ids.add(tok.eos_id)
    return ids


def generate(model_path, tokenizer_path, threads, max_seq_len, sampler: SamplerSettings,
             prompt: str, max_tokens: int, stop: Sequence[str], chat_format: bool,
             as_json: bool) -> None:
    from dllama_node.engine.text import TextStream

    if max_tokens < 0:
        raise UsageError(f"max-tokens {max_tokens}: expected 0 or more")
    sampler_ = Sampler(sampler)  # validates before the model loads
    with _open(model_path, tokenizer_path, threads, max_seq_len, quiet=as_json) as node:
        tok = node.tokenizer
        if chat_format:
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = tok.encode(prompt)
        stream = TextStream(tok, stop)
        out = []
        gen = node.session.generate(ids, max_tokens, sampler_, _stop_ids(tok),
                                    vocab_limit=tok.vocab_size)
        try:
            for token in gen:
                out.append(token)
                piece = stream.push(token)
                if not as_json and piece:
                    click.echo(piece, nl=False)
                if stream.stopped:
                    break
        finally:
            gen.close()
        tail = stream.flush()
        t = node.session.timings
        if as_json:
            click.echo(json.dumps({
                "prompt_tokens": list(map(int, ids)),
                "tokens": list(map(int, out)),
                "text": stream.text,
                "max_seq_len": node.context.seq_len,
                "prompt_tok_s": round(t.prompt_tok_s, 3),
                "decode_tok_s": round(t.decode_tok_s, 3),
            }))
        else:
            click.echo(tail)
            click.echo(f"[{len(ids)} prompt tokens at {t.prompt_tok_s:.1f} tok/s, "
                       f"{len(out)} generated at {t.decode_tok_s:.1f} tok/s]", err=True)


def chat(model_path, tokenizer_path, threads, max_seq_len, sampler: SamplerSettings,
         system: Optional[str], max_tokens: int) -> None:
    from dllama_node.engine.text import TextStream

    sampler_ = Sampler(sampler)
    with _open(model_path, tokenizer_path, threads, max_seq_len) as node:
        tok = node.tokenizer
        messages = [{"role": "system", "content": system}] if system else []
        interactive = sys.stdin.isatty()
        click.echo("Chat with the model. /reset forgets, /system TEXT sets the system prompt, "
                   "/exit leaves; Ctrl-C stops an answer.", err=True)
        while True:
            try:
                line = input("> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and line == "":
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                messages = [m for m in messages if m["role"] == "system"]
                node.session.reset()
                click.echo("(conversation forgotten)", err=True)
                continue
            if line.startswith("/system"):
                system = line[len("/system"):].strip()
                messages = [{"role": "system", "content": system}] if system else []
                node.session.reset()
                click.echo("(system prompt set; conversation started over)", err=True)
                continue
            messages.append({"role": "user", "content": line})
            ids = tok.encode_chat(messages, add_generation_prompt=True)
            room = node.context.seq_len - len(ids) - 1
            if room <= 0:
                click.echo(f"(the conversation has {len(ids)} tokens and fills the context of "
                           f"{node.context.seq_len}: /reset to start over)", err=True)
                messages.pop()
                continue
            stream = TextStream(tok, [])
            gen = node.session.generate(ids, min(max_tokens, room), sampler_, _stop_ids(tok),
                                        vocab_limit=tok.vocab_size)
            try:
                for token in gen:
                    piece = stream.push(token)
                    if piece:
                        click.echo(piece, nl=False)
            except KeyboardInterrupt:
                click.echo(" [stopped]", err=True)
            finally:
                gen.close()
            click.echo(stream.flush())
            messages.append({"role": "assistant", "content": stream.text})


def bench(model_path, tokenizer_path, threads, max_seq_len, prompt_tokens: int, gen_tokens: int,
          as_json: bool) -> None:
    from dllama_node import kernels

    t0 = time.perf_counter()
    need = prompt_tokens + gen_tokens + 1
    with _open(model_path, tokenizer_path, threads, max_seq_len or need, quiet=as_json,
               load_tokenizer_=False) as node:
        load_s = time.perf_counter() - t0
        vocab = node.weights.config.vocab_size
        rng = np.random.default_rng(0)
        prompt = [1] + rng.integers(3, vocab, prompt_tokens - 1).tolist()
        greedy = Sampler(SamplerSettings(temperature=0))
        produced = sum(1 for _ in node.session.generate(prompt, gen_tokens, greedy, ()))
        t = node.session.timings
        result = {
            "model": model_path,
            "kernel_path": kernels.kernel_path(),
            "threads": node.transformer.n_threads,
            "prompt_tokens": prompt_tokens,
            "gen_tokens": produced,
            "prompt_tok_s": round(t.prompt_tok_s, 3),
            "decode_tok_s": round(t.decode_tok_s, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "weights_bytes": node.weights.nbytes(),
            "kv_cache_bytes": node.transformer.cache.nbytes,
            "max_seq_len": node.context.seq_len,
            "load_s": round(load_s, 3),
        }
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"model          {model_path}")
    click.echo(f"kernel path    {result['kernel_path']}, {result['threads']} threads")
    click.echo(f"prompt eval    {result['prompt_tok_s']:.2f} tok/s ({prompt_tokens} tokens)")
    click.echo(f"decode         {result['decode_tok_s']:.2f} tok/s ({produced} tokens)")
    click.echo(f"peak RSS       {format_bytes(result['peak_rss_bytes'])} "
               f"(weights {format_bytes(result['weights_bytes'])}, "
               f"KV cache {format_bytes(result['kv_cache_bytes'])})")


def make_model(preset: str, weight_type: str, seed: int, output: str) -> None:
    from dllama_node.model.generate import PRESETS, write_random_model

    from dllama_node.ctl.progress import byte_progress

    with byte_progress(f"writing {preset} ({weight_type})") as progress:
        write_random_model(output, PRESETS[preset], weight_type=weight_type, seed=seed,
                           progress=progress)
    click.echo(output)


def info(model_path: str, as_json: bool) -> None:
    from dllama_node.model import open_model

    with open_model(model_path) as model:
        cfg = model.config
        types = {}
        for t in model.tensors.values():
            types[t.ggml_type] = types.get(t.ggml_type, 0) + t.nbytes
        data = {"path": model_path, "format": model.format, "file_size": model.file_size,
                "config": {k: v for k, v in cfg.__dict__.items() if k != "rope_scaling"},
                "rope_scaling": cfg.rope_scaling.__dict__ if cfg.rope_scaling else None,
                "tensors": len(model.tensors),
                "bytes_by_type": {str(k): v for k, v in sorted(types.items())}}
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"{model_path}: {model.format}, {format_bytes(data['file_size'])}, "
               f"{data['tensors']} tensors")
    for k, v in data["config"].items():
        click.echo(f"  {k:16} {v}")
    if data["rope_scaling"]:
        click.echo(f"  {'rope_scaling':16} {data['rope_scaling']}")
