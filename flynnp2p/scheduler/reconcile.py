"""Reconcile: desired groups against the jobs that exist, per (app, process type).

Theory of operation
-------------------
A job *counts* towards its group while it is starting, up, or crashed (a crashed
service job is restarted in place, so it still holds its slot). Stopping and down
jobs are on their way out and count for nothing. For each group, in sorted order:

1. Counted jobs that can no longer stay are stopped, and so do not count: those on
   a host that is not alive (or unknown), and those on a host that lost a tag the
   formation requires. Jobs of a release the formation no longer names are *old*:
   with the group's strategy `REPLACE` they stop at once; with a surge
   (all-at-once, one-by-one) they give way as `flynnp2p.scheduler.surge` says: an
   old job that is up stops only once a new one is up.
2. Service groups: surplus jobs are stopped, crashed ones first (they run nothing),
   then those not up, then the newest; a shortfall becomes a `Need` for the
   planner (during a one-by-one deploy, at most one new job at a time).
   Omni groups: the target is one job on every alive host with the tags; extra jobs
   on a host are stopped (keeping the one that is up, then the oldest), and every
   target host without one becomes part of the `Need`. Joins and failures follow
   from the host list alone.
3. Crashed jobs that stay are restarted in place after a backoff of 0 s, 10 s, 30 s
   (by restart count; the count starts over once a run stayed up 5 minutes). The
   result says *when* (`Restart.at_ms`); nothing here waits.

One-off jobs are never restarted or replaced: a live one on a dead host is stopped
and that is all. A one-off request is placed if no job has its id yet. A group
whose `Desired.hold` is set is left alone entirely. Jobs of a group the formation
does not have (app or type gone) are stopped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from flynnp2p.scheduler.feasible import Eligible, check_host, eligible
from flynnp2p.scheduler.model import Desired, Host, Inputs, JobInfo, OneOff
from flynnp2p.scheduler.surge import REPLACE, keep_first, surge
from flynnp2p.state.jobs import LIVE, host_gone_reason

BACKOFF_MS = (0, 10_000, 30_000)  # by restarts so far; the last value repeats
RESET_AFTER_UP_MS = 5 * 60_000


@dataclass(frozen=True, slots=True)
class Stop:
    job_id: str
    app: str
    release: str
    type: str
    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class Restart:
    """Restart crashed job `job_id` on `host` at `at_ms`; its restart count becomes `restarts`."""

    job_id: str
    app: str
    release: str
    type: str
    host: str
    at_ms: int
    restarts: int


@dataclass(frozen=True, slots=True)
class Need:
    """Jobs the planner must place for one group."""

    desired: Desired
    count: int
    eligible: Eligible  # hosts that are alive and have the tags
    kept: Mapping[str, int]  # this group's remaining jobs per host (for spreading)
    hosts: tuple[str, ...] = ()  # omni: the hosts that each need one


@dataclass(frozen=True, slots=True)
class Reconciled:
    stops: tuple[Stop, ...]
    restarts: tuple[Restart, ...]
    needs: tuple[Need, ...]  # omni groups first, then by (app, type)
    held: tuple[Desired, ...]
    one_offs: tuple[OneOff, ...]  # requests with no job yet, by id


def backoff_ms(restarts: int) -> int:
    return BACKOFF_MS[min(restarts, len(BACKOFF_MS) - 1)]


def restart_of(job: JobInfo, now_ms: int) -> Restart:
    """When to restart a crashed job, and its restart count after that."""
    exited = now_ms if job.exited_at is None else job.exited_at
    count = job.restarts
    if job.up_since is not None and exited - job.up_since >= RESET_AFTER_UP_MS:
        count = 0
    at = exited + backoff_ms(count)
    return Restart(job.id, job.app, job.release, job.type, job.host, at, count + 1)


def reconcile(inputs: Inputs, now_ms: int) -> Reconciled:
    hosts = {h.name: h for h in sorted(inputs.hosts, key=lambda h: h.name)}
    host_list = list(hosts.values())
    desired: dict[tuple[str, str], Desired] = {}
    for want in inputs.desired:
        if want.group in desired:
            raise ValueError(f"two desired entries for app {want.app} type {want.type}")
        desired[want.group] = want
    counted: dict[tuple[str, str], list[JobInfo]] = {}
    stops: list[Stop] = []
    for job in sorted(inputs.jobs, key=lambda j: j.id):
        if job.state not in LIVE:
            continue
        if job.one_off:
            if job.state != "crashed" and not _alive(hosts, job.host):
                stops.append(_stop(job, host_gone_reason(job.host)))
            continue
        counted.setdefault(job.group, []).append(job)

    cache: dict[Mapping[str, str], Eligible] = {}
    restarts: list[Restart] = []
    needs: list[Need] = []
    held: list[Desired] = []
    for group in sorted(desired.keys() | counted.keys()):
        d, jobs = desired.get(group), counted.get(group, [])
        if d is not None and d.hold is not None:
            held.append(d)
            continue
        if d is None:
            reason = f"process type {group[1]} is not in app {group[0]}'s formation"
            stops.extend(_stop(j, reason) for j in jobs)
            continue
        el = cache.get(d.constraints)
        if el is None:
            el = cache[d.constraints] = eligible(host_list, d.constraints)
        keep, old = _drop_misplaced(d, jobs, hosts, stops)
        if d.omni or d.strategy == REPLACE:
            stops.extend(_stop(j, f"release {j.release} replaced by {d.release}") for j in old)
            old = []
        if old:
            moved = surge(d.release, d.count, d.strategy, keep, old)
            stops.extend(_stop(j, why) for j, why in moved.stops)
            keep = list(moved.keep)
            if moved.start:
                needs.append(Need(d, moved.start, el, Counter(j.host for j in keep)))
        elif d.omni:
            keep = _omni_extras(d, keep, stops)
            kept = Counter(j.host for j in keep)
            missing = () if d.count == 0 else tuple(h for h in el.hosts if h not in kept)
            if missing or (d.count > 0 and not el.hosts):
                needs.append(Need(d, len(missing), el, kept, missing))
        else:
            surplus = len(keep) - d.count
            if surplus > 0:
                # crashed first (they run nothing), then those not up, then the newest
                order = sorted(keep, key=keep_first)
                stops.extend(_stop(j, f"scaled down to {d.count}") for j in order[-surplus:])
                keep = order[:-surplus]
            elif surplus < 0:
                needs.append(Need(d, -surplus, el, Counter(j.host for j in keep)))
        restarts.extend(restart_of(j, now_ms) for j in keep if j.state == "crashed")

    have = {j.id for j in inputs.jobs}
    one_offs = tuple(sorted((o for o in inputs.one_offs if o.id not in have), key=lambda o: o.id))
    needs.sort(key=lambda n: (not n.desired.omni, n.desired.group))
    return Reconciled(tuple(stops), tuple(restarts), tuple(needs), tuple(held), one_offs)


def _alive(hosts: Mapping[str, Host], name: str) -> bool:
    host = hosts.get(name)
    return host is not None and host.alive


def _stop(job: JobInfo, reason: str) -> Stop:
    return Stop(job.id, job.app, job.release, job.type, job.host, reason)


def _drop_misplaced(
    d: Desired, jobs: list[JobInfo], hosts: Mapping[str, Host], stops: list[Stop]
) -> tuple[list[JobInfo], list[JobInfo]]:
    """Stop the jobs that cannot stay (dead host, lost tag); return the rest: those
    of the desired release, and those of an old one."""
    keep, old = [], []
    for job in jobs:
        host = hosts.get(job.host)
        why = None if host is None else check_host(host, d.constraints)
        if host is None or not host.alive:
            stops.append(_stop(job, host_gone_reason(job.host)))
        elif job.release != d.release and why is None:
            old.append(job)
        elif job.release != d.release:
            stops.append(_stop(job, f"release {job.release} replaced by {d.release}"))
        elif why is not None:
            stops.append(_stop(job, str(why)))
        else:
            keep.append(job)
    return keep, old


def _omni_extras(d: Desired, jobs: list[JobInfo], stops: list[Stop]) -> list[JobInfo]:
    """Keep one job per host (none when scaled to 0): the up one, then the oldest."""
    if d.count == 0:
        stops.extend(_stop(j, "scaled down to 0") for j in jobs)
        return []
    best: dict[str, JobInfo] = {}
    for job in sorted(jobs, key=lambda j: (j.state != "up", j.created_at, j.id)):
        if job.host in best:
            stops.append(_stop(job, f"omni: host {job.host} already has {best[job.host].id}"))
        else:
            best[job.host] = job
    return [best[h] for h in sorted(best)]
