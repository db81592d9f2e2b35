"""dllama-ctl commands that go through the service: each test runs the CLI against a real
Unix-socket control server with canned answers (tests/ctl_fake_daemon.py) and checks the
request it sent and what it printed."""
from __future__ import annotations

import json
import socket
import threading

import pytest
from click.testing import CliRunner

from dllama_node.common import errors
from dllama_node.ctl.cli import cli
from dllama_node.ctl.chat_repl import ChatSession, MessageReader
from dllama_node.ctl.daemon_client import DaemonClient, error_from_answer
from dllama_node.ctl.status_view import format_status, nodes_from_status, slice_text
from dllama_node.daemon.ops import with_addresses
from tests.ctl_fake_daemon import FakeDaemon

GIB = 1 << 30


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(*args, stdin=None, env=None):
    return runner().invoke(cli, list(args), input=stdin, env=env)


def streamed(pieces, **final):
    lines = [{"token": i + 10, "text": p} for i, p in enumerate(pieces)]
    lines.append({"done": True, "text": "".join(pieces), "tokens": [i + 10 for i in
                                                                     range(len(pieces))],
                  "prompt_tokens": [1, 2, 3], "finish_reason": "stop", **final})
    return lines


STATUS = {                              # asked on pi-b, a worker: the root's answer
    "node_id": "pi-b", "state": "serving", "root_id": "pi-a", "term": 3, "asked_root": True,
    "peers": [], "plan": {"model": "llama 1.1B q4_0", "max_seq_len": 2048,
                          "seq_len_reason": "fits every node",
                          "nodes": [], "excluded": [{"node_id": "pi-z",
                                                     "reason": "needs 610 MiB, has 300 MiB"}],
                          "warnings": []},
    "plan_table": "node   weights  KV cache\npi-a   300 MiB  44 MiB\npi-b   300 MiB  44 MiB",
    "nodes": [
        {"node_id": "pi-a", "role": "root", "address": "10.0.0.1:7321",
         "available_ram_bytes": 3 * GIB, "free_swap_bytes": 0, "memlock_limit_bytes": -1,
         "cores": 4, "slice": "heads [0,16) ffn [0,2816)", "planned_bytes": 400 << 20,
         "locked": True, "locked_bytes": 400 << 20, "tok_s": 7.25, "state": "serving"},
        {"node_id": "pi-b", "role": "worker", "address": "10.0.0.2:7321",
         "available_ram_bytes": GIB // 2, "free_swap_bytes": 100 << 20,
         "memlock_limit_bytes": 8 << 20, "cores": 4, "slice": "heads [16,32) ffn [2816,5632)",
         "planned_bytes": 400 << 20, "locked": False, "locked_bytes": 0, "tok_s": None,
         "state": "serving"},
        {"node_id": "pi-z", "role": "excluded", "address": "10.0.0.9:7321",
         "available_ram_bytes": 300 << 20, "free_swap_bytes": 0, "memlock_limit_bytes": -1,
         "cores": 1, "slice": "", "planned_bytes": 0, "locked": None, "tok_s": None,
         "state": "serving"},
    ],
    "last_error": "",
}


# ---- status ---------------------------------------------------------------------------
def test_status_table_shows_every_node_and_the_plan():
    with FakeDaemon({"status": lambda r: dict(STATUS)}) as d:
        r = invoke("status", "--socket", d.path)
    assert r.exit_code == 0, r.stderr
    assert d.requests == [{"op": "status"}]
    lines = r.stdout.splitlines()
    assert "root       pi-a (term 3)" in lines
    header = next(l for l in lines if l.startswith("node"))
    for col in ("role", "address", "RAM", "swap", "slice", "locked", "tok/s", "state"):
        assert col in header
    row_a = next(l for l in lines if l.startswith("pi-a "))
    assert "root" in row_a and "10.0.0.1:7321" in row_a and "3.0 GiB" in row_a
    assert "400.0 MiB" in row_a and "7.2" in row_a and "heads [0,16) ffn [0,2816)" in row_a
    row_b = next(l for l in lines if l.startswith("pi-b (this node) "))
    assert "512.0 MiB" in row_b and "100.0 MiB" in row_b and "NO" in row_b
    assert "not locked in RAM: pi-b" in r.stdout
    assert "pi-a   300 MiB  44 MiB" in r.stdout                      # the plan table
    assert "left out: pi-z: needs 610 MiB, has 300 MiB" in r.stdout


