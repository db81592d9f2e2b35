import pytest

from dllama_node.common.errors import UsageError
from dllama_node.daemon.config import DaemonConfig, load_config, read_file


def test_the_documented_default_file_parses_to_the_defaults(tmp_path):
    import dllama_node.daemon as d
    import os
    path = os.path.join(os.path.dirname(d.__file__), "dllama-node.conf")
    cfg = load_config(path, env={})
    default = DaemonConfig(node_id=cfg.node_id)
    assert cfg == default


def test_file_then_environment_then_flags(tmp_path):
    p = tmp_path / "c.conf"
    p.write_text("model = /a.gguf\nthreads = 2\nstatic_peers = h1:1 h2:2\nallow_swap = yes\n")
    cfg = load_config(str(p), env={"DLLAMA_THREADS": "3", "DLLAMA_CLUSTER": "attic"},
                      flags={"cluster": "garage", "model": None})
    assert cfg.model == "/a.gguf" and cfg.threads == 3 and cfg.cluster == "garage"
    assert cfg.static_peers == ("h1:1", "h2:2") and cfg.allow_swap is True


@pytest.mark.parametrize("text, words", [
    ("threads = many\n", "threads = 'many' is not a valid int"),
    ("colour = blue\n", "unknown setting 'colour'"),
    ("allow_swap = perhaps\n", "allow_swap = 'perhaps'"),
    ("listen = nowhere\n", "listen 'nowhere': expected HOST:PORT"),
])
def test_bad_settings_name_the_file_and_the_value(tmp_path, text, words):
    p = tmp_path / "bad.conf"
    p.write_text(text)
    with pytest.raises(UsageError, match=words):
        load_config(str(p), env={})


def test_missing_file_is_the_defaults(tmp_path):
    assert read_file(str(tmp_path / "none.conf")) == {}


def test_dllama_node_hands_the_service_its_config_and_where_it_came_from(tmp_path, monkeypatch):
    # the translation only: flags given -> ConfigSource -> NodeService(config, source)
    from click.testing import CliRunner

    from dllama_node.daemon import journal, main, service
    from dllama_node.daemon.config import ConfigSource

    made = []

    class Recorder:
        def __init__(self, config, source):
            made.append((config, source))

        async def run(self):
            pass

    monkeypatch.setattr(service, "NodeService", Recorder)
    monkeypatch.setattr(journal, "setup_logging", lambda *a, **k: None)
    path = str(tmp_path / "c.conf")
    (tmp_path / "c.conf").write_text("model = /a.gguf\n")
    result = CliRunner().invoke(main.cli, ["--config", path, "--node-id", "n1", "--no-mdns",
                                           "--threads", "2"], env={})
    assert result.exit_code == 0, result.output
    [(config, source)] = made
    assert source == ConfigSource(path, {"node_id": "n1", "mdns": False, "threads": 2})
    assert (config.node_id, config.mdns, config.threads, config.model) == ("n1", False, 2,
                                                                           "/a.gguf")


def test_reload_reads_the_same_file_and_flags_again(tmp_path):
    from dllama_node.daemon.config import ConfigSource
    from dllama_node.daemon.service import NodeService

    p = tmp_path / "c.conf"
    p.write_text("wire = q8_0\nthreads = 2\n")
    source = ConfigSource(str(p), {"node_id": "n1", "threads": 3})
    node = NodeService(source.load(env={}), source)
    p.write_text("wire = f32\nthreads = 2\n")
    node._reload()
    assert (node.config.wire, node.config.threads, node.config.node_id) == ("f32", 3, "n1")
