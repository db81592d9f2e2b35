"""bench/compare_sync.py's baseline, the star all-reduce of bench/star_sync.py, put into a
local cluster through the product's seams (ClusterRoot.link, Worker.unlinked_sync,
LocalCluster's root_class): on an exact wire it gives the mesh's tokens, every round."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests import hf_models

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                     "compare_sync.py")


def test_star_and_mesh_give_the_same_tokens_on_an_exact_wire(tmp_path):
    shape = hf_models.SHAPES[1]            # 6 query heads over 2 KV heads, hidden 224
    model = str(tmp_path / "gqa.gguf")
    hf_models.write_gguf(hf_models.make_hf_llama(shape, seed=7), shape, model, "f32")
    run = subprocess.run([sys.executable, BENCH, "--model", model, "--nodes", "3", "--wire",
                          "f32", "--prompt-tokens", "8", "--gen-tokens", "12", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    star, mesh, summary = lines
    assert star["sync"] == "star" and mesh["sync"].startswith("mesh/")
    assert star["decode_steps"] == mesh["decode_steps"] == 11
    assert summary["star_mesh_tokens_equal"] == 12
    assert all(summary["same_tokens_every_round"].values())