def test_status_json_is_the_answer_without_done():
    with FakeDaemon({"status": lambda r: dict(STATUS)}) as d:
        r = invoke("status", "--json", "--socket", d.path)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == STATUS


def test_status_socket_from_environment_and_config(tmp_path):
    with FakeDaemon({"status": lambda r: dict(STATUS)}) as d:
        r = invoke("status", env={"DLLAMA_CONTROL_SOCKET": d.path})
        assert r.exit_code == 0, r.stderr
        conf = tmp_path / "dllama-node.conf"
        conf.write_text(f"control_socket = {d.path}\n")
        r = invoke("--config", str(conf), "status", env={"DLLAMA_CONTROL_SOCKET": None})
        assert r.exit_code == 0, r.stderr
    assert len(d.requests) == 2


def test_status_of_an_older_daemon_without_nodes_is_built_from_peers_and_plan():
    old = {"node_id": "a", "state": "serving", "root_id": "a", "term": 1,
           "peers": [{"node_id": "b", "address": "10.0.0.2", "port": 7321,
                      "available_ram_bytes": GIB, "free_swap_bytes": 0,
                      "memlock_limit_bytes": -1, "cores": 4, "state": "serving"}],
           "plan": {"max_seq_len": 512, "nodes": [
               {"node_id": "a", "role": "root", "q_heads": [0, 4], "kv_heads": [0, 2],
                "ffn_rows": [0, 64], "vocab_rows": [0, 100], "memory": {"total": 5 << 20,
                                                                        "lock": True}},
               {"node_id": "b", "role": "worker", "q_heads": [4, 8], "kv_heads": [2, 4],
                "ffn_rows": [64, 128], "vocab_rows": [100, 256],
                "memory": {"total": 6 << 20, "lock": False}}]},
           "last_error": ""}
    rows = nodes_from_status(old)
    assert [(r["node_id"], r["role"], r["slice"], r["locked"]) for r in rows] == [
        ("a", "root", "heads [0,4) ffn [0,64) vocab [0,100)", True),
        ("b", "worker", "heads [4,8) ffn [64,128) vocab [100,256)", False)]
    assert rows[1]["address"] == "10.0.0.2:7321"
    text = format_status(old)
    assert "not locked in RAM: b" in text


def test_status_asked_on_a_worker_marks_the_worker_and_shows_what_each_node_locked():
    root_rows = [dict(r) for r in STATUS["nodes"]]
    root_rows[0]["address"] = ""                      # the root does not know its own address
    root_rows[1].update(locked=True, locked_bytes=300 << 20)    # the worker's own report
    rows = with_addresses(root_rows, {"pi-a": "10.0.0.1:7321", "pi-b": "10.9.9.9:1"})
    assert [r["address"] for r in rows] == ["10.0.0.1:7321", "10.0.0.2:7321", "10.0.0.9:7321"]
    text = format_status(dict(STATUS, nodes=rows))
    assert text.count("(this node)") == 1 and "*" not in text
    table = text.splitlines()
    row_a = next(l for l in table if l.startswith("pi-a "))
    row_b = next(l for l in table if l.startswith("pi-b (this node) "))
    assert "10.0.0.1:7321" in row_a and "400.0 MiB" in row_a
    assert "300.0 MiB" in row_b and "[16,32)" in row_b                  # the worker's locked bytes
    assert "not locked in RAM" not in text


