"""A newcomer's first hour with dllama-ctl: each friction found by running the real
command (CliRunner over the real code, or the console script in a subprocess or a
pseudo-terminal) and checked on what a person sees: one line, a named exit code."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dllama_node.common import errors
from dllama_node.ctl.cli import cli
from dllama_node.model.generate import PRESETS
from tests.test_cli import (CTL, assert_one_line_error, run_ctl,  # noqa: F401 - tiny: a fixture
                            tiny)


# ---- info: tensor types by name ---------------------------------------------------------
def test_info_json_names_the_tensor_types(tiny):
    r = CliRunner().invoke(cli, ["info", "--model", tiny, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert set(d["bytes_by_type"]) == {"F32", "Q4_0"}
    assert d["bytes_by_type"]["Q4_0"] > d["bytes_by_type"]["F32"] > 0
    assert sum(d["tensors_by_type"].values()) == d["tensors"]
    cfg = PRESETS["tiny"]
    assert d["bytes_by_type"]["F32"] == 4 * cfg.dim * (2 * cfg.n_layers + 1)   # the norms


def test_info_text_shows_an_aligned_table_of_types(tiny):
    r = CliRunner().invoke(cli, ["info", "--model", tiny])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split() == ["type", "tensors", "bytes"])
    rows = [l.split(None, 2) for l in lines[header + 1:header + 3]]
    assert [row[0] for row in rows] == ["F32", "Q4_0"]
    d = json.loads(CliRunner().invoke(cli, ["info", "--model", tiny, "--json"]).output)
    assert [int(row[1]) for row in rows] == [d["tensors_by_type"]["F32"],
                                             d["tensors_by_type"]["Q4_0"]]
    assert rows[1][2].endswith("MiB")
    ends = {len(l) for l in lines[header:header + 3]}
    assert len(ends) == 1, lines[header:header + 3]          # the byte column lines up


# ---- chat without the service: say that --model chats here -------------------------------
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_no_service_names_the_local_model_option(command, tmp_path):
    absent = str(tmp_path / "control.sock")
    r = run_ctl(command, "--socket", absent, "--wait-timeout", "0", stdin="hello")
    assert_one_line_error(r, errors.EXIT_CLUSTER, f"no control socket at {absent}",
                          f"dllama-ctl {command} --model FILE")
