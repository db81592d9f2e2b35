"""Root election: a pure decision over what this node sees of its peers.

No sockets, no clocks: the daemon passes in the peers it knows (from discovery and
heartbeats), the time, and its own ElectionState; `decide` returns what to do and the
state to keep. The daemon applies the decision (advertise the new term and root, open or
close the root's listener) and calls `decide` again on the next heartbeat or tick.

The rule
--------
A node is *eligible* unless it is `never_root`. A `coordinator_only` node is eligible (it
can be root; the shard plan gives it no slice). Eligible nodes are ranked by:

    1. holds the model file (has_model) before not
    2. most available RAM (available_ram_bytes, as advertised)
    3. lowest node id (string order)

`rank_key` spells it out; `rule_winner` applies it.

Terms
-----
Every node advertises `term` and `root_id`. A node that is root advertises
`root_id == node_id`: that is a *root announcement* at its term. A follower advertises the
root it follows (or, during an election, the winner it expects).

- Every election bumps the term: to one past the highest term this node has seen, or to a
  higher term some peer has already moved to (joining that election).
- A node accepts a root announcement only with a term >= its own.
- Two roots never serve at once once they see each other: the one with the higher term
  wins; at an equal term the rule's winner. The loser steps down. A root that sees any live
  peer at a higher term also steps down (an election is under way without it).
- A root silent for `root_timeout_s` (default 3 s; the daemon heartbeats every 1 s) is
  replaced: the next election excludes it, so a new root is in place within
  root_timeout_s + one tick (well inside 5 s) of losing the old one. A root that said
  goodbye (alive False) is replaced at once.
- An expected winner that has not announced itself within root_timeout_s of the election
  is passed over in the next one (at a higher term); so is a followed node that is live at
  this term or later but no longer announces itself (it has stepped down).
- With no eligible live node the decision is NO_ROOT, its reason names the never_root
  nodes, and the term does not move.

`ElectionState.root_confirmed` tells a follower whether its root has announced itself
(join its cluster) or is only the expected winner of an election (wait).

Views must use what each node advertises (its own entry included): two nodes that rank the
same claimants from the same adverts agree on the winner.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Iterable, List, Optional, Sequence, Tuple

from dllama_node.discovery.txt import TERM_MAX

DEFAULT_ROOT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PeerView:
    """What this node knows of one node (itself included), as that node advertised it.

    alive: the node is listed and has not said goodbye.
    last_seen_s: when this node last heard from it (heartbeat or advert), on the clock of
      `now_s`; None when the caller does not track it (then `alive` alone counts).
    term, root_id: the node's own election state (root_id == node_id: it is root).
    """

    node_id: str
    available_ram_bytes: int
    has_model: bool = False
    never_root: bool = False
    coordinator_only: bool = False
    term: int = 0
    root_id: Optional[str] = None
    alive: bool = True
    last_seen_s: Optional[float] = None

    @property
    def eligible(self) -> bool:
        return not self.never_root

    @property
    def claims_root(self) -> bool:
        return self.root_id == self.node_id


@dataclass(frozen=True)
class ElectionState:
    """This node's view of the election.

    term: the highest term this node has accepted (0 before any election).
    root_id: the root it follows, itself when it is root, the expected winner during an
      election, or None.
    last_heard_from_root: when root_id was last heard announcing itself (or, during an
      election, when the election started); None before any.
    root_confirmed: root_id has announced itself at this term (always True for a root);
      False while an election waits for the expected winner.
    """

    term: int = 0
    root_id: Optional[str] = None
    last_heard_from_root: Optional[float] = None
    root_confirmed: bool = False


class Action(enum.Enum):
    KEEP = "keep"                        # nothing changes (state may refresh last_heard)
    START_ELECTION = "start election"    # new term; wait for the expected winner to announce
    BECOME_ROOT = "become root"          # announce root_id = self at decision.term
    FOLLOW = "follow"                    # accept decision.root_id's announcement
    STEP_DOWN = "step down"              # was root; another root wins (or never_root now)
    NO_ROOT = "no root"                  # no eligible node is live: decision.reason says why


@dataclass(frozen=True)
class Decision:
    """What to do. `state` is the ElectionState to keep; root_id and term repeat it."""

    action: Action
    state: ElectionState
    reason: str

    @property
    def root_id(self) -> Optional[str]:
        return self.state.root_id

    @property
    def term(self) -> int:
        return self.state.term


def rank_key(peer: PeerView) -> Tuple[bool, int, str]:
    """Sort key of the rule: smallest first wins (model holder, most RAM, lowest id)."""
    return (not peer.has_model, -int(peer.available_ram_bytes), peer.node_id)


def rule_winner(peers: Iterable[PeerView]) -> Optional[PeerView]:
    """The eligible node the rule ranks first, or None when none is eligible."""
    eligible = [p for p in peers if p.eligible]
    return min(eligible, key=rank_key) if eligible else None


def _claim_key(term: int, peer: PeerView) -> Tuple[int, Tuple[bool, int, str]]:
    """Claims order: higher term first, then the rule. Smallest wins."""
    return (-term, rank_key(peer))


def _fresh(peer: PeerView, now_s: float, root_timeout_s: float) -> bool:
    if not peer.alive:
        return False
    return peer.last_seen_s is None or now_s - peer.last_seen_s < root_timeout_s


def _check(peers: Sequence[PeerView], self_id: str, root_timeout_s: float) -> PeerView:
    if root_timeout_s <= 0:
        raise ValueError(f"root_timeout_s is {root_timeout_s}, expected > 0")
    ids = [p.node_id for p in peers]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"peer list names node(s) {', '.join(dupes)} more than once")
    for p in peers:
        if not 0 <= p.term <= TERM_MAX:
            raise ValueError(f"node {p.node_id} advertises term {p.term}, expected 0 to {TERM_MAX}")
    me = [p for p in peers if p.node_id == self_id]
    if not me:
        raise ValueError(f"peer list does not include this node ({self_id}); "
                         f"it names {len(peers)} other node(s)")
    return me[0]


def decide(state: ElectionState, peers: Sequence[PeerView], now_s: float, self_id: str,
           root_timeout_s: float = DEFAULT_ROOT_TIMEOUT_S) -> Decision:
    """One step of the election for node `self_id`; the same inputs give the same Decision.

    peers: every node this node knows, itself included (its own entry gives its capacity
    and flags; its term/root_id are taken from `state`). Order does not matter. A peer
    counts only while alive and heard within root_timeout_s (last_seen_s).

    As root: KEEP; STEP_DOWN to a better claim (higher term, or equal term and the rule);
    at a peer's higher term, BECOME_ROOT there again if the rule still picks this node,
    else STEP_DOWN and expect the winner.
    As follower: FOLLOW (or KEEP) the best claim at a term >= its own; KEEP waiting while
    its root (or expected winner) was heard within root_timeout_s; else an election:
    BECOME_ROOT, START_ELECTION (expecting another winner) or NO_ROOT.
    """
    me = _check(peers, self_id, root_timeout_s)
    me = replace(me, term=state.term, root_id=state.root_id, alive=True, last_seen_s=None)
    others = [p for p in peers if p.node_id != self_id and _fresh(p, now_s, root_timeout_s)]
    max_term = max([state.term] + [p.term for p in others])

    # Root announcements this node can see, its own included; never_root claims are void.
    claims: List[Tuple[int, PeerView]] = [(p.term, p) for p in others
                                          if p.claims_root and p.eligible]
    i_am_root = state.root_id == self_id
    if i_am_root and me.eligible:
        claims.append((state.term, me))
    best_term, best = min(claims, key=lambda c: _claim_key(*c)) if claims else (None, None)

    if i_am_root:
        if not me.eligible:
            return _elect(state.term, max_term, me, others, now_s, exclude=None,
                          action=Action.STEP_DOWN, why=f"node {self_id} is never_root")
        if best is not me:
            heard = best.last_seen_s if best.last_seen_s is not None else now_s
            return Decision(Action.STEP_DOWN,
                            ElectionState(best_term, best.node_id, heard, root_confirmed=True),
                            f"node {best.node_id} is root at term {best_term} "
                            f"(this node was root at term {state.term})")
        if max_term > state.term:
            higher = sorted(p.node_id for p in others if p.term == max_term)
            return _elect(state.term, max_term, me, others, now_s, exclude=None,
                          action=Action.STEP_DOWN,
                          why=f"node(s) {', '.join(higher)} moved to term {max_term}")
        return Decision(Action.KEEP, replace(state, root_confirmed=True),
                        f"root at term {state.term}")

    # A follower (or a node between elections).
    if best is not None and best_term >= state.term:
        heard = best.last_seen_s if best.last_seen_s is not None else now_s
        new = ElectionState(best_term, best.node_id, heard, root_confirmed=True)
        if best.node_id == state.root_id and best_term == state.term and state.root_confirmed:
            return Decision(Action.KEEP, new, f"following {best.node_id} at term {best_term}")
        return Decision(Action.FOLLOW, new,
                        f"node {best.node_id} announced itself root at term {best_term}")

    if state.root_id is None or state.last_heard_from_root is None:
        why = "no root known" if state.root_id is None else f"root {state.root_id} never heard"
        return _elect(state.term, max_term, me, others, now_s, exclude=None,
                      action=Action.START_ELECTION, why=why)

    silent_s = now_s - state.last_heard_from_root
    root = next((p for p in peers if p.node_id == state.root_id), None)
    if root is not None and not root.alive:
        why = f"root {state.root_id} left"
    elif root is not None and _fresh(root, now_s, root_timeout_s) and root.term >= state.term:
        # Live, at our term or past it, and not announcing itself: it has moved on
        # (stepped down, or elected another node) and will not serve this term.
        why = f"{state.root_id} is at term {root.term} and does not announce itself root"
    elif silent_s >= root_timeout_s:
        why = (f"root {state.root_id} silent for {silent_s:.1f} s "
               f"(timeout {root_timeout_s:.1f} s)")
    else:
        return Decision(Action.KEEP, state,
                        f"waiting for {state.root_id} at term {state.term} "
                        f"(silent {silent_s:.1f} s of {root_timeout_s:.1f} s)")
    return _elect(state.term, max_term, me, others, now_s, exclude=state.root_id,
                  action=Action.START_ELECTION, why=why)


def _elect(term: int, max_term: int, me: PeerView, others: Sequence[PeerView], now_s: float,
           exclude: Optional[str], action: Action, why: str) -> Decision:
    """An election over the fresh nodes (minus `exclude`): at max_term when a peer has
    already moved past this node's term (joining that election), else at term + 1."""
    candidates = [p for p in list(others) + [me] if p.node_id != exclude]
    winner = rule_winner(candidates)
    if winner is None:
        reason = _no_root_reason(candidates, exclude)
        # The term does not move: nothing was elected, and a no-root tick must not inflate it.
        return Decision(Action.NO_ROOT, ElectionState(term, None, None), f"{why}; {reason}")
    new_term = max_term if max_term > term else min(term + 1, TERM_MAX)
    if winner.node_id == me.node_id:
        return Decision(Action.BECOME_ROOT,
                        ElectionState(new_term, me.node_id, now_s, root_confirmed=True),
                        f"{why}; this node wins the election at term {new_term}")
    return Decision(action, ElectionState(new_term, winner.node_id, now_s, root_confirmed=False),
                    f"{why}; election at term {new_term}, expecting {winner.node_id} "
                    "to become root")


def _no_root_reason(candidates: Sequence[PeerView], exclude: Optional[str]) -> str:
    excluded = f" ({exclude} is passed over: it did not serve)" if exclude is not None else ""
    if not candidates:
        return f"no live node to elect{excluded}"
    never = sorted(p.node_id for p in candidates if p.never_root)
    return (f"no eligible node: all {len(candidates)} live node(s) are never_root "
            f"({', '.join(never)}){excluded}; clear never_root on at least one node")
