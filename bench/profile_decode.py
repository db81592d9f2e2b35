"""Where a decode step's time goes, kernel by kernel, on a real model file.

    .venv/bin/python bench/profile_decode.py [--model PATH] [--threads 2]
        [--prompt-tokens 128] [--gen-tokens 64] [--repeat 3]

Loads the model the way a node does (engine.load: huge-page memory), evaluates a prompt
of random ids, then decodes greedily with every kernel call timed through a wrapper
around dllama_node.kernels. Prints, per run, tok/s and for each kernel its ms per token
and calls per token; "other" is everything outside the kernels (Python, numpy, the
sampler). Without --model it uses the TinyLlama-shaped file bench/compare_llamacpp.py
writes (.cache/tinyllama-1.1b-q4_0.gguf). On a machine shared with other work, runs
differ: --repeat shows several, the fastest is the one with the machine to itself.
"""
from __future__ import annotations

import argparse
import collections
import os
import time

import numpy as np

from dllama_node import kernels
from dllama_node.engine.forward import Transformer
from dllama_node.engine.generate import Session
from dllama_node.engine.load import load_weights
from dllama_node.engine.sampler import Sampler, SamplerSettings
from dllama_node.model import open_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, ".cache", "tinyllama-1.1b-q4_0.gguf")


class TimedKernels:
    """dllama_node.kernels with every call's time and count added up by name."""

    def __init__(self):
        self.seconds = collections.Counter()
        self.calls = collections.Counter()

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def __getattr__(self, name):
        fn = getattr(kernels, name)
        if not callable(fn):
            return fn

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(args.model):
        raise SystemExit(f"{args.model}: no such file (bench/compare_llamacpp.py writes it)")

    model = open_model(args.model)
    weights = load_weights(model)
    seq_len = args.prompt_tokens + args.repeat * (args.gen_tokens + 1) + 8
    timed = TimedKernels()
    transformer = Transformer(weights, seq_len, args.threads, 64, kernels=timed)
    session = Session(transformer)
    greedy = Sampler(SamplerSettings(temperature=0))
    vocab = weights.config.vocab_size
    prompt = [1] + np.random.default_rng(0).integers(3, vocab, args.prompt_tokens - 1).tolist()
    list(session.generate(prompt, 1, greedy))
    print(f"{args.model}: kernel path {kernels.kernel_path()}, {args.threads} threads, "
          f"decoding from position {args.prompt_tokens}, load average "
          f"{os.getloadavg()[0]:.2f}")
    for _ in range(args.repeat):
        timed.reset()
        n = args.gen_tokens
        t0 = time.perf_counter()
        list(session.generate(session.cached + [5], n, greedy))
        total = time.perf_counter() - t0
        print(f"{n / total:6.1f} tok/s, {1000 * total / n:6.2f} ms/token")
        for name, s in timed.seconds.most_common():
            print(f"    {name:14} {1000 * s / n:7.3f} ms/token  {timed.calls[name] / n:5.1f} calls")
        print(f"    {'other':14} {1000 * (total - sum(timed.seconds.values())) / n:7.3f} ms/token")


if __name__ == "__main__":
    main()
