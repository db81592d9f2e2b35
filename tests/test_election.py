"""Root election (daemon/election.py): the rule, terms, timeouts, and properties over random
clusters simulated in rounds (hypothesis).

The simulation: every node advertises (capacity, flags, term, root_id); each round every
live node calls `decide` on what it sees, and all decisions are applied together. A node
killed with SIGKILL stays listed (alive) with a frozen last_seen_s, as mDNS does; only the
heartbeat notices.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllama_node.common.units import GiB, MiB
from dllama_node.daemon.election import (DEFAULT_ROOT_TIMEOUT_S, Action, ElectionState,
                                         PeerView, decide, rank_key, rule_winner)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TIMEOUT_S = DEFAULT_ROOT_TIMEOUT_S


# ---- simulation ----------------------------------------------------------------------
@dataclass
class SimNode:
    spec: PeerView                     # capacity and flags; term/root_id come from state
    state: ElectionState
    up: bool = True
    last_beat_s: float = 0.0           # its last heartbeat (frozen once it is killed)
    goodbye: bool = False              # left cleanly (peers see alive=False)


class Cluster:
    def __init__(self, nodes: List[SimNode],
                 sees: Optional[Callable[[str, str], bool]] = None):
        self.nodes = {n.spec.node_id: n for n in nodes}
        self.sees = sees or (lambda a, b: True)
        self.history: List[Dict[str, object]] = []

    def view(self, observer: str) -> List[PeerView]:
        out = []
        for n in self.nodes.values():
            if n.spec.node_id != observer and not self.sees(observer, n.spec.node_id):
                continue
            out.append(replace(n.spec, term=n.state.term, root_id=n.state.root_id,
                               alive=not n.goodbye, last_seen_s=n.last_beat_s))
        return out

    def round(self, now_s: float, shuffle: Optional[random.Random] = None):
        for n in self.nodes.values():
            if n.up:
                n.last_beat_s = now_s
        decisions = {}
        for node_id, n in self.nodes.items():
            if not n.up:
                continue
            peers = self.view(node_id)
            if shuffle is not None:
                shuffle.shuffle(peers)
            decisions[node_id] = decide(n.state, peers, now_s, node_id, TIMEOUT_S)
        for node_id, d in decisions.items():
            self.nodes[node_id].state = d.state
            if d.action == Action.BECOME_ROOT:
                assert not self.nodes[node_id].spec.never_root, d
        self.history.append(decisions)
        return decisions

    def roots(self) -> List[str]:
        return sorted(i for i, n in self.nodes.items() if n.up and n.state.root_id == i)

    def run_until_stable(self, start_s: float = 0.0, step_s: float = 1.0, max_rounds: int = 30,
                         shuffle: Optional[random.Random] = None) -> float:
        """Rounds until every live node decides KEEP with the same root; returns the time."""
        now = start_s
        for _ in range(max_rounds):
            decisions = self.round(now, shuffle)
            live = [n for n in self.nodes.values() if n.up]
            if (all(d.action == Action.KEEP for d in decisions.values())
                    and len({(n.state.term, n.state.root_id) for n in live}) == 1):
                return now
            now += step_s
        raise AssertionError(f"no stable root after {max_rounds} rounds: "
                             f"{[(i, n.state) for i, n in self.nodes.items()]}")


@st.composite
def specs(draw, min_size=1, max_size=8, eligible=True):
    n = draw(st.integers(min_size, max_size))
    ids = draw(st.lists(st.text("abcdefgh0123456789-", min_size=1, max_size=6),
                        min_size=n, max_size=n, unique=True))
    ram = st.sampled_from([512 * MiB, GiB, 2 * GiB]) | st.integers(0, 16 * GiB)  # ties and spread
    out = [PeerView(node_id=i, available_ram_bytes=draw(ram), has_model=draw(st.booleans()),
                    never_root=draw(st.booleans()), coordinator_only=draw(st.booleans()))
           for i in ids]
    if eligible and all(p.never_root for p in out):
        k = draw(st.integers(0, n - 1))
        out[k] = replace(out[k], never_root=False)
    return out


def fresh(spec_list: List[PeerView]) -> List[SimNode]:
    return [SimNode(s, ElectionState()) for s in spec_list]


# ---- the rule ------------------------------------------------------------------------
def test_rule_model_then_ram_then_lowest_id():
    a = PeerView("a", 8 * GiB)
    b = PeerView("b", 1 * GiB, has_model=True)
    c = PeerView("c", 2 * GiB, has_model=True)
    d = PeerView("d", 2 * GiB, has_model=True)
    assert rule_winner([a, b]) is b                      # the model beats 8x the RAM
    assert rule_winner([b, c]) is c                      # then RAM
    assert rule_winner([d, c]) is c                      # then the lowest id
    assert rule_winner([replace(c, never_root=True), b, d]) is d
    assert rule_winner([replace(a, never_root=True)]) is None
    coord = PeerView("z", 64 * GiB, has_model=True, coordinator_only=True)
    assert rule_winner([a, b, c, coord]) is coord        # coordinator_only may be root
    assert sorted([d, a, c, b], key=rank_key) == [c, d, b, a]


def test_fresh_cluster_elects_rule_winner_in_two_rounds():
    specs_ = [PeerView("n1", 2 * GiB), PeerView("n2", 4 * GiB), PeerView("n3", GiB, has_model=True)]
    cl = Cluster(fresh(specs_))
    first = cl.round(0.0)
    assert first["n3"].action == Action.BECOME_ROOT and first["n3"].term == 1
    assert first["n1"].action == Action.START_ELECTION and first["n1"].root_id == "n3"
    second = cl.round(1.0)
    assert {d.action for i, d in second.items() if i != "n3"} == {Action.FOLLOW}
    assert cl.roots() == ["n3"]
    assert all(n.state.term == 1 for n in cl.nodes.values())


def test_accepts_only_terms_at_least_its_own():
    me = PeerView("me", GiB)
    old_root = PeerView("old", 8 * GiB, has_model=True, term=2, root_id="old")
    state = ElectionState(term=3, root_id="new", last_heard_from_root=10.0)
    d = decide(state, [me, old_root], 11.0, "me")
    assert d.action == Action.KEEP and d.root_id == "new" and d.term == 3
    newer = PeerView("new", GiB, term=3, root_id="new")
    d = decide(state, [me, old_root, newer], 11.0, "me")
    assert d.root_id == "new" and d.term == 3
    higher = PeerView("x", GiB, term=5, root_id="x")
    d = decide(state, [me, old_root, newer, higher], 11.0, "me")
    assert d.action == Action.FOLLOW and d.root_id == "x" and d.term == 5


def test_two_roots_higher_term_wins_equal_term_rule_wins():
    a = PeerView("a", GiB)
    b = PeerView("b", 4 * GiB, has_model=True)
    # a is root at term 4, b at 3: b (the rule's favourite) steps down to the higher term.
    d = decide(ElectionState(3, "b", 0.0), [replace(a, term=4, root_id="a"), b], 1.0, "b")
    assert d.action == Action.STEP_DOWN and (d.root_id, d.term) == ("a", 4)
    assert decide(ElectionState(4, "a", 0.0), [a, replace(b, term=3, root_id="b")], 1.0,
                  "a").action == Action.KEEP
    # Equal terms: the rule's winner (b) stays, a steps down.
    d = decide(ElectionState(4, "a", 0.0), [a, replace(b, term=4, root_id="b")], 1.0, "a")
    assert d.action == Action.STEP_DOWN and (d.root_id, d.term) == ("b", 4)
    assert decide(ElectionState(4, "b", 0.0), [replace(a, term=4, root_id="a"), b], 1.0,
                  "b").action == Action.KEEP


def test_root_sees_higher_term_without_a_claim_joins_that_election():
    r = PeerView("r", 8 * GiB, has_model=True)
    p = PeerView("p", GiB, term=6, root_id="q")              # p started an election at 6
    d = decide(ElectionState(5, "r", 0.0), [r, p, PeerView("q", GiB)], 1.0, "r")
    assert d.action == Action.BECOME_ROOT and d.term == 6    # r is still the rule's winner


def test_never_root_root_steps_down():
    me = PeerView("me", 8 * GiB, has_model=True, never_root=True)
    other = PeerView("o", GiB)
    d = decide(ElectionState(2, "me", 0.0), [me, other], 0.5, "me")
    assert d.action == Action.STEP_DOWN and d.root_id == "o" and d.term == 3
    alone = decide(ElectionState(2, "me", 0.0), [me], 0.5, "me")
    assert alone.action == Action.NO_ROOT and alone.root_id is None


def test_claims_by_never_root_nodes_are_void():
    me = PeerView("me", GiB)
    rogue = PeerView("rogue", GiB, never_root=True, term=9, root_id="rogue")
    d = decide(ElectionState(), [me, rogue], 0.0, "me")
    assert d.action == Action.BECOME_ROOT and d.root_id == "me"


def test_all_never_root_no_root_with_reason():
    specs_ = [PeerView(f"n{i}", GiB, never_root=True) for i in range(3)]
    cl = Cluster(fresh(specs_))
    for t in range(3):
        for d in cl.round(float(t)).values():
            assert d.action == Action.NO_ROOT
            assert "never_root" in d.reason and "n0, n1, n2" in d.reason
            assert d.root_id is None and d.term == 0          # no term inflation
    assert cl.roots() == []


def test_validation():
    with pytest.raises(ValueError, match="does not include this node"):
        decide(ElectionState(), [PeerView("a", GiB)], 0.0, "b")
    with pytest.raises(ValueError, match="more than once"):
        decide(ElectionState(), [PeerView("a", GiB), PeerView("a", 2 * GiB)], 0.0, "a")
    with pytest.raises(ValueError, match="root_timeout_s"):
        decide(ElectionState(), [PeerView("a", GiB)], 0.0, "a", root_timeout_s=0)


# ---- timeouts ------------------------------------------------------------------------
def _kill_root_and_measure(cl: Cluster, t0: float, tick_s: float, goodbye: bool = False) -> float:
    """Kill the root before the round at t0; seconds from its last heartbeat until every
    live node follows one new root."""
    root = cl.roots()[0]
    cl.nodes[root].up = False
    cl.nodes[root].goodbye = goodbye
    now = t0
    while now < t0 + 10:
        cl.round(now)
        roots = cl.roots()
        live = [n for n in cl.nodes.values() if n.up]
        if roots and all(n.state.root_id == roots[0] and n.state.root_confirmed for n in live):
            assert len(roots) == 1
            return round(now - cl.nodes[root].last_beat_s, 9)
        now = round(now + tick_s, 9)
    raise AssertionError("no new root within 10 s")


def test_silent_root_replaced_within_5_s():
    specs_ = [PeerView("a", 4 * GiB, has_model=True), PeerView("b", 2 * GiB), PeerView("c", GiB)]
    cl = Cluster(fresh(specs_))
    end = cl.run_until_stable()
    assert cl.roots() == ["a"]
    took = _kill_root_and_measure(cl, end + 0.1, tick_s=0.1)
    assert TIMEOUT_S <= took < 5.0
    assert cl.roots() == ["b"] and cl.nodes["b"].state.term == 2
    c = cl.nodes["c"].state
    assert (c.term, c.root_id, c.root_confirmed) == (2, "b", True)


def test_root_that_says_goodbye_is_replaced_at_once():
    specs_ = [PeerView("a", 4 * GiB, has_model=True), PeerView("b", 2 * GiB), PeerView("c", GiB)]
    cl = Cluster(fresh(specs_))
    end = cl.run_until_stable()
    took = _kill_root_and_measure(cl, end + 0.1, tick_s=0.1, goodbye=True)
    assert took < 0.25 and cl.roots() == ["b"]          # the first tick after it left


def test_expected_winner_that_never_announces_is_passed_over():
    me = PeerView("me", GiB)
    mute = PeerView("mute", 8 * GiB, has_model=True, term=0)   # live, stuck at an old term
    state = ElectionState(1, "mute", 0.0)
    assert decide(state, [me, mute], 2.9, "me").action == Action.KEEP
    d = decide(state, [me, mute], 3.0, "me")
    assert d.action == Action.BECOME_ROOT and d.term == 2


def test_election_joins_a_higher_term_already_started():
    r = PeerView("r", 16 * GiB, has_model=True, term=4, root_id="r", last_seen_s=0.0)  # dead
    me = PeerView("me", GiB)
    w = PeerView("w", 8 * GiB, term=4, root_id="r")
    p = PeerView("p", GiB, term=7, root_id="w")          # p's election at term 7 is under way
    state = ElectionState(4, "r", 0.0, root_confirmed=True)
    d = decide(state, [me, w, p, r], 3.5, "me")
    assert (d.action, d.term, d.root_id) == (Action.START_ELECTION, 7, "w")
    assert not d.state.root_confirmed
    d = decide(state, [me, w, r], 3.5, "me")              # nobody ahead: one past its own
    assert (d.term, d.root_id) == (5, "w")
    d = decide(ElectionState(5, "w", 0.0), [me, w], 3.5, "me")   # w never announced term 5
    assert (d.action, d.term, d.root_id) == (Action.BECOME_ROOT, 6, "me")


def test_terms_never_count_past_term_max():
    """A peer at the highest term an advert may carry: elections stay at TERM_MAX, so the
    advert this node publishes next still validates (it once overflowed past 2**63-1)."""
    from dllama_node.discovery.txt import TERM_MAX, NodeAdvert

    me = PeerView("me", GiB, has_model=True)
    far = PeerView("far", GiB, term=TERM_MAX, root_id="")
    d = decide(ElectionState(0, None, None), [me, far], 3.5, "me")
    assert d.term == TERM_MAX
    d = decide(ElectionState(TERM_MAX, "far", 0.0), [me, far], 3.5, "me")   # far never announced
    assert d.term == TERM_MAX and d.root_id == "me"
    NodeAdvert(node_id="me", cluster="c", port=7321, heartbeat_port=7321, term=d.term)
    with pytest.raises(ValueError, match="expected 0 to"):
        decide(ElectionState(0, None, None), [me, replace(far, term=TERM_MAX + 1)], 3.5, "me")


def test_follower_of_a_root_that_moved_on_elects_at_once():
    # r stepped down at term 5 expecting x; x still follows r at term 4.
    x = PeerView("x", 8 * GiB)
    r = PeerView("r", GiB, term=5, root_id="x")
    d = decide(ElectionState(4, "r", 10.0), [x, r], 10.1, "x")
    assert d.action == Action.BECOME_ROOT and d.term == 5


@SETTINGS
@given(specs(min_size=2), st.integers(0, 2**32 - 1), st.floats(0.05, 1.0))
def test_any_dead_root_replaced_by_survivors_rule_winner_within_5_s(spec_list, seed, tick_s):
    cl = Cluster(fresh(spec_list))
    end = cl.run_until_stable()
    root = cl.roots()[0]
    survivors = [s for s in spec_list if s.node_id != root]
    expected = rule_winner(survivors)
    if expected is None:
        return
    took = _kill_root_and_measure(cl, end + random.Random(seed).uniform(0, 1), tick_s)
    assert took < 5.0
    assert cl.roots() == [expected.node_id]


# ---- properties ----------------------------------------------------------------------
@st.composite
def arbitrary_states(draw, spec_list):
    ids = [s.node_id for s in spec_list]
    return [ElectionState(term=draw(st.integers(0, 6)),
                          root_id=draw(st.none() | st.sampled_from(ids)),
                          last_heard_from_root=draw(st.none() | st.floats(-5.0, 0.0)),
                          root_confirmed=draw(st.booleans()))
            for _ in spec_list]


@SETTINGS
@given(st.data())
def test_same_view_elects_exactly_one_root(data):
    spec_list = data.draw(specs())
    states = data.draw(arbitrary_states(spec_list))
    cl = Cluster([SimNode(s, st_) for s, st_ in zip(spec_list, states)])
    cl.run_until_stable()
    roots = cl.roots()
    assert len(roots) == 1
    root = cl.nodes[roots[0]]
    assert not root.spec.never_root
    assert all(n.state == replace(root.state, last_heard_from_root=n.state.last_heard_from_root)
               for n in cl.nodes.values())
    assert root.state.term >= max(s.term for s in states)


@SETTINGS
@given(specs())
def test_fresh_cluster_elects_rule_winner(spec_list):
    cl = Cluster(fresh(spec_list))
    end = cl.run_until_stable()
    assert cl.roots() == [rule_winner(spec_list).node_id]
    assert end <= 2.0                                       # elected in round 1, followed in 2
    assert {n.state.term for n in cl.nodes.values()} == {1}


@SETTINGS
@given(st.data())
def test_decision_does_not_depend_on_peer_order(data):
    spec_list = data.draw(specs(eligible=False))
    states = data.draw(arbitrary_states(spec_list))
    seen = data.draw(st.lists(st.none() | st.floats(-6.0, 0.0), min_size=len(spec_list),
                              max_size=len(spec_list)))
    alive = data.draw(st.lists(st.booleans(), min_size=len(spec_list), max_size=len(spec_list)))
    peers = [replace(s, term=x.term, root_id=x.root_id, last_seen_s=t, alive=a)
             for s, x, t, a in zip(spec_list, states, seen, alive)]
    me = data.draw(st.sampled_from(peers))
    state = states[peers.index(me)]
    expected = decide(state, peers, 0.0, me.node_id)
    shuffled = data.draw(st.permutations(peers))
    assert decide(state, shuffled, 0.0, me.node_id) == expected


@SETTINGS
@given(st.data())
def test_whole_simulation_does_not_depend_on_peer_order(data):
    spec_list = data.draw(specs())
    states = data.draw(arbitrary_states(spec_list))
    seed = data.draw(st.integers(0, 2**32 - 1))
    plain = Cluster([SimNode(s, x) for s, x in zip(spec_list, states)])
    mixed = Cluster([SimNode(s, x) for s, x in zip(spec_list, states)])
    plain.run_until_stable()
    mixed.run_until_stable(shuffle=random.Random(seed))
    assert plain.roots() == mixed.roots()
    assert [d for d in plain.history] == [d for d in mixed.history]


@SETTINGS
@given(specs(min_size=2), st.data())
def test_split_views_converge_to_highest_term(spec_list, data):
    eligible = [s for s in spec_list if not s.never_root]
    # Two groups, each with its own root (an eligible node) and its own term.
    root_a = data.draw(st.sampled_from(eligible))
    others = [s for s in spec_list if s is not root_a]
    group_b = data.draw(st.lists(st.sampled_from(others), min_size=1,
                                 unique_by=lambda s: s.node_id))
    if all(s.never_root for s in group_b):         # each side needs a node that can be root
        group_b[0] = replace(group_b[0], never_root=False)
        spec_list = [group_b[0] if s.node_id == group_b[0].node_id else s for s in spec_list]
    b_eligible = [s for s in group_b if not s.never_root]
    root_b = data.draw(st.sampled_from(b_eligible))
    b_ids = {s.node_id for s in group_b}
    term_a, term_b = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    nodes = []
    for s in spec_list:
        term, root = (term_b, root_b.node_id) if s.node_id in b_ids else (term_a, root_a.node_id)
        nodes.append(SimNode(s, ElectionState(term, root, 0.0)))
    cl = Cluster(nodes)                    # the partition has healed: everyone sees everyone
    cl.run_until_stable(start_s=0.5)
    if term_a != term_b:
        winner = root_a if term_a > term_b else root_b
    else:
        winner = rule_winner([root_a, root_b])
    assert cl.roots() == [winner.node_id]
    assert {n.state.term for n in cl.nodes.values()} == {max(term_a, term_b)}
    assert len(cl.history) <= 2           # one round to switch, one to confirm


@SETTINGS
@given(specs(min_size=3), st.integers(0, 2**32 - 1))
def test_partition_heals_to_one_root(spec_list, seed):
    """Each side of a partition elects its own root; once it heals there is one root, at the
    highest term either side reached."""
    rng = random.Random(seed)
    ids = [s.node_id for s in spec_list]
    side = {i: rng.random() < 0.5 for i in ids}
    split = {"on": True}
    cl = Cluster(fresh(spec_list),
                 sees=lambda a, b: not split["on"] or side[a] == side[b])
    now = 0.0
    for _ in range(8):
        cl.round(now)
        now += 1.0
    split["on"] = False
    top = max(n.state.term for n in cl.nodes.values())
    cl.run_until_stable(start_s=now)
    assert len(cl.roots()) == 1
    assert not cl.nodes[cl.roots()[0]].spec.never_root
    assert {n.state.term for n in cl.nodes.values()} == {top}


@SETTINGS
@given(specs(eligible=False))
def test_never_root_nodes_never_elected(spec_list):
    cl = Cluster(fresh(spec_list))                  # Cluster.round asserts it at every step
    if all(s.never_root for s in spec_list):
        d = cl.round(0.0)
        assert all(x.action == Action.NO_ROOT and "never_root" in x.reason for x in d.values())
        return
    cl.run_until_stable()
    assert not cl.nodes[cl.roots()[0]].spec.never_root