def test_status_slices_use_the_plans_notation():
    from dllama_node.plan import ModelLayout, NodeCapacity, format_plan, plan_shards
    from tests.test_plan import TINYLLAMA

    plan = plan_shards(ModelLayout.uniform(TINYLLAMA),
                       [NodeCapacity(f"n{i}", GIB, 0, -1, 4, 1.0) for i in range(3)])
    table = format_plan(plan)
    for node in plan.to_dict()["nodes"]:
        text = slice_text(node)
        assert text.startswith("heads [") and ":" not in text and "-" not in text, text
        plan_row = next(l for l in table.splitlines() if l.startswith(node["node_id"] + " "))
        for part in text.split()[1::2]:                  # heads R ffn R vocab R
            assert part in plan_row.split(), (part, plan_row)


def test_slice_text_of_a_coordinator_and_an_empty_range():
    assert slice_text({"role": "coordinator"}) == "coordinator (no rows)"
    assert slice_text({"role": "worker", "q_heads": [0, 0], "ffn_rows": [32, 64]}) == "ffn [32,64)"


# ---- errors ---------------------------------------------------------------------------
def test_no_daemon_is_a_one_line_cluster_error(tmp_path):
    r = invoke("status", "--socket", str(tmp_path / "absent.sock"))
    assert r.exit_code == errors.EXIT_CLUSTER
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("dllama-ctl: error: no control socket at")
    assert "systemctl status dllama-node" in line


def test_a_socket_nobody_listens_on(tmp_path):
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()                                          # the file stays, nobody listens
    r = invoke("status", "--socket", path)
    assert r.exit_code == errors.EXIT_CLUSTER
    assert "no dllama-node answers at" in r.stderr


@pytest.mark.parametrize("code, cls", [(2, errors.UsageError), (5, errors.MemoryPlanError),
                                       (6, errors.ClusterError), (4, errors.TokenizerError),
                                       (9, errors.DllamaError)])
def test_daemon_errors_keep_their_exit_codes(code, cls):
    err = error_from_answer({"done": True, "error": "node pi-b: no", "exit_code": code})
    assert type(err) is cls and err.exit_code == code and str(err) == "node pi-b: no"
    answer = {"done": True, "error": "needs 1.2 GiB, node pi-b has 800 MiB", "exit_code": code}
    with FakeDaemon({"status": lambda r: answer}) as d:
        r = invoke("status", "--socket", d.path)
    assert r.exit_code == code
    assert r.stderr.strip() == "dllama-ctl: error: needs 1.2 GiB, node pi-b has 800 MiB"


# ---- generate -------------------------------------------------------------------------
def test_generate_sends_prompt_and_sampler_and_streams_text():
    with FakeDaemon({"generate": lambda r: streamed(["Once", " upon", " a"])}) as d:
        r = invoke("generate", "--socket", d.path, "--temperature", "0", "--top-k", "5",
                   "--seed", "7", "-n", "3", "--stop", "END", "Tell", "me")
    assert r.exit_code == 0, r.stderr
    assert d.requests == [{"op": "generate", "prompt": "Tell me", "max_tokens": 3,
                           "temperature": 0.0, "top_k": 5, "top_p": 0.95,
                           "repetition_penalty": 1.0, "seed": 7, "stop": ["END"]}]
    assert r.stdout == "Once upon a\n"
    assert "3 prompt tokens, 3 generated, stop" in r.stderr


def test_generate_from_stdin_as_chat_json():
    with FakeDaemon({"generate": lambda r: streamed(["Hi", "!"])}) as d:
        r = invoke("generate", "--socket", d.path, "--chat-format", "--json",
                   stdin="How are you?\n")
    assert r.exit_code == 0, r.stderr
    req = d.requests[0]
    assert req["messages"] == [{"role": "user", "content": "How are you?\n"}]
    assert "prompt" not in req
    out = json.loads(r.stdout)
    assert out == {"text": "Hi!", "tokens": [10, 11], "prompt_tokens": [1, 2, 3],
                   "finish_reason": "stop"}


