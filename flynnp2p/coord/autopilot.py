"""Autopilot for etcd's membership: what the leader changes, as a pure function.

Theory of operation
-------------------
Joining nodes are added as *learners* (they receive the log but do not vote;
etcd 3.4 allows one at a time).  The leader looks at etcd's member list and
at serf's view of the nodes, and changes one thing per round:

1. A member whose node has **left** the gossip ring, has been **failed** for
   ``dead_after_s``, or that was added but never started within
   ``dead_after_s``, is removed.  A voter is removed only while the voters that
   stay, and are alive, are still a majority of the smaller cluster (the same
   rule as Consul's autopilot), and the leader never removes itself.
2. Otherwise, while there are fewer voters than ``voters_wanted``, an alive
   learner is promoted (etcd refuses until it has caught up; the next round
   tries again).

One change per round keeps every step small enough for quorum to hold
through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flynnp2p.coord.client import EtcdMember


@dataclass(frozen=True)
class Change:
    action: str  # "remove" | "promote"
    member_id: int
    name: str
    reason: str


def plan_membership(
    members: Sequence[EtcdMember],
    statuses: Mapping[str, str],
    down_for: Mapping[str, float],
    *,
    self_name: str,
    voters_wanted: int,
    dead_after_s: float,
) -> Change | None:
    """The next membership change, or None.

    ``statuses``: serf status by node name ("alive", "failed", "left", …; a node
    serf no longer lists is absent).  ``down_for``: how long a node (by name,
    or ``url:<peer url>`` for a member that never started) has been failed or
    unstarted, as the caller has watched it."""
    voters = [m for m in members if not m.is_learner]

    def dead(m: EtcdMember) -> str | None:
        if not m.name:
            waited = down_for.get(f"url:{m.peer_urls[0] if m.peer_urls else ''}", 0.0)
            return f"added {waited:.0f}s ago and never started" if waited >= dead_after_s else None
        status = statuses.get(m.name)
        if status in ("left", "leaving"):
            return "its node left the cluster"
        if status is None:
            waited = down_for.get(m.name, 0.0)
            return f"its node has been unknown to the gossip ring for {waited:.0f}s" if waited >= dead_after_s else None
        if status == "failed" and down_for.get(m.name, 0.0) >= dead_after_s:
            return f"its node has been failed for {down_for[m.name]:.0f}s"
        return None

    for m in sorted(members, key=lambda m: (not m.is_learner, m.name, m.id)):
        if m.name == self_name:
            continue
        why = dead(m)
        if why is None:
            continue
        if not m.is_learner:
            staying = [v for v in voters if v.id != m.id]
            alive = [v for v in staying if statuses.get(v.name) == "alive"]
            if 2 * len(alive) <= len(staying):
                continue  # removing it would leave no quorum among the living
        return Change("remove", m.id, m.name, why)

    if len(voters) < voters_wanted:
        for m in sorted((m for m in members if m.is_learner and m.name), key=lambda m: m.name):
            if statuses.get(m.name) == "alive":
                return Change("promote", m.id, m.name, f"{len(voters)} of {voters_wanted} voters")
    return None


def initial_cluster(members: Sequence[EtcdMember], new_id: int, new_name: str) -> str:
    """etcd's ``--initial-cluster`` for a member just added (as ``member add`` prints it)."""
    parts = []
    for m in sorted(members, key=lambda m: m.id):
        name = new_name if m.id == new_id else m.name
        parts += [f"{name}={url}" for url in m.peer_urls]
    return ",".join(parts)


def stale_identities(members: Sequence[EtcdMember], name: str, peer_url: str) -> list[EtcdMember]:
    """Members a node that lost its etcd data must be rid of before it is added again."""
    return [m for m in members if m.name == name or peer_url in m.peer_urls]
