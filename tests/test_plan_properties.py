"""Properties of plan_shards over random models and clusters (hypothesis):

- every query head, FFN row and vocab row is assigned exactly once (half-open ranges tile [0, n));
- the KV heads a node holds are exactly those its query heads read;
- each node's total fits its RAM (+ free swap, only when allowed), and the plan's numbers add up
  (and agree with the accounting recomputed from the slice's counts);
- with ample memory, slices are monotone in speed;
- a PlanError only when the nodes really cannot hold the model: the room they have beyond
  their fixed costs is less than the model's slices plus one unit of each kind per node (the most
  that cutting in whole units and holding a KV head twice can waste).
"""
from __future__ import annotations

import json

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dllama_node.common.units import GiB, MiB
from dllama_node.model.config import ModelConfig
from dllama_node.plan import (ModelLayout, NodeCapacity, PlanError, PlanOptions, SliceCounts, format_plan,
                              memory_need, plan_shards)
from dllama_node.plan.layout import F16, F32, Q4_0, Q8_0
from dllama_node.plan.seq_len import DEFAULT_MAX_SEQ_LEN_CAP

from .test_plan import assert_well_formed

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layouts(draw):
    matrix_type = draw(st.sampled_from([Q4_0, Q8_0, F16, F32]))
    n_kv_heads = draw(st.integers(1, 8))
    kv_group = draw(st.integers(1, 5))
    head_dim = draw(st.sampled_from([32, 64, 80, 128]))
    if head_dim == 80 and matrix_type in (Q4_0, Q8_0) and n_kv_heads * kv_group % 2:
        kv_group *= 2                                   # quantized rows of n_heads * 80 need whole blocks
    config = ModelConfig(
        "llama", dim=draw(st.integers(1, 24)) * 32, hidden_dim=draw(st.integers(1, 64)) * 32,
        n_layers=draw(st.integers(1, 4)), n_heads=n_kv_heads * kv_group, n_kv_heads=n_kv_heads,
        head_dim=head_dim, vocab_size=draw(st.integers(1, 5000)),
        seq_len=draw(st.sampled_from([64, 100, 128, 256, 300, 1000, 4096, 8192])),
        tied_embeddings=draw(st.booleans()))
    return ModelLayout.uniform(config, matrix_type, output_type=draw(st.sampled_from([Q4_0, Q8_0, F16])))


def model_bytes(layout: ModelLayout, seq_len: int) -> int:
    """Everything one worker would need for the whole model, less its fixed costs."""
    c = layout.config
    whole = memory_need(layout, SliceCounts(c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size),
                        seq_len=seq_len, role="worker", n_slice_nodes=1)
    empty = memory_need(layout, SliceCounts(), seq_len=seq_len, role="worker", n_slice_nodes=1)
    return whole.total - empty.total


@st.composite
def clusters(draw, layout: ModelLayout, ample: bool = False):
    n_nodes = draw(st.integers(1, 9))
    share = model_bytes(layout, layout.config.seq_len) // n_nodes
    caps = []
    for i in range(n_nodes):
        if ample:
            ram = 64 * GiB
        else:
            ram = int(share * draw(st.floats(0.0, 3.0))) + draw(st.integers(0, 40 * MiB))
        caps.append(NodeCapacity(
            f"node{i}", ram, draw(st.sampled_from([0, 0, share // 2, 2 * share])),
            draw(st.sampled_from([-1, -1, 8 * MiB, ram])), draw(st.integers(1, 8)),
            draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.7, 10.0])),
            coordinator_only=(i == 0 and n_nodes > 1 and draw(st.integers(0, 9)) == 0)))
    return caps