def test_generate_error_line_from_the_daemon():
    lines = [{"token": 5, "text": "x"},
             {"done": True, "error": "node pi-c vanished in generation, layer 7",
              "exit_code": 6}]
    with FakeDaemon({"generate": lambda r: lines}) as d:
        r = invoke("generate", "--socket", d.path, "hello")
    assert r.exit_code == errors.EXIT_CLUSTER
    assert "node pi-c vanished in generation, layer 7" in r.stderr


@pytest.mark.parametrize("args, word", [
    (["--temperature", "-1"], "temperature"),
    (["--nodes", "2"], "--nodes needs --model"),
    (["--threads", "3"], "--threads needs --model"),
    (["--max-seq-len", "64"], "--max-seq-len needs --model"),
    (["--prompt", "a", "b"], "prompt given twice"),
])
def test_generate_bad_options_fail_before_sending(args, word):
    with FakeDaemon({"generate": lambda r: streamed(["x"])}) as d:
        r = invoke("generate", "--socket", d.path, *args, *(["x"] if "--prompt" not in args
                                                           else []))
    assert r.exit_code == errors.EXIT_USAGE, r.stderr
    assert word in r.stderr
    assert d.requests == []


# ---- models and plan ------------------------------------------------------------------
def test_models_table_and_json():
    answer = {"models": [{"id": "tinyllama-q4_0", "path": "/srv/m.gguf",
                          "identity": "ab12cd34ef56ab12cd34", "held_by": ["pi-a", "pi-b"]}]}
    with FakeDaemon({"models": lambda r: answer}) as d:
        r = invoke("models", "--socket", d.path)
        j = invoke("models", "--socket", d.path, "--json")
    assert r.exit_code == 0, r.stderr
    row = r.stdout.splitlines()[1]
    assert row.split()[:4] == ["tinyllama-q4_0", "pi-a,", "pi-b", "ab12cd34ef56ab12"]
    assert json.loads(j.stdout) == answer
    assert d.requests == [{"op": "models"}, {"op": "models"}]


def test_plan_without_capacities_asks_the_daemon():
    answer = {"plan": {"max_seq_len": 1024, "nodes": []}, "table": "node  weights\npi-a  1 GiB"}
    with FakeDaemon({"plan": lambda r: answer}) as d:
        r = invoke("plan", "--socket", d.path, "--max-seq-len", "1024")
        j = invoke("plan", "--socket", d.path, "--model", "/srv/other.gguf", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "node  weights\npi-a  1 GiB"
    assert json.loads(j.stdout) == answer["plan"]
    assert d.requests == [{"op": "plan", "model": None, "max_seq_len": 1024},
                          {"op": "plan", "model": "/srv/other.gguf", "max_seq_len": 0}]


def test_plan_does_not_fit_exits_5_with_the_numbers():
    answer = {"done": True, "exit_code": 5,
              "error": "node pi-b needs 1.4 GiB, has 900 MiB: try --max-seq-len 1024"}
    with FakeDaemon({"plan": lambda r: answer}) as d:
        r = invoke("plan", "--socket", d.path)
    assert r.exit_code == errors.EXIT_MEMORY
    assert "needs 1.4 GiB" in r.stderr


def test_offline_plan_options_without_a_model_file():
    r = invoke("plan", "--node-ram", "1G,2G")
    assert r.exit_code == errors.EXIT_USAGE and "--model" in r.stderr
    r = invoke("plan", "--split", "2,1", "--socket", "/nonexistent.sock")
    assert r.exit_code == errors.EXIT_USAGE and "--nodes or --node-ram" in r.stderr


# ---- chat -----------------------------------------------------------------------------
def test_chat_through_the_daemon_sends_the_whole_conversation_each_turn():
    answers = iter([["Hello", " there"], ["I am", " fine"], ["Sure"]])

    with FakeDaemon({"generate": lambda r: streamed(next(answers))}) as d:
        stdin = ("hi\n"
                 "how are\\\n"
                 "you?\n"
                 "/system Be brief.\n"
                 '"""\n'
                 "line one\n"
                 'line two"""\n'
                 "/exit\n"
                 "never sent\n")
        r = invoke("chat", "--socket", d.path, "--temperature", "0", "--system", "Be kind.",
                   stdin=stdin)
    assert r.exit_code == 0, r.stderr
    assert [q["messages"] for q in d.requests] == [
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "Hello there"},
         {"role": "user", "content": "how are\nyou?"}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "line one\nline two"}],
    ]
    assert all(q["temperature"] == 0.0 and q["max_tokens"] == 512 for q in d.requests)
    assert r.stdout == "Hello there\nI am fine\nSure\n"
    assert "system prompt set" in r.stderr


