"""Splitting n units among nodes in proportion to weights, bounded by room: water-filling in
integers, and the half-open ranges that follow from the counts.

The rule is Sainte-Lague's (Webster's) divisor method: unit after unit goes to the node with the
highest weight / (count + 1/2) among the nodes that still have room for it; a node without room
drops out and the others fill up in proportion. With room everywhere the counts are the
proportional shares rounded to the nearest integer (their sum fixed), and a heavier node never
gets fewer units than a lighter one (ties go to the lower node index).
"""
from __future__ import annotations

import heapq
from typing import Callable, List, Optional, Sequence, Tuple

Range = Tuple[int, int]


def apportion(n_units: int, weights: Sequence[float],
              has_room: Callable[[int, int], bool]) -> Optional[List[int]]:
    """Counts per node, summing to n_units; None when some unit fits on no node.

    weights: one positive float per node. has_room(i, count): can node i take one more unit
    when it already holds `count` of them? (It must stay False once False for a node, as it
    does when each further unit costs at least as much.)
    """
    counts = [0] * len(weights)
    heap = [(-w / 0.5, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    for _ in range(n_units):
        while heap:
            _, i = heapq.heappop(heap)
            if has_room(i, counts[i]):
                counts[i] += 1
                heapq.heappush(heap, (-weights[i] / (counts[i] + 0.5), i))
                break
        else:
            return None
    return counts


def ranges_from_counts(counts: Sequence[int], unit: int, n: int) -> List[Range]:
    """Half-open ranges [start, stop) tiling [0, n), node after node, count * unit wide each;
    the last non-empty range is cut at n (a short last block)."""
    ranges = []
    start = 0
    for count in counts:
        stop = min(start + count * unit, n)
        ranges.append((start, stop))
        start = stop
    if start != n:
        raise ValueError(f"counts {list(counts)} of {unit} cover {start} of {n}")
    return ranges


def kv_range(q_heads: Range, kv_group: int) -> Range:
    """The KV heads [k0, k1) that query heads [h0, h1) read: h // kv_group; (0, 0) for none."""
    h0, h1 = q_heads
    if h1 <= h0:
        return (0, 0)
    return (h0 // kv_group, (h1 - 1) // kv_group + 1)


def max_kv_heads(n_q_heads: int, kv_group: int, n_kv_heads: int) -> int:
    """The most KV heads any n_q_heads consecutive query heads can read, wherever they start."""
    if n_q_heads <= 0:
        return 0
    return min(n_kv_heads, -(-(n_q_heads - 1) // kv_group) + 1)
