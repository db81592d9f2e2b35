"""The openai package as a real client against the real HTTP server and a tiny model."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

openai = pytest.importorskip("openai")

from dllama_node.api.backend import EngineBackend  # noqa: E402
from dllama_node.api.server import ApiConfig, serve_in_thread  # noqa: E402
from dllama_node.ctl.cli import cli  # noqa: E402
from dllama_node.cluster.runners import SingleRunner  # noqa: E402
from dllama_node.engine.node import LocalNode  # noqa: E402
from dllama_node.model.generate import PRESETS, write_random_model  # noqa: E402

MODEL_ID = "tiny-test"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "tiny.gguf")
    write_random_model(path, PRESETS["tiny"], weight_type="q4_0", seed=3)
    return path


@pytest.fixture(scope="module")
def server(model_path):
    node = LocalNode.open(model_path, threads=1)
    try:
        with serve_in_thread(EngineBackend(SingleRunner(node), MODEL_ID),
                             ApiConfig(port=0)) as srv:
            yield srv
    finally:
        node.close()


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()


def ctl_generate(model_path, prompt, n, chat=False):
    args = ["generate", "--model", model_path, "--threads", "1", "--temperature", "0",
            "-n", str(n), "--prompt", prompt, "--json"] + (["--chat-format"] if chat else [])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_models(client):
    listed = [m.id for m in client.models.list()]
    assert listed == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).owned_by == "dllama-node"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_greedy_matches_dllama_ctl(client, model_path):
    want = ctl_generate(model_path, "Once upon a time", 24)
    r = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=24,
                                  temperature=0)
    assert r.object == "text_completion" and r.model == MODEL_ID
    assert r.choices[0].text == want["text"]
    assert r.usage.prompt_tokens == len(want["prompt_tokens"])
    assert r.usage.completion_tokens == len(want["tokens"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if len(want["tokens"]) == 24 else "stop")


def test_chat_greedy_matches_dllama_ctl_chat_format(client, model_path):
    want = ctl_generate(model_path, "Tell me a story", 20, chat=True)
    r = client.chat.completions.create(model=MODEL_ID, max_tokens=20, temperature=0,
                                       messages=[{"role": "user", "content": "Tell me a story"}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == len(want["prompt_tokens"])
    assert r.usage.completion_tokens == len(want["tokens"])


def test_chat_stream_equals_whole_answer(client):
    kw = dict(model=MODEL_ID, max_tokens=16, temperature=0,
              messages=[{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hello there"}])
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_completion_stream_and_stop_string(client):
    kw = dict(model=MODEL_ID, prompt="The cat", max_tokens=30, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    assert len(whole) > 4
    stop = whole[2:4]                      # a stop string the greedy text is known to contain
    cut = whole[:whole.index(stop)]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stream=True, stop=stop, **kw))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_token_id_prompt_and_seeded_sampling(client):
    a = client.completions.create(model=MODEL_ID, prompt=[1, 300, 400], max_tokens=12,
                                  temperature=0.9, seed=7)
    b = client.completions.create(model=MODEL_ID, prompt=[1, 300, 400], max_tokens=12,
                                  temperature=0.9, seed=7)
    assert a.usage.prompt_tokens == 3 and a.choices[0].text == b.choices[0].text


def test_bad_requests_raise_with_param(client):
    cases = [
        (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "user", "content": "x"}], temperature=2.5), "temperature"),
        (dict(messages=[{"role": "user", "content": "x"}], top_p=1.5), "top_p"),
        (dict(messages=[{"role": "user", "content": "x"}], max_tokens=0), "max_tokens"),
        (dict(messages=[{"role": "user", "content": "x"}], n=3), "n"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_ID, **kw)
        assert e.value.status_code == 400
        assert e.value.body["param"] == param, e.value.body
        assert e.value.body["type"] == "invalid_request_error"


def test_prompt_longer_than_context(client, server):
    seq_len = server.backend.max_seq_len
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=[1] + [300] * seq_len, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    assert str(seq_len) in e.value.body["message"]


def test_answer_never_overflows_the_context(client, server):
    seq_len = server.backend.max_seq_len
    prompt = [1] + [300] * (seq_len - 4)              # room for 3 tokens
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=50, temperature=0)
    assert r.usage.completion_tokens <= 3
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= seq_len