@st.composite
def options(draw, layout: ModelLayout, n_nodes: int):
    seq = layout.config.seq_len
    split = None
    if draw(st.integers(0, 4)) == 0:
        split = tuple(draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 5.0]),
                                    min_size=n_nodes, max_size=n_nodes)))
    return PlanOptions(max_seq_len=draw(st.one_of(st.none(), st.integers(1, seq))),
                       allow_swap=draw(st.booleans()),
                       reserve_bytes=draw(st.sampled_from([0, MiB, 16 * MiB])),
                       kv_bytes_per_value=draw(st.sampled_from([2, 4])), split=split,
                       batch_size=draw(st.sampled_from([1, 1, 4])))


@st.composite
def problems(draw):
    layout = draw(layouts())
    caps = draw(clusters(layout))
    return layout, caps, draw(options(layout, len(caps)))


def weight_of(caps, opts, i):
    return opts.split[i] if opts.split is not None else caps[i].speed


@SETTINGS
@given(problems())
def test_plans_tile_fit_and_add_up(problem):
    layout, caps, opts = problem
    try:
        plan = plan_shards(layout, caps, opts)
    except PlanError as err:
        event("PlanError")
        check_the_error_is_real(layout, caps, opts, err)
        return
    event(f"plan of {len(plan.slice_nodes)} slice nodes" + (", excluded some" if plan.excluded else "")
          + (", swap" if plan.totals()["swap_used"] else ""))
    assert_well_formed(plan)
    c = layout.config
    seq = plan.max_seq_len
    if opts.max_seq_len is not None:
        assert seq == opts.max_seq_len
    else:
        assert seq == c.seq_len or seq == min(128, c.seq_len) or (seq % 256 == 0 and seq < c.seq_len)
    listed = [n.node_id for n in plan.nodes] + [e.node_id for e in plan.excluded]
    assert sorted(listed) == sorted(cap.node_id for cap in caps)
    by_id = {cap.node_id: cap for cap in caps}
    n_slice = len(plan.slice_nodes)
    for s in plan.nodes:
        cap, m = by_id[s.node_id], s.memory
        assert m.available == cap.available_ram_bytes
        if m.swap_allowed:                     # a plan counts swap on every node, or on none
            assert opts.allow_swap and all(n.memory.swap_allowed == by_id[n.node_id].free_swap_bytes
                                           for n in plan.nodes)
        assert m.swap_used == max(0, m.total - m.available)
        assert m.lock == (m.lockable and m.swap_used == 0)
        assert m.lockable == (cap.memlock_limit_bytes < 0 or m.total <= cap.memlock_limit_bytes)
        again = memory_need(layout, SliceCounts.of(s.spec),
                            seq_len=seq, role=s.role, n_slice_nodes=n_slice,
                            kv_bytes_per_value=opts.kv_bytes_per_value, reserve_bytes=opts.reserve_bytes,
                            batch_size=opts.batch_size, n_exchange_nodes=len(plan.nodes))
        assert (again.weights, again.kv_cache, again.buffers, again.total) == (
            m.weights, m.kv_cache, m.buffers, m.total)
        if s.role == "coordinator":
            assert m.weights == 0 and s.node_index == 0
    totals = plan.totals()
    for key in ("weights", "kv_cache", "buffers", "reserve", "total", "swap_used", "headroom"):
        assert totals[key] == sum(getattr(s.memory, key) for s in plan.nodes)
    # each matrix exactly once, except the KV heads straddling two nodes
    one_node = memory_need(layout, SliceCounts(c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size),
                           seq_len=seq, role="worker", n_slice_nodes=1).weights_by_group
    for group in ("attn_q", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output"):
        assert sum(s.memory.weights_by_group.get(group, 0) for s in plan.nodes) == one_node[group]
    assert json.loads(json.dumps(plan.to_dict()))["totals"] == totals
    assert format_plan(plan).count("\n") >= len(plan.nodes) + 4


def check_the_error_is_real(layout, caps, opts, err):
    message = str(err)
    assert "\n" not in message and ("MiB" in message or "GiB" in message or "no node may" in message)
    c = layout.config
    seq = opts.max_seq_len if opts.max_seq_len is not None else min(128, c.seq_len)
    candidates = [i for i, cap in enumerate(caps)
                  if not cap.coordinator_only and weight_of(caps, opts, i) > 0]
    n = max(1, len(candidates))

    def need(counts, role):
        return memory_need(layout, counts, seq_len=seq, role=role, n_slice_nodes=n,
                           kv_bytes_per_value=opts.kv_bytes_per_value, reserve_bytes=opts.reserve_bytes,
                           batch_size=opts.batch_size).total

    def budget(i):
        return caps[i].available_ram_bytes + (caps[i].free_swap_bytes if opts.allow_swap else 0)

    if budget(0) < need(SliceCounts(), "coordinator"):
        return                                # the root cannot even coordinate: nothing helps
    empty = need(SliceCounts(), "worker")
    unit = layout.heads_per_unit
    slack = (need(SliceCounts(n_q_heads=unit), "worker") - empty
             + 3 * (need(SliceCounts(n_kv_heads=1), "worker") - empty)
             + need(SliceCounts(n_ffn_rows=32), "worker") - empty
             + need(SliceCounts(n_vocab_rows=32), "worker") - empty)
    room = sum(max(0, budget(i) - need(SliceCounts(), "root" if i == 0 else "worker")) for i in candidates)
    slices = need(SliceCounts(c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size), "worker") - empty
    assert room < slices + n * slack, (room, slices, n, slack, message)


@SETTINGS
@given(st.data())
def test_with_ample_memory_slices_are_monotone_in_speed(data):
    layout = data.draw(layouts())
    caps = data.draw(clusters(layout, ample=True))
    caps = [cap.__class__(cap.node_id, cap.available_ram_bytes, 0, -1, 1, cap.speed) for cap in caps]
    plan = plan_shards(layout, caps)
    assert_well_formed(plan)
    assert plan.max_seq_len == min(layout.config.seq_len, DEFAULT_MAX_SEQ_LEN_CAP)
    assert all("rounds to no unit" in e.reason for e in plan.excluded)
    unit = layout.heads_per_unit
    blocks = {s.node_id: (s.spec.n_q_heads // unit, -(-s.spec.n_ffn_rows // 32),
                          -(-s.spec.n_vocab_rows // 32))
              for s in plan.nodes}
    speed = {cap.node_id: cap.speed for cap in caps}
    for a in plan.nodes:
        for b in plan.nodes:
            if speed[a.node_id] > speed[b.node_id]:
                assert all(x >= y for x, y in zip(blocks[a.node_id], blocks[b.node_id])), (blocks, speed)


@SETTINGS
@given(st.data())
def test_enough_room_never_fails(data):
    """The converse: room beyond the model's slices plus the slack always gives a plan."""
    layout = data.draw(layouts())
    n_nodes = data.draw(st.integers(1, 8))
    seq = data.draw(st.integers(1, layout.config.seq_len))
    weights = data.draw(st.lists(st.sampled_from([0.5, 1.0, 3.0, 10.0]), min_size=n_nodes, max_size=n_nodes))
    fractions = data.draw(st.lists(st.floats(0.05, 1.0), min_size=n_nodes, max_size=n_nodes))
    opts = PlanOptions(max_seq_len=seq, reserve_bytes=MiB)
    c = layout.config

    def need(counts, role):
        return memory_need(layout, counts, seq_len=seq, role=role, n_slice_nodes=n_nodes,
                           reserve_bytes=MiB).total

    empty = need(SliceCounts(), "worker")
    slices = need(SliceCounts(c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size), "worker") - empty
    slack = (need(SliceCounts(layout.heads_per_unit, 3, 32, 32), "worker") - empty)
    share = [f / sum(fractions) for f in fractions]
    caps = [NodeCapacity(f"n{i}", need(SliceCounts(), "root" if i == 0 else "worker") + 2 * slack
                         + int(share[i] * (slices + n_nodes * slack)) + 1, 0, -1, 1, weights[i])
            for i in range(n_nodes)]
    plan = plan_shards(layout, caps, opts)
    assert_well_formed(plan)
