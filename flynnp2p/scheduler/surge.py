"""Deploys without a gap: how a group moves from an old release to the new one.

Theory of operation
-------------------
A formation write that names a new release is a deploy. For a service group
(app, type) whose strategy is a *surge* (`ALL_AT_ONCE` or `ONE_BY_ONE`), the
counted jobs split into *new* (of the formation's release) and *old* (any other
release). One rule keeps traffic flowing:

    an old job that is up is stopped only once a new job is up to take its place.

`surge` applies it to one group. With ``N`` the target count:

1. new jobs beyond ``N`` are stopped (crashed first, then those not up, then the
   newest), as a scale down would;
2. old jobs that are not up (starting, crashed) serve nothing and stop at once;
3. of the old jobs that are up, ``min(up_old, N - up_new)`` stay (the oldest);
   the rest stop;
4. new jobs are started: all that are missing for ``ALL_AT_ONCE``; for
   ``ONE_BY_ONE``, while old jobs still serve, one at a time (none while a new
   job is not up yet: starting, or crashed and waiting for its restart).

So ``up(new) + up(old)`` never falls below ``min(N, what was up before)``
because of a stop this plan makes, each plan only asks what the next one will
not undo (a second plan on the first one's result is empty), and once the new
jobs come up the group holds exactly ``N`` new jobs. The surge costs memory: a
host must hold an old job while its replacement starts (the planner counts
neither as free), and a new job that cannot be placed leaves the old ones
serving until the deploy watcher gives up (`flynnp2p.scheduler.watcher`).

`REPLACE` is the rule without a surge: every old job stops at once. Omni groups
deploy that way (their jobs are one per host, not a count to keep), and so does a
group whose app record this replica does not hold.

Which surge an app gets is `effective_strategy`, the one home of "auto".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the model imports the strategies from here)
    from flynnp2p.scheduler.model import JobInfo

ALL_AT_ONCE = "all-at-once"
ONE_BY_ONE = "one-by-one"
REPLACE = "replace"
STRATEGIES = (REPLACE, ALL_AT_ONCE, ONE_BY_ONE)
AUTO = "auto"
AUTO_ONE_BY_ONE_FROM = 2  # web jobs from which "auto" deploys one by one


def effective_strategy(app_strategy: str, processes: Mapping[str, int]) -> str:
    """The surge an app's deploy uses: its own setting, or for "auto" one-by-one
    once its formation runs 2 or more web jobs, else all-at-once."""
    if app_strategy != AUTO:
        return app_strategy
    return ONE_BY_ONE if processes.get("web", 0) >= AUTO_ONE_BY_ONE_FROM else ALL_AT_ONCE


def keep_first(j: JobInfo) -> tuple[bool, bool, int, str]:
    """The order in which a group's jobs are kept (a scale down stops the tail):
    up before not up before crashed, then the oldest."""
    return (j.state == "crashed", j.state != "up", j.created_at, j.id)


@dataclass(frozen=True, slots=True)
class Surge:
    """What one plan does to a group that is being deployed."""

    keep: tuple[JobInfo, ...]  # new jobs that stay (restarted in place when crashed)
    stops: tuple[tuple[JobInfo, str], ...]  # (job, reason)
    start: int  # new jobs to place now


def surge(
    release: str, count: int, strategy: str, new: Sequence[JobInfo], old: Sequence[JobInfo]
) -> Surge:
    """Apply the surge rule (see the module docstring) to one group's jobs."""
    stops: list[tuple[JobInfo, str]] = []
    order = sorted(new, key=keep_first)
    keep = order[:count]
    stops.extend((j, f"scaled down to {count}") for j in order[count:])
    up_new = sum(1 for j in keep if j.state == "up")
    old_up = sorted((j for j in old if j.state == "up"), key=lambda j: (j.created_at, j.id))
    stops.extend((j, f"release {j.release} replaced by {release}") for j in old if j.state != "up")
    stay = min(len(old_up), max(0, count - up_new))
    stops.extend(
        (j, f"release {j.release} replaced by {release} (a new job is up)") for j in old_up[stay:]
    )
    start = max(0, count - len(keep))
    if strategy == ONE_BY_ONE and stay > 0:
        not_up = len(keep) - up_new
        start = min(start, max(0, 1 - not_up))
    stops.sort(key=lambda s: s[0].id)
    return Surge(tuple(keep), tuple(stops), start)
