"""Leader election on top of gossip membership: a pure function of one node's view.

Theory of operation
-------------------
Serf has no consensus, so the leader is *derived*: every node looks at the
members it sees and computes the same answer when views agree.

* The electorate is every known member that has not left (``alive`` and
  ``failed``; ``left``/``leaving`` members dropped out of the cluster on purpose).
* A node has quorum when strictly more than half of the electorate is alive in
  its view.  A node without quorum names no leader and never schedules: in a
  partition only the majority side can have a leader.
* The leader is the alive member with the ``scheduler`` role and the smallest
  (start time, name).
* Epochs fence leaders.  Every node publishes, in its ``ep`` tag, the highest
  epoch it has seen; a node that becomes leader takes ``max(all ep tags) + 1``.
  Because every alive node republishes the old leader's epoch, a new leader's
  epoch is strictly higher than any epoch a majority has seen.  Two nodes that
  briefly both believe they lead may pick the same number; receivers order
  leaders by (epoch, name), and such overlaps are short by construction
  (both views converge within one gossip round).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flynnp2p.gossip.tags import roles

ROLE_SCHEDULER = "scheduler"
ELECTORATE_STATUSES = frozenset({"alive", "failed"})


@dataclass(frozen=True)
class Candidate:
    name: str
    status: str
    roles: frozenset[str]
    start_ms: int
    epoch: int


@dataclass(frozen=True)
class Election:
    leader: str | None
    quorum: bool
    alive: int
    electorate: int
    max_epoch: int
    leader_epoch: int
    reason: str


def parse_candidate(name: str, status: str, tags: dict[str, str]) -> Candidate:
    """Read a member's election-relevant tags; malformed tags count as 0/none."""
    member_roles = roles(tags)
    return Candidate(
        name=name,
        status=status,
        roles=member_roles,
        start_ms=_int(tags.get("st")),
        epoch=_int(tags.get("ep")),
    )


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def elect(members: Iterable[Candidate]) -> Election:
    """The leader as seen from one node's membership view."""
    electorate = [m for m in members if m.status in ELECTORATE_STATUSES]
    alive = [m for m in electorate if m.status == "alive"]
    max_epoch = max((m.epoch for m in electorate), default=0)
    quorum = 2 * len(alive) > len(electorate)
    if not quorum:
        return Election(
            None,
            False,
            len(alive),
            len(electorate),
            max_epoch,
            0,
            f"no quorum: {len(alive)} of {len(electorate)} known members alive",
        )
    eligible = sorted(
        (m for m in alive if ROLE_SCHEDULER in m.roles), key=lambda m: (m.start_ms, m.name)
    )
    if not eligible:
        return Election(
            None,
            True,
            len(alive),
            len(electorate),
            max_epoch,
            0,
            "no alive member has the scheduler role",
        )
    leader = eligible[0]
    return Election(
        leader.name,
        True,
        len(alive),
        len(electorate),
        max_epoch,
        leader.epoch,
        f"{leader.name} is the oldest alive scheduler",
    )
