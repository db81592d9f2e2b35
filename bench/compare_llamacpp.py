"""dllama-node against llama.cpp on the same GGUF file, side by side, in one run.

    .venv/bin/python bench/compare_llamacpp.py [--model PATH] [--threads 2]
        [--prompt-tokens 128] [--gen-tokens 128] [--llama-python PYTHON]

Without --model it writes (once, into .cache/) a TinyLlama-1.1B-shaped Q4_0 model with
random weights. Each engine runs in a fresh process so its peak RSS is its own:
`dllama-ctl bench --json`, and llama-cpp-python with use_mmap=False, fed the same
prompt ids and decoding greedily. llama.cpp is optional: without llama_cpp importable
(here or in --llama-python's environment) its column says why it is missing.
Targets (issue 2): decode >= 0.8x, prompt eval >= 0.6x, peak RSS <= 1.05x llama.cpp.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

LLAMA_CPP_RUNNER = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from llama_cpp import Llama
    path, threads, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    n_ctx = n_prompt + n_gen + 8
    # n_batch = n_ctx: llama-cpp-python keeps one row of scores per batch slot
    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=n_ctx, use_mmap=False, verbose=False)
    vocab = llm.n_vocab()
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, vocab, n_prompt - 1).tolist()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(n_gen):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    t2 = time.perf_counter()
    import llama_cpp
    print(json.dumps({"prompt_tok_s": n_prompt / (t1 - t0), "decode_tok_s": n_gen / (t2 - t1),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "version": llama_cpp.__version__}))
""")


def find_llama_python(explicit):
    candidates = [explicit] if explicit else [sys.executable, "/opt/llamacpp/bin/python"]
    for py in candidates:
        if py and os.path.exists(py) and subprocess.run(
                [py, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
            return py, None
    return None, ("llama_cpp is not importable" + (f" with {explicit}" if explicit else "")
                  + "; build it with CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 "
                  "-mno-amx-bf16'\" pip install llama-cpp-python==0.3.36")


def ensure_model(path):
    if path:
        return path
    path = os.path.join(ROOT, ".cache", "tinyllama-1.1b-q4_0.gguf")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        subprocess.run([_ctl(), "make-model", "--preset", "tinyllama-1.1b", "--type", "q4_0",
                        "-o", path], check=True)
    return path


def _ctl():
    ctl = os.path.join(os.path.dirname(sys.executable), "dllama-ctl")
    return ctl if os.path.exists(ctl) else shutil.which("dllama-ctl") or "dllama-ctl"


def run_ours(model, args):
    out = subprocess.run([_ctl(), "bench", "--model", model, "--threads", str(args.threads),
                          "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
                          str(args.gen_tokens), "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"dllama-ctl bench failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_llama_cpp(py, model, args):
    out = subprocess.run([py, "-c", LLAMA_CPP_RUNNER, model, str(args.threads),
                          str(args.prompt_tokens), str(args.gen_tokens)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None, f"llama.cpp failed: {out.stderr.strip().splitlines()[-1:]}"
    return json.loads(out.stdout.strip().splitlines()[-1]), None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--llama-python", help="a python whose environment has llama_cpp")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    model = ensure_model(args.model)
    py, why = find_llama_python(args.llama_python)
    # llama.cpp first, so both see the file equally warm in the page cache
    theirs, why2 = run_llama_cpp(py, model, args) if py else (None, why)
    ours = run_ours(model, args)
    rows = [("decode tok/s", "decode_tok_s", 0.8, ">="), ("prompt eval tok/s", "prompt_tok_s", 0.6, ">="),
            ("peak RSS MiB", "peak_rss_bytes", 1.05, "<=")]
    if args.json:
        print(json.dumps({"ours": ours, "llama_cpp": theirs, "llama_cpp_missing": why2}))
        return
    print(f"model: {model}\nthreads: {args.threads}, prompt {args.prompt_tokens} tokens, "
          f"then {args.gen_tokens} greedy tokens; kernel path {ours['kernel_path']}")
    print(f"{'':20}{'dllama-node':>14}{'llama.cpp':>14}{'ratio':>9}   target")
    for label, key, target, op in rows:
        a = ours[key] / (1 << 20) if key == "peak_rss_bytes" else ours[key]
        if theirs:
            b = theirs[key] / (1 << 20) if key == "peak_rss_bytes" else theirs[key]
            ratio = a / b if b else float("nan")
            ok = ratio >= target if op == ">=" else ratio <= target
            print(f"{label:20}{a:14.1f}{b:14.1f}{ratio:9.2f}   {op} {target} "
                  f"{'ok' if ok else 'MISSED'}")
        else:
            print(f"{label:20}{a:14.1f}{'-':>14}")
    if not theirs:
        print(f"llama.cpp: skipped: {why2}")
    else:
        print(f"llama.cpp: llama-cpp-python {theirs['version']}, use_mmap=False")


if __name__ == "__main__":
    main()
