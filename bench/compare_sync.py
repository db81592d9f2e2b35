"""The cluster's all-reduce topologies side by side, in one run: star (through the root)
against mesh (every node to every node). The mesh is the product's only all-reduce; the
star stays as this benchmark's baseline (bench/star_sync.py), in the product nowhere.

    .venv/bin/python bench/compare_sync.py [--model PATH] [--nodes 2] [--threads 1]
        [--prompt-tokens 128] [--gen-tokens 128] [--wire q8_0] [--rounds 2]
        [--spin-us 0,150] [--json]

For each round it starts a local cluster per topology (star first, then mesh, once per
--spin-us value: how long a mesh node polls before it sleeps), evaluates
a prompt of random ids, resets the counters and decodes greedily, measuring as
`dllama-ctl bench --nodes N --json` does: sync ms/token is the wall time of a decode
step less the slowest node's own compute. Also prints decode tok/s, the root's wait,
each node's compute, bytes on the wire per token at the root and summed over every
node's sends, "other load" (CPUs' worth of time other processes used during the decode:
on this shared 2-core machine a run with more than about 0.1 is not a clean figure),
and whether each topology gave the same tokens every round (with q8_0 on
the wire star and mesh round differently, so their tokens may part on a random model's
near-ties; with f32 they are the same bits). The machine is shared: compare figures of
the same run, and use --rounds to see the spread.
Without --model it uses .cache/tinyllama-1.1b-q4_0.gguf (dllama-ctl make-model --preset
tinyllama-1.1b --type q4_0 writes it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from dllama_node.cluster.local import LocalCluster
from dllama_node.cluster.root import ClusterRoot
from dllama_node.cluster.run_options import DEFAULT_SPIN_US, RunOptions
from dllama_node.engine.sampler import Sampler, SamplerSettings
from star_sync import StarRoot          # bench/star_sync.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, ".cache", "tinyllama-1.1b-q4_0.gguf")


def _busy_ticks() -> int:
    """Clock ticks every CPU spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def _own_ticks(pids) -> int:
    """Clock ticks (user + system) the given processes have used."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total


def measure(model: str, nodes: int, threads: int, prompt_tokens: int, gen_tokens: int,
            wire: str, sync: str, spin_us: int = 0) -> dict:
    """One local cluster with `sync`: the figures of `dllama-ctl bench --json`."""
    greedy = Sampler(SamplerSettings(temperature=0))
    cluster = LocalCluster(RunOptions(model, threads=threads, max_seq_len=prompt_tokens
                                      + gen_tokens + 1, nodes=nodes, wire=wire,
                                      load_tokenizer=False, spin_us=spin_us),
                           root_class=StarRoot if sync == "star" else ClusterRoot)
    pids = [os.getpid()] + [p.pid for p in cluster.processes]
    with cluster as root:
        root.start()
        vocab = root.session.transformer.cfg.vocab_size
        rng = np.random.default_rng(0)
        prompt = [1] + rng.integers(3, vocab, prompt_tokens - 1).tolist()
        tokens = list(root.generate(prompt, 1, greedy))
        root.node_stats(reset=True)
        busy0, own0 = _busy_ticks(), _own_ticks(pids)
        tokens += list(root.generate(root.session.cached, gen_tokens - 1, greedy))
        other = (_busy_ticks() - busy0) - (_own_ticks(pids) - own0)
        timing = root.session.timings
        per_node = root.node_stats()
    steps = max(timing.decode_steps, 1)
    wall_ms = 1000 * timing.decode_s / steps
    compute = {k: 1000 * d["compute_s"] / max(d["steps"], 1) for k, d in per_node.items()}
    root_stats = next(iter(per_node.values()))
    root_steps = max(root_stats["steps"], 1)
    return {
        "sync": sync if sync == "star" else f"{sync}/{spin_us}", "nodes": nodes, "wire": wire,
        "decode_steps": timing.decode_steps,
        "decode_tok_s": round(timing.decode_tok_s, 3),
        "sync_ms_per_token": round(wall_ms - max(compute.values()), 3),
        "root_sync_wait_ms_per_token": round(1000 * root_stats["sync_s"] / root_steps, 3),
        "compute_ms_per_token": {k: round(v, 3) for k, v in compute.items()},
        "wire_bytes_per_token_at_root": (root_stats["bytes_sent"]
                                         + root_stats["bytes_received"]) // root_steps,
        "wire_bytes_per_token_all_nodes": sum(d["bytes_sent"] for d in per_node.values())
        // root_steps,
        "other_load": round(max(other, 0) / os.sysconf("SC_CLK_TCK") / max(timing.decode_s, 1e-9),
                            2),
        "tokens": tokens,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--wire", default="q8_0", choices=("q8_0", "f32"))
    ap.add_argument("--rounds", type=int, default=1, help="star then mesh, this many times")
    ap.add_argument("--spin-us", default=str(DEFAULT_SPIN_US),
                    help="comma-separated: one mesh run per value of its poll-before-sleep "
                         f"limit (default {DEFAULT_SPIN_US})")
    ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
    args = ap.parse_args(argv)
    if not os.path.exists(args.model):
        print(f"no model at {args.model}: make one with dllama-ctl make-model --preset "
              f"tinyllama-1.1b --type q4_0 -o {args.model}", file=sys.stderr)
        return 2
    runs = [("star", 0)] + [("mesh", int(v)) for v in args.spin_us.split(",")]
    results = []
    for _ in range(args.rounds):
        for mode, spin_us in runs:
            r = measure(args.model, args.nodes, args.threads, args.prompt_tokens,
                        args.gen_tokens, args.wire, mode, spin_us)
            results.append(r)
            if args.json:
                print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
    first = {r["sync"]: r["tokens"] for r in reversed(results)}
    same = {mode: all(r["tokens"] == first[mode] for r in results if r["sync"] == mode)
            for mode in first}
    mesh = next(tokens for mode, tokens in first.items() if mode != "star")
    agree = sum(a == b for a, b in zip(first["star"], mesh))
    if args.json:
        print(json.dumps({"same_tokens_every_round": same, "star_mesh_tokens_equal": agree}))
        return 0
    print(f"{os.path.basename(args.model)}, {args.nodes} nodes x {args.threads} thread(s), "
          f"{args.wire} on the wire, {args.gen_tokens} tokens decoded after "
          f"{args.prompt_tokens}")
    print(f"{'sync':9}{'tok/s':>8}{'sync ms/tok':>13}{'root wait':>11}{'compute ms/tok':>20}"
          f"{'B/tok root':>12}{'B/tok all':>11}{'other load':>12}")
    for r in results:
        compute = "/".join(f"{v:.2f}" for v in r["compute_ms_per_token"].values())
        print(f"{r['sync']:9}{r['decode_tok_s']:8.2f}{r['sync_ms_per_token']:13.3f}"
              f"{r['root_sync_wait_ms_per_token']:11.3f}{compute:>20}"
              f"{r['wire_bytes_per_token_at_root']:12d}{r['wire_bytes_per_token_all_nodes']:11d}"
              f"{r['other_load']:12.2f}")
    print("same tokens every round: " + ", ".join(f"{m} {'yes' if ok else 'NO'}"
                                                   for m, ok in same.items())
          + f"; star and mesh agree on {agree} of {len(mesh)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
