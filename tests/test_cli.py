"""dllama-ctl as people and scripts use it: the JSON interface, and every bad input
ending in one line that names the thing and the number, a named exit code, no traceback,
before any compute. The error cases run the real console script in a subprocess."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from dllama_node.common import errors
from dllama_node.ctl.cli import cli
from dllama_node.model.generate import PRESETS, write_random_model

CTL = os.path.join(os.path.dirname(sys.executable), "dllama-ctl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models") / "tiny-q4_0.gguf")
    write_random_model(path, PRESETS["tiny"], weight_type="q4_0", seed=1)
    return path


def run_ctl(*args, stdin=None):
    return subprocess.run([CTL, *args], capture_output=True, text=True, input=stdin, timeout=120)


def assert_one_line_error(result, code, *words):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines, "no error printed"
    assert "Traceback" not in result.stderr
    last = lines[-1]
    assert last.startswith("dllama-ctl: error: "), last
    for w in words:
        assert w in last, f"{w!r} not in {last!r}"


def test_generate_json_is_deterministic_at_temperature_0(tiny):
    args = ["generate", "--model", tiny, "--prompt", "Once upon a time", "--max-tokens", "12",
            "--temperature", "0", "--threads", "1", "--json"]
    a = json.loads(CliRunner().invoke(cli, args).output)
    b = json.loads(CliRunner().invoke(cli, args).output)
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
    assert len(a["tokens"]) <= 12
    assert a["prompt_tokens"][0] == 1        # BOS
    assert all(isinstance(t, int) for t in a["tokens"])
    assert a["max_seq_len"] == PRESETS["tiny"].seq_len


def test_generate_reads_stdin_and_streams_text(tiny):
    r = run_ctl("generate", "--model", tiny, "--max-tokens", "8", "--temperature", "0",
                stdin="Once upon a time")
    assert r.returncode == 0, r.stderr
    assert "max_seq_len 512" in r.stderr      # the context choice and its reason are printed
    assert "prompt tokens" in r.stderr


def test_bench_json_reports_speeds_memory_and_path(tiny):
    r = CliRunner().invoke(cli, ["bench", "--model", tiny, "--prompt-tokens", "16",
                                 "--gen-tokens", "8", "--threads", "1", "--json"])
    d = json.loads(r.output)
    assert d["decode_tok_s"] > 0 and d["prompt_tok_s"] > 0
    assert d["peak_rss_bytes"] > d["weights_bytes"] > 0
    from dllama_node import kernels
    assert d["kernel_path"] == kernels.kernel_path()


def test_chat_answers_and_resets(tiny):
    r = run_ctl("chat", "--model", tiny, "--max-tokens", "6", "--temperature", "0",
                stdin="hello\n/reset\nhello again\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "(conversation forgotten)" in r.stderr


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    assert_one_line_error(run_ctl("generate", "--model", missing, "--prompt", "x"),
                          errors.EXIT_MODEL, missing)


def test_wrong_magic(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_bytes(b"hello, this is not a model file at all" * 10)
    assert_one_line_error(run_ctl("generate", "--model", str(p), "--prompt", "x"),
                          errors.EXIT_MODEL, "GGUF")


def test_truncated_in_the_header(tiny, tmp_path):
    p = tmp_path / "cut-header.gguf"
    p.write_bytes(open(tiny, "rb").read()[:300])
    assert_one_line_error(run_ctl("generate", "--model", str(p), "--prompt", "x"),
                          errors.EXIT_MODEL, "truncated")


def test_truncated_in_tensor_data(tiny, tmp_path):
    data = open(tiny, "rb").read()
    p = tmp_path / "cut-data.gguf"
    p.write_bytes(data[:len(data) - 5000])
    r = run_ctl("generate", "--model", str(p), "--prompt", "x")
    assert_one_line_error(r, errors.EXIT_MODEL, str(len(data) - 5000))


def test_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    p = str(tmp_path / "mamba.gguf")
    w = gguf.GGUFWriter(p, "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert_one_line_error(run_ctl("info", "--model", p), errors.EXIT_MODEL, "mamba", "llama")


def test_tokenizer_that_does_not_match_the_model(tiny, tmp_path):
    from dllama_node.tokenizer.dllama_t import write_dllama_t
    t = str(tmp_path / "other.t")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [bytes([65 + i % 26]) * (1 + i // 26) for i in range(500)]
    write_dllama_t(t, tokens, [0.0] * len(tokens), bos_id=1, eos_ids=[2])
    assert_one_line_error(run_ctl("generate", "--model", tiny, "--tokenizer", t, "--prompt", "x"),
                          errors.EXIT_TOKENIZER, "503", "2048")


def test_prompt_longer_than_the_context(tiny):
    r = run_ctl("generate", "--model", tiny, "--max-seq-len", "8",
                "--prompt", "a long prompt " * 20)
    assert_one_line_error(r, errors.EXIT_USAGE, "the context holds 8")


def test_max_seq_len_beyond_the_model(tiny):
    assert_one_line_error(run_ctl("generate", "--model", tiny, "--max-seq-len", "100000",
                                  "--prompt", "x"), errors.EXIT_USAGE, "100000", "512")


def test_max_seq_len_larger_than_memory(tmp_path):
    # a small model that claims a context of 2^40 positions: its KV cache cannot fit
    cfg = dataclasses.replace(PRESETS["tiny"], seq_len=1 << 40)
    p = str(tmp_path / "long.gguf")
    write_random_model(p, cfg, weight_type="q8_0")
    r = run_ctl("generate", "--model", p, "--max-seq-len", str(1 << 40), "--prompt", "x")
    assert_one_line_error(r, errors.EXIT_MEMORY, str(1 << 40), "use --max-seq-len")


@pytest.mark.parametrize("option, value, words", [
    ("--temperature", "-1", "temperature -1.0"),
    ("--top-p", "0", "top-p 0.0"),
    ("--top-k", "-3", "top-k -3"),
    ("--repetition-penalty", "0", "repetition penalty 0.0"),
])
def test_sampler_values_are_checked_before_the_model_loads(option, value, words, tmp_path):
    # the model path does not exist: the sampler error must come first
    r = run_ctl("generate", "--model", str(tmp_path / "absent.gguf"), option, value,
                "--prompt", "x")
    assert_one_line_error(r, errors.EXIT_USAGE, words)


def test_debug_shows_the_traceback(tmp_path):
    r = run_ctl("--debug", "generate", "--model", str(tmp_path / "absent.gguf"), "--prompt", "x")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_make_model_and_info(tmp_path):
    p = str(tmp_path / "m.gguf")
    r = CliRunner().invoke(cli, ["make-model", "--preset", "tiny", "--type", "q8_0", "-o", p])
    assert r.exit_code == 0, r.output
    d = json.loads(CliRunner().invoke(cli, ["info", "--model", p, "--json"]).output)
    assert d["config"]["dim"] == PRESETS["tiny"].dim
    assert d["bytes_by_type"]["Q8_0"] > 0         # the matrices


def test_node_check_reports_capacity():
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "dllama-node"), "--check",
                        "--json"], capture_output=True, text=True, timeout=60)
    d = json.loads(r.stdout)
    assert d["available_ram_bytes"] > 0 and d["cores"] >= 1
    assert d["kernel_path"] in d["kernel_paths_available"]


def test_chat_on_three_local_nodes_answers_as_one_node():
    """chat --nodes 3: the same REPL as through the service (a \"\"\" block of two lines is
    one message), answered by 3 processes over loopback, greedy: the tokens of 1 node."""
    model = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "demo", "stories.gguf")
    message = "Tell me a story\nabout a fox."
    one = run_ctl("generate", "--model", model, "--chat-format", "--temperature", "0",
                  "-n", "60", "--prompt", message)
    assert one.returncode == 0, one.stderr
    r = run_ctl("chat", "--model", model, "--nodes", "3", "--temperature", "0", "-n", "60",
                stdin='"""\nTell me a story\nabout a fox.\n"""\n/help\n/exit\n')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == one.stdout.strip() and r.stdout.startswith("Once upon a time")
    assert "/reset" in r.stderr and "[stopped at max tokens (60)]" in r.stderr
    bad = run_ctl("chat", "--nodes", "3")                  # no model: the service has its own
    assert bad.returncode == errors.EXIT_USAGE and "--nodes needs --model" in bad.stderr


def test_bench_on_two_nodes_measures_the_mesh(tiny):
    r = run_ctl("bench", "--model", tiny, "--nodes", "2", "--prompt-tokens", "8",
                "--gen-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["sync"] == "mesh" and d["nodes"] == 2 and d["sync_ms_per_token"] is not None
    assert d["wire_bytes_per_token"] > 0      # 2 nodes: one frame each way per all-reduce


def test_the_star_is_not_an_option_of_the_product(tiny):
    """The star all-reduce is bench/compare_sync.py's baseline only: no --sync."""
    r = run_ctl("bench", "--model", tiny, "--nodes", "2", "--sync", "star")
    assert r.returncode == errors.EXIT_USAGE and "--sync" in r.stderr
