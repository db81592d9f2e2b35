"""plan.table: the slice and memory tables fit 100 columns (1, 3, 5 nodes, a 405B model whose
sizes need 64 bits) and what they show adds up: a node's parts to its total, the cells of
each column to the total row."""
from __future__ import annotations

import math

import pytest

from dllama_node.common.units import GiB, MiB
from dllama_node.model.config import ModelConfig
from dllama_node.plan import ModelLayout, PlanOptions, format_plan, plan_shards
from dllama_node.plan.table import (MEMORY_HEADERS, PARTS, SLICE_HEADERS, memory_table, round_to_sum,
                                    slice_table)
from tests.test_plan import node, nodes, tiny

WIDTH = 100
LLAMA_405B = ModelConfig("llama", dim=16384, hidden_dim=53248, n_layers=126, n_heads=128, n_kv_heads=8,
                         head_dim=128, vocab_size=128256, seq_len=131072)
HOSTS = ["raspberrypi-01", "raspberrypi-02", "pi5-kitchen", "pi4-garage-shelf", "old-x86-box"]


def big_plan(n_nodes: int):
    """Llama 3.1 405B in q4_0 (about 213 GiB) over n_nodes boards named like real hosts."""
    layout = ModelLayout.uniform(LLAMA_405B)
    ram = 256 * GiB // n_nodes + 32 * GiB
    caps = [node(HOSTS[i], ram, memlock=-1 if i % 2 else 8 * MiB) for i in range(n_nodes)]
    return plan_shards(layout, caps, PlanOptions(max_seq_len=8192))


def small_plan(n_nodes: int):
    return plan_shards(tiny(), nodes(n_nodes))


PLANS = {f"{name}-{n}": (maker, n) for name, maker in (("tinyllama", small_plan), ("405b", big_plan))
         for n in (1, 3, 5)}


@pytest.fixture(params=sorted(PLANS), scope="module")
def plan(request):
    maker, n = PLANS[request.param]
    return maker(n)


def rows_of(table_lines):
    """Header cells, node rows and the total row of one table, split on whitespace."""
    header, _rule, *body = table_lines
    body = [line for line in body if not line.startswith(("(", " ", "-"))]
    return header, [line.split() for line in body[:-1]], body[-1].split()


def test_the_405b_plan_needs_64_bit_sizes():
    p = big_plan(1)
    assert p.totals()["total"] > 1 << 32 and p.totals()["weights"] > 200 * GiB


def test_every_line_of_both_tables_fits_100_columns(plan):
    lines = slice_table(plan) + memory_table(plan)
    too_wide = [line for line in lines if len(line) > WIDTH]
    assert not too_wide, "\n".join(too_wide)
    assert format_plan(plan).startswith("\n".join(slice_table(plan)))


def test_every_figure_is_there(plan):
    header, rows, total = rows_of(slice_table(plan))
    for name in SLICE_HEADERS:
        assert name in header
    assert [r[0] for r in rows] == [n.node_id for n in plan.nodes]
    header, rows, total = rows_of(memory_table(plan))
    for name in MEMORY_HEADERS:
        assert name in header
    for r, n in zip(rows, plan.nodes):
        m = n.memory
        assert int(r[6]) == m.available // MiB and int(r[8]) == m.headroom // MiB
        assert int(r[7]) == math.ceil(m.swap_used / MiB)
        assert r[9] == (str(int(r[1]) + int(r[2])) if m.lock else "no")      # weights + KV cache


def test_a_nodes_parts_add_up_to_its_total_rounded_up(plan):
    _header, rows, _total = rows_of(memory_table(plan))
    for r, n in zip(rows, plan.nodes):
        parts, total = [int(v) for v in r[1:5]], int(r[5])
        assert total == math.ceil(n.memory.total / MiB)
        assert sum(parts) == total, r
        for shown, name in zip(parts, PARTS):          # each part rounded down or up, never further
            exact = getattr(n.memory, name) / MiB
            assert math.floor(exact) <= shown <= math.ceil(exact), (name, exact, shown)


def test_the_total_row_is_the_sum_of_the_cells_above(plan):
    _header, rows, total = rows_of(memory_table(plan))
    assert total[0] == "total"
    for column in range(1, 9):
        assert int(total[column]) == sum(int(r[column]) for r in rows), MEMORY_HEADERS[column]
    assert int(total[9]) == sum(int(r[9]) for r in rows if r[9] != "no")
    assert sum(int(v) for v in total[1:5]) == int(total[5])
    _header, rows, total = rows_of(slice_table(plan))
    assert total[:3] == ["total", str(plan.n_nodes), "nodes"]


def test_slice_table_ranges_and_counts():
    plan = plan_shards(tiny(), nodes(3) + [node("b3", 40 * MiB)])
    _header, rows, total = rows_of(slice_table(plan))
    assert rows[0][:6] == ["n0", "root", "[0,11)", "[0,2)", "[0,1888)", "[0,10688)"]
    assert total[3:] == ["32", "6", "5632", "32000"]             # kv heads held twice count twice
    text = format_plan(plan).splitlines()
    assert plan.seq_len_reason in text
    assert any(line.startswith("excluded b3: has 40 MiB available") for line in text)


def test_shown_parts_add_up_where_each_rounded_up_would_not():
    """Parts of 1.3, 1.3 and 0.9 MiB: rounded up one by one they show 2+2+1 = 5 beside a
    total of 4 (3.5 rounded up); rounded down (1+1+0) with the two missing units going to the
    largest fractions (0.9, then the first 0.3) they show 2+1+1 = 4."""
    parts = [int(1.3 * MiB), int(1.3 * MiB), int(0.9 * MiB)]
    total = math.ceil(sum(parts) / MiB)
    assert total == 4 and sum(math.ceil(p / MiB) for p in parts) == 5
    assert round_to_sum(parts, MiB, total) == [2, 1, 1]


@pytest.mark.parametrize("values, total, expected", [
    ([0, 0, 0], 0, [0, 0, 0]),
    ([MiB, 2 * MiB], 3, [1, 2]),                     # exact values stay
    ([MiB // 2, MiB // 2], 1, [1, 0]),               # a tie goes to the earlier value
    ([5 << 40, MiB // 3], (5 << 20) + 1, [5 << 20, 1]),   # 5 TiB: Python ints, no overflow
])
def test_round_to_sum(values, total, expected):
    assert round_to_sum(values, MiB, total) == expected


def test_round_to_sum_names_an_impossible_total():
    with pytest.raises(ValueError, match="3145728 bytes cannot show as 5 units"):
        round_to_sum([MiB, 2 * MiB], MiB, 5)


def test_a_plan_without_lock_shows_no_and_a_locked_total_of_zero():
    plan = plan_shards(tiny(), [node("a", GiB, memlock=8 * MiB)])
    _header, rows, total = rows_of(memory_table(plan))
    assert rows[0][9] == "no" and total[9] == "0"