def test_chat_error_ends_a_piped_session_with_its_code():
    answer = {"done": True, "error": "node a is not serving as the root", "exit_code": 6}
    with FakeDaemon({"generate": lambda r: answer}) as d:
        r = invoke("chat", "--socket", d.path, stdin="hi\nagain\n")
    assert r.exit_code == errors.EXIT_CLUSTER
    assert len(d.requests) == 1


def _session(answers):
    out, notes, sent = [], [], []

    def send(messages):
        sent.append(messages)
        return iter(answers.pop(0))
    return ChatSession(send, out.append, notes.append), out, notes, sent


def test_session_reset_help_unknown_and_slash_escape():
    s, out, notes, sent = _session([streamed(["a"]), streamed(["b"])])
    assert s.handle("/help") and "/reset" in notes[-1]
    assert s.handle("/frobnicate") and "unknown command /frobnicate" in notes[-1]
    s.handle("//etc is a folder")
    assert sent[-1][-1] == {"role": "user", "content": "/etc is a folder"}
    s.handle("/reset")
    assert s.messages == []
    s.handle("again")
    assert sent[-1] == [{"role": "user", "content": "again"}]
    assert not s.handle("/exit")


def test_ctrl_c_stops_the_answer_keeps_the_session_and_closes_the_stream():
    closed = threading.Event()

    def lines():
        try:
            yield {"token": 1, "text": "Once"}
            raise KeyboardInterrupt               # what SIGINT does while recv() waits
        finally:
            closed.set()
    s, out, notes, sent = _session([lines(), streamed(["ok"])])
    s.handle("tell a story")
    assert closed.is_set()
    assert "[stopped]" in notes
    assert s.messages[-1] == {"role": "assistant", "content": "Once"}
    s.handle("next")                              # the session goes on
    assert sent[-1][-2:] == [{"role": "assistant", "content": "Once"},
                             {"role": "user", "content": "next"}]


def test_closing_the_stream_closes_the_connection_and_the_daemon_sees_it():
    """What Ctrl-C does, over a real socket: the daemon's emit() fails."""
    pieces = [f"w{i} " for i in range(200)]
    with FakeDaemon({"generate": lambda r: streamed(pieces)}, line_delay_s=0.01) as d:
        gen = DaemonClient(d.path).generate({"prompt": "x"})
        assert next(gen)["text"] == "w0 "
        gen.close()
        assert d.cancelled.wait(5), "the daemon kept streaming to a closed connection"


def test_message_reader_blocks_and_continuations():
    lines = iter(['"""one line"""', "a\\", "b\\", "c", '"""', "x", "", 'y"""', '"""unclosed'])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError
    reader = MessageReader(read)
    assert reader.read() == "one line"
    assert reader.read() == "a\nb\nc"
    assert reader.read() == "x\n\ny"
    assert reader.read() == "unclosed"
    assert reader.read() is None


# ---- waiting for a cluster that is loading ----------------------------------------------
def _loading_status(phase_n1, done_n1, phase_n2, done_n2, serving=False):
    s = dict(STATUS, state="loading" if not serving else "serving", root_id="pi-a",
             plan=STATUS["plan"] if serving else None,
             nodes=[dict(STATUS["nodes"][0], state="serving" if serving else "loading")],
             loading={"load_id": "5f4c", "done": serving, "plan_table": "...", "nodes": [
                 {"node_id": "pi-a", "load_id": "5f4c", "phase": phase_n1, "done": done_n1,
                  "total": 300 << 20, "elapsed_s": 1.0},
                 {"node_id": "pi-b", "load_id": "5f4c", "phase": phase_n2, "done": done_n2,
                  "total": 301 << 20, "elapsed_s": 1.0}]})
    return s


