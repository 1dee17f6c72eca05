"""Ranking: spread the jobs of a group over the hosts that may take them.

Theory of operation
-------------------
A host's score for a group is the tuple, smaller first:

    (jobs of this app/type on it, where its slug is (0: built and unpacked there,
     1: stored there, 2: neither), jobs on it overall, -free memory, tie-break)

so a group spreads across hosts before doubling up, then goes where its slug is
already, then fills the least loaded hosts, then the roomiest. The node that
built a slug keeps a copy and unpacks it while the release is made, and one more
node stores it: a job placed on the first starts without fetching or unpacking
it, on the second without fetching it, and that is on the path of every ``git
push`` (a job elsewhere took 0.4-0.8 s longer to start). The slug
comes after the spread: it never puts two jobs of a group on one host while
another feasible host has none. The tie-break is one number per host drawn from
``random.Random(seed)`` in host-name order: equal hosts are taken in an order that
differs between evaluations but is the same when an evaluation is replayed.

Placing a job changes only the chosen host's score (its counts go up, its free
memory down), so `Spread` keeps the candidates of one group in a heap: take the
best, push it back with its new score if it can still fit another job. A group
costs O(hosts) to set up and O(log hosts) per job, instead of a rescan of every
host per job.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Iterable, Mapping

Score = tuple[int, int, int, int, float, str]


def tiebreaks(hosts: Iterable[str], seed: int) -> dict[str, float]:
    """One seeded random number per host, drawn in name order (replayable)."""
    rng = random.Random(seed)
    return {name: rng.random() for name in sorted(hosts)}


def score(
    host: str, group_jobs: int, jobs: int, free_mb: int, tiebreak: float, *,
    has_slug: bool = False, built_here: bool = False,
) -> Score:  # fmt: skip
    """Smaller is better; the name makes every score distinct, so order is total."""
    return (group_jobs, 0 if built_here else 1 if has_slug else 2, jobs, -free_mb, tiebreak, host)


class Spread:
    """Candidate hosts of one group, best first."""

    __slots__ = ("_heap",)

    def __init__(self, scores: Iterable[Score]) -> None:
        self._heap = list(scores)
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def pop_best(self) -> str | None:
        """Remove and return the best host, or None when none is left."""
        return heapq.heappop(self._heap)[-1] if self._heap else None

    def push(self, entry: Score) -> None:
        """Put a host back with its new score (after a placement on it)."""
        heapq.heappush(self._heap, entry)


def rank_hosts(
    hosts: Iterable[str],
    group_jobs: Mapping[str, int],
    jobs: Mapping[str, int],
    free_mb: Mapping[str, int],
    tiebreak: Mapping[str, float],
    has_slug: Collection[str] = (),
    built_on: str | None = None,
) -> list[str]:
    """All of `hosts`, best first (for explaining a choice; the planner uses `Spread`)."""
    return sorted(
        hosts,
        key=lambda h: score(
            h, group_jobs.get(h, 0), jobs.get(h, 0), free_mb[h], tiebreak[h],
            has_slug=h in has_slug, built_here=h == built_on,
        ),
    )  # fmt: skip
