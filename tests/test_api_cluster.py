"""The HTTP API over a two-node local cluster (real worker process, loopback TCP)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

openai = pytest.importorskip("openai")

from dllama_node.api.backend import EngineBackend  # noqa: E402
from dllama_node.api.server import ApiConfig, serve_in_thread  # noqa: E402
from dllama_node.ctl.cli import cli  # noqa: E402
from dllama_node.cluster.run_options import RunOptions  # noqa: E402
from dllama_node.ctl.runner import open_runner  # noqa: E402
from dllama_node.model.generate import PRESETS, write_random_model  # noqa: E402

from tests.test_api_http import parse_metrics, request  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api-cluster") / "tiny.gguf")
    write_random_model(path, PRESETS["tiny"], weight_type="q4_0", seed=9)
    return path


def test_cluster_greedy_text_and_per_node_metrics(model_path):
    r = CliRunner().invoke(cli, ["generate", "--model", model_path, "--nodes", "2", "--threads",
                                 "1", "--temperature", "0", "-n", "12", "--prompt", "Once upon",
                                 "--json"])
    assert r.exit_code == 0, r.output
    want = json.loads(r.stdout.strip().splitlines()[-1])
    with open_runner(RunOptions(model_path, threads=1, nodes=2), quiet=True) as runner:
        with serve_in_thread(EngineBackend(runner, "tiny2"), ApiConfig(port=0)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            answer = client.completions.create(model="tiny2", prompt="Once upon", max_tokens=12,
                                               temperature=0)
            streamed = client.completions.create(model="tiny2", prompt="Once upon",
                                                 max_tokens=12, temperature=0, stream=True)
            streamed_text = "".join(c.choices[0].text for c in streamed)
            client.close()
            metrics = parse_metrics(request(srv, "GET", "/metrics")[2].decode())
    assert answer.choices[0].text == want["text"] == streamed_text
    nodes = [r.node_id for r in runner.reports]
    assert len(nodes) == 2
    for node in nodes:
        assert metrics[f'dllama_sync_ms{{node="{node}"}}'] > 0
        for kind in ("weights", "kv_cache", "planned", "rss"):
            assert metrics[f'dllama_memory_bytes{{node="{node}",kind="{kind}"}}'] > 0
    # each node holds part of the model: less than the whole file's weights
    whole = runner.reports[0].weights_bytes + runner.reports[1].weights_bytes
    assert metrics[f'dllama_memory_bytes{{node="{nodes[1]}",kind="weights"}}'] < whole