def test_status_wait_shows_each_node_loading_until_the_cluster_serves():
    answers = iter([_loading_status("reading", 100 << 20, "assigned", 0),
                    _loading_status("loaded", 300 << 20, "streaming", 150 << 20),
                    _loading_status("loaded", 300 << 20, "loaded", 301 << 20, serving=True)])
    with FakeDaemon({"status": lambda r: next(answers)}) as d:
        r = invoke("status", "--socket", d.path, "--wait")
    assert r.exit_code == 0, r.stderr
    err = r.stderr.splitlines()
    assert err[0] == "waiting for the cluster: root pi-a is loading (1 node known)"
    phases = [(ln.split()[0], ln.split()[2]) for ln in err[1:]]
    assert phases == [("pi-a", "reading"), ("pi-b", "assigned"), ("pi-a", "loaded"),
                      ("pi-b", "streaming"), ("pi-b", "loaded")]
    assert "[########----------------]  33%   100.0 MiB of 300.0 MiB" in err[1]
    assert len(d.requests) == 3
    assert "slices loaded (load 5f4c):" in r.stdout          # the table, then the loads
    assert "pi-b  worker   loaded     [########################] 100%   301.0 MiB" in r.stdout


def test_generate_waits_for_the_cluster_then_generates():
    answers = iter([_loading_status("reading", 1, "assigned", 0),
                    _loading_status("loaded", 300 << 20, "loaded", 301 << 20, serving=True)])
    with FakeDaemon({"status": lambda r: next(answers),
                     "generate": lambda r: streamed(["Once"])}) as d:
        r = invoke("generate", "--socket", d.path, "hello")
    assert r.exit_code == 0, r.stderr
    assert [q["op"] for q in d.requests] == ["status", "status", "generate"]
    assert r.stdout == "Once\n"
    assert "pi-b  worker   loaded" in r.stderr


def test_not_serving_with_no_wait_is_an_error_that_says_what_the_cluster_does():
    with FakeDaemon({"status": lambda r: _loading_status("reading", 1, "assigned", 0),
                     "generate": lambda r: streamed(["x"])}) as d:
        r = invoke("generate", "--socket", d.path, "--wait-timeout", "0", "hello")
        assert r.exit_code == errors.EXIT_CLUSTER
        assert "the cluster is not serving: waiting for the cluster: root pi-a is loading" \
            in r.stderr and "--wait-timeout" in r.stderr
        r = invoke("chat", "--socket", d.path, "--wait-timeout", "0.6", stdin="hi\n")
    assert r.exit_code == errors.EXIT_CLUSTER
    assert "not serving after 0.6 s; waiting for the cluster: root pi-a is loading" in r.stderr
    assert "generate" not in [q["op"] for q in d.requests]


def test_status_wait_waits_for_a_daemon_that_is_starting(tmp_path):
    path = str(tmp_path / "late.sock")
    result = {}

    def run():
        result["r"] = invoke("status", "--socket", path, "--wait", "--wait-timeout", "20",
                             "--json")
    with FakeDaemon({"status": lambda r: dict(STATUS)}) as d:
        t = threading.Thread(target=run)
        t.start()
        import os
        import time
        time.sleep(0.6)                        # the daemon is not there yet
        os.symlink(d.path, path)               # now it is
        t.join(30)
    r = result["r"]
    assert r.exit_code == 0, r.stderr
    assert r.stderr.startswith(f"waiting for dllama-node: no control socket at {path}")
    assert r.stderr.count("no control socket") == 1
    assert json.loads(r.stdout)["root_id"] == "pi-a"
