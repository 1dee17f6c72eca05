"""What the gossip ring says about leadership: hints and epochs, never decisions.

The leader is decided by etcd (`flynnp2p.coord.election`); serf tags only
spread two facts fast and cheaply to every node, including nodes without an
etcd member:

* ``ld`` — set by the leader to its epoch while it leads, removed when it stops.
  Nodes that cannot read etcd themselves forward to the alive member with the
  highest ``ld`` (a hint: the node it names refuses if it no longer leads).
* ``ep`` — the highest epoch a member has seen; every node republishes the
  maximum, and hosts refuse placements from an older epoch (fencing).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class TagView:
    """One member's leadership tags."""

    name: str
    status: str
    epoch: int  # ``ep``
    leading: int  # ``ld`` (0: not leading)


def parse_tags(name: str, status: str, tags: dict[str, str]) -> TagView:
    """Read a member's leadership tags; malformed tags count as 0."""
    return TagView(name, status, _int(tags.get("ep")), _int(tags.get("ld")))


def _int(value: str | None) -> int:
    try:
        return max(0, int(value)) if value is not None else 0
    except ValueError:
        return 0


def max_epoch(members: Iterable[TagView]) -> int:
    """The highest epoch any member (alive or failed) has published."""
    return max((max(m.epoch, m.leading) for m in members), default=0)


def leader_hint(members: Iterable[TagView]) -> TagView | None:
    """The alive member announcing the newest term, or None."""
    leading = [m for m in members if m.status == "alive" and m.leading > 0]
    return max(leading, key=lambda m: (m.leading, m.name), default=None)
