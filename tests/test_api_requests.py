"""Request validation and response shapes (pure functions), and `serve --listen` parsing."""
from __future__ import annotations

import pytest

from dllama_node.api.metrics import ApiCounters, escape_label, render
from dllama_node.api.openai import ApiError, chunk_body, completion_body, parse_request
from dllama_node.common.errors import UsageError
from dllama_node.ctl.serve_command import default_model_id, parse_listen

USER = [{"role": "user", "content": "hi"}]


def error(body, chat=True, seq_len=512) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_request(body, chat, seq_len)
    assert e.value.status == 400
    return e.value


def test_defaults_are_the_engine_sampler_defaults():
    req = parse_request({"messages": USER}, True, 512)
    assert req.max_tokens is None and not req.stream and req.stop == []
    assert (req.sampler.temperature, req.sampler.top_k, req.sampler.top_p) == (0.8, 40, 0.95)
    assert parse_request({"prompt": "x"}, False, 512).max_tokens == 16


def test_content_parts_and_developer_role():
    req = parse_request({"messages": [
        {"role": "developer", "content": "be kind"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]}]},
        True, 512)
    assert req.messages == [{"role": "system", "content": "be kind"},
                            {"role": "user", "content": "ab"}]
    e = error({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert e.param == "messages[0].content[0]" and "image_url" in str(e)
    assert error({"messages": [{"role": "tool", "content": "x"}]}).param == "messages[0].role"
    assert error({"messages": [{"role": "user"}]}).param == "messages[0].content"
    assert error({"messages": [{"role": "user", "content": None}]}).param == "messages[0].content"
    assert error({"messages": "hello"}).param == "messages"


def test_values_and_ranges():
    req = parse_request({"messages": USER, "temperature": 0, "top_p": 0, "top_k": 5,
                         "seed": -1, "stop": "END", "max_completion_tokens": 7,
                         "stream": True, "stream_options": {"include_usage": True}}, True, 512)
    assert req.sampler.temperature == 0 and 0 < req.sampler.top_p < 1e-6
    assert req.sampler.seed == 2 ** 64 - 1 and req.stop == ["END"] and req.max_tokens == 7
    assert req.stream and req.include_usage
    assert error({"messages": USER, "max_tokens": 513}, seq_len=512).param == "max_tokens"
    assert "513" in str(error({"messages": USER, "max_tokens": 513}, seq_len=512))
    assert error({"messages": USER, "temperature": True}).param == "temperature"
    assert error({"messages": USER, "temperature": float("nan")}).param == "temperature"
    assert error({"messages": USER, "repetition_penalty": 0}).param == "repetition_penalty"
    assert error({"messages": USER, "top_k": -1}).param == "top_k"
    assert error({"messages": USER, "seed": 2 ** 64}).param == "seed"
    assert error({"messages": USER, "logprobs": True}).param == "logprobs"
    assert error({"messages": USER, "model": 3}).param == "model"
    assert error({"messages": USER, "stop": [1]}).param == "stop"


def test_completion_prompts():
    assert parse_request({"prompt": ["one"]}, False, 512).prompt == "one"
    assert parse_request({"prompt": [1, 2, 3]}, False, 512).prompt == [1, 2, 3]
    assert error({"prompt": ["a", "b"]}, chat=False).param == "prompt"
    assert error({"prompt": []}, chat=False).param == "prompt"
    assert error({"prompt": "x", "echo": True}, chat=False).param == "echo"
    assert error({"prompt": "x", "best_of": 3}, chat=False).param == "best_of"
    assert parse_request({"prompt": "x", "echo": False, "logprobs": None}, False, 512)


def test_shapes():
    whole = completion_body(True, "chatcmpl-1", "m", "hello", "stop", 5, 2, created=9)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert whole["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    text = completion_body(False, "cmpl-1", "m", "hello", "length", 5, 2, created=9)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "hello"
    first = chunk_body(True, "c", "m", 1, "", role=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chunk_body(True, "c", "m", 1, None, finish_reason="length")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert chunk_body(False, "c", "m", 1, usage_={"total_tokens": 3})["choices"] == []


def test_metrics_labels_are_escaped():
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    counters = ApiCounters()
    counters.request("/v1/models", 200)
    text = render(counters, {"tokens_per_second": 1.5, "nodes": [
        {"node_id": 'we"ird', "sync_ms": 0.25, "memory_bytes": {"rss": 10}}]}, 2, True)
    assert 'dllama_sync_ms{node="we\\"ird"} 0.25' in text
    assert 'dllama_memory_bytes{node="we\\"ird",kind="rss"} 10' in text
    assert "dllama_queue_waiting 2" in text and "dllama_generating 1" in text
    assert text.endswith("\n")


def test_parse_listen():
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_listen("8081") == ("127.0.0.1", 8081)
    for bad in ("localhost", "1.2.3.4:70000", "host:port", ":80"):
        with pytest.raises(UsageError, match="--listen"):
            parse_listen(bad)
    assert default_model_id("/models/small.gguf") == "small"
    assert default_model_id("llama.m") == "llama"


def test_serve_refuses_lan_without_key(tmp_path):
    from click.testing import CliRunner

    from dllama_node.ctl.serve_command import serve

    r = CliRunner().invoke(serve, ["--model", str(tmp_path / "absent.gguf"),
                                   "--listen", "0.0.0.0:8080"])
    assert isinstance(r.exception, UsageError) and "--key-file" in str(r.exception)
