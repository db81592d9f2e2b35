"""A conversation that outgrows the demo model's context of 256 tokens: the local chat, the
chat through the service and the HTTP API keep the system prompt, leave the oldest turns
out (tokenizer/conversation_fit.py), say so once, and give the true finish reason."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from dllama_node.common.errors import EXIT_USAGE
from dllama_node.ctl.cli import cli

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo",
                    "stories.gguf")
CONTEXT = 256
NOTICE = "(the conversation is longer than the context of 256 tokens: the oldest"
CONTEXT_FULL = "[stopped: the context of 256 tokens is full]"
STORY = ("Once upon a time, in a faraway village, there lived a friendly dragon named Finn. "
         "Finn lived in a dark cave near the mountains. He could make warm fire. ")


def chat(stdin, *options):
    return CliRunner().invoke(cli, ["chat", "--model", DEMO, "--threads", "1", "--temperature",
                                    "0", *options], input=stdin)


def test_local_chat_over_several_turns_leaves_the_oldest_out_and_says_so_once():
    r = chat("Tell me a story about a dragon.\nTell me another one.\nAnd one more.\n"
             "Tell me a story about a fox.\n")
    assert r.exit_code == 0, r.output
    answers = r.stdout.strip().splitlines()
    assert len(answers) == 4 and all(a.strip() for a in answers), answers
    assert r.stderr.count(NOTICE) == 1, r.stderr
    assert "max_seq_len 256: the model's context" in r.stderr
    assert "memory would allow" not in r.stderr


def test_local_chat_answer_stops_at_the_full_context_not_at_max_tokens():
    long = "a dragon " * 100                        # 207 tokens: 49 left for the answer
    r = chat(f"{long}\nTell me a story.\n", "--system", "You tell stories.")
    assert r.exit_code == 0, r.output
    assert CONTEXT_FULL in r.stderr and "max tokens" not in r.stderr, r.stderr
    assert r.stderr.count(NOTICE) == 1                # the second turn drops the first
    r = chat("Tell me a story about a dragon.\n", "-n", "8")
    assert "[stopped at max tokens (8)]" in r.stderr, r.stderr


def test_local_chat_message_longer_than_the_context_is_one_line_naming_the_counts():
    r = chat("a dragon " * 200 + "\n", "--system", "You tell stories.")
    assert r.exit_code == EXIT_USAGE
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("dllama-ctl: error: the system prompt and the last message are ")
    assert "tokens, the context holds 256" in line and "Traceback" not in r.stderr


def test_generate_prompt_longer_than_the_model_context_gives_a_true_hint():
    r = CliRunner().invoke(cli, ["generate", "--model", DEMO, "--threads", "1", "--temperature",
                                 "0", "--prompt", "Once upon a time there was a dragon. " * 40])
    assert r.exit_code == EXIT_USAGE
    assert r.stderr.splitlines()[0] == "max_seq_len 256: the model's context"
    assert r.stderr.strip().splitlines()[-1] == (
        "dllama-ctl: error: the prompt has 362 tokens, the context holds 256: that is the "
        "model's own context: shorten the prompt")
    r = CliRunner().invoke(cli, ["generate", "--model", DEMO, "--threads", "1", "--max-seq-len",
                                 "64", "--prompt", "Once upon a time there was a dragon. " * 10])
    assert r.stderr.strip().splitlines()[-1].endswith(
        "the context holds 64: shorten the prompt, or raise --max-seq-len (up to 256 here)")


# ---- the HTTP API -----------------------------------------------------------------------
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client():
    from dllama_node.api.backend import EngineBackend
    from dllama_node.api.server import ApiConfig, serve_in_thread
    from dllama_node.cluster.runners import SingleRunner
    from dllama_node.engine.node import LocalNode

    node = LocalNode.open(DEMO, threads=1)
    try:
        with serve_in_thread(EngineBackend(SingleRunner(node), "stories"),
                             ApiConfig(port=0)) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                              timeout=60)
            yield c
            c.close()
    finally:
        node.close()


def long_conversation(turns=4, last="Tell me a story about a fox."):
    messages = [{"role": "system", "content": "You tell stories."}]
    for _ in range(turns):
        messages += [{"role": "user", "content": "Tell me a story."},
                     {"role": "assistant", "content": STORY * 2}]
    return messages + [{"role": "user", "content": last}]


def test_api_truncates_by_default_and_refuses_with_truncate_false(client):
    messages = long_conversation()
    r = client.chat.completions.create(model="stories", messages=messages, temperature=0)
    assert r.choices[0].message.content
    assert r.usage.prompt_tokens + 64 <= CONTEXT         # turns left out: room for the answer
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= CONTEXT
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stories", messages=messages, temperature=0,
                                       extra_body={"truncate": False})
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert "the context holds 256" in body["message"] and "the prompt has " in body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stories", messages=messages,
                                       extra_body={"truncate": "no"})
    assert e.value.body["param"] == "truncate"


def test_api_answer_cut_by_the_context_finishes_with_length(client):
    messages = long_conversation(1, last="a dragon " * 100)
    r = client.chat.completions.create(model="stories", messages=messages, temperature=0,
                                       max_tokens=200)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT
    assert r.usage.completion_tokens < 200
    with pytest.raises(openai.BadRequestError) as e:        # even the last message does not fit
        client.chat.completions.create(model="stories", messages=long_conversation(
            1, last="a dragon " * 200))
    assert "the last message are" in e.value.body["message"]
    assert "the context holds 256" in e.value.body["message"]


# ---- the chat through the service -------------------------------------------------------
def test_the_service_leaves_the_oldest_turns_out_and_reports_the_limit(tmp_path):
    from dllama_node.cluster.auth import generate_key, write_key
    from dllama_node.daemon.control import request
    from tests.test_daemon_service import _wait_status, start_solo_node

    key = str(tmp_path / "cluster.key")
    write_key(key, generate_key())
    ctl = str(tmp_path / "ctl.sock")
    proc = start_solo_node(tmp_path, DEMO, key, ctl)
    try:
        _wait_status(ctl, lambda s: isinstance(s, dict) and s["state"] == "serving")
        lines = list(request(ctl, {"op": "generate", "temperature": 0, "max_tokens": 512,
                                   "messages": long_conversation(last="a dragon " * 90)}))
        assert lines[0] == {"dropped_turns": 4, "max_seq_len": CONTEXT}
        final = lines[-1]
        assert final["dropped_turns"] == 4 and final["finish_reason"] == "length"
        assert final["limit"] == "context" and final["max_seq_len"] == CONTEXT
        assert len(final["prompt_tokens"]) + len(final["tokens"]) == CONTEXT
        bad = list(request(ctl, {"op": "generate", "messages": long_conversation(
            last="a dragon " * 200)}))[-1]
        assert bad["exit_code"] == EXIT_USAGE and "the context holds 256" in bad["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
