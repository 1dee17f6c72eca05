"""Plan: turn reconciled needs into placements, without ever overcommitting a host.

Theory of operation
-------------------
``plan(inputs, now_ms, seed)`` runs the stages in order: `reconcile` (what to stop,
restart and place), then, for every group that needs jobs (omni groups first:
their jobs cannot go anywhere else), feasibility and rank over the eligible hosts,
then one-off requests. Per-host counters (free memory, jobs overall) are computed
once and updated by each placement, so a later placement in the same plan sees the
memory an earlier one took: free memory never goes below zero because of a
placement. Memory held by jobs this plan stops is *not* counted as free: hosts may
start the new jobs before the old ones are down, and a host must hold both.

Every job that cannot be placed is reported in `Plan.blocked` with the reasons of
every filter that dropped a host (see `feasible.explain`); a held group is reported
with its hold reason.

Determinism: inputs are sorted on the way in, ranking ties are broken by numbers
drawn from ``random.Random(seed)``, and new job ids are a hash of
``(seed, app, type, index)`` (skipping any id already in use), so equal inputs and
seed give an equal plan, and the leader can log ``seed`` to replay an evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flynnp2p.scheduler.feasible import Eligible, Filtered, check_memory, eligible, explain
from flynnp2p.scheduler.model import Desired, Inputs, OneOff
from flynnp2p.scheduler.rank import Score, Spread, score, tiebreaks
from flynnp2p.scheduler.reconcile import Need, Reconciled, Restart, Stop, reconcile


@dataclass(frozen=True, slots=True)
class Start:
    """Start a new job `job_id` on `host` (what a start `Placement` carries)."""

    job_id: str
    app: str
    release: str
    type: str
    host: str
    memory_mb: int
    one_off: bool = False


@dataclass(frozen=True, slots=True)
class Blocked:
    """`count` jobs of app/type (or one-off `job_id`) could not be placed, and why."""

    app: str
    type: str
    count: int  # for an omni type that fits no host at all: 0 (it runs nowhere)
    reasons: tuple[str, ...]
    job_id: str | None = None

    def __str__(self) -> str:
        what = self.job_id or f"{self.count} x {self.type}"
        return f"blocked: app {self.app}: {what}: {'; '.join(self.reasons[:2])}"


@dataclass(frozen=True, slots=True)
class Plan:
    starts: tuple[Start, ...] = ()
    stops: tuple[Stop, ...] = ()
    restarts_at: tuple[Restart, ...] = ()
    blocked: tuple[Blocked, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to do (blocked groups may remain: they wait for the cluster to change)."""
        return not (self.starts or self.stops or self.restarts_at)

    def restarts_due(self, now_ms: int) -> tuple[Restart, ...]:
        return tuple(r for r in self.restarts_at if r.at_ms <= now_ms)

    def next_restart_ms(self, now_ms: int) -> int | None:
        """When the next restart not yet due falls: the leader's next wake-up."""
        return min((r.at_ms for r in self.restarts_at if r.at_ms > now_ms), default=None)


def new_job_id(seed: int, app: str, ptype: str, index: int) -> str:
    digest = hashlib.blake2b(f"{seed}/{app}/{ptype}/{index}".encode(), digest_size=10)
    return f"{ptype}-{digest.hexdigest()}"


def plan(inputs: Inputs, now_ms: int, seed: int) -> Plan:
    rec = reconcile(inputs, now_ms)
    placer = _Placer(inputs, rec, seed)
    for need in rec.needs:
        if need.desired.omni:
            placer.place_omni(need)
        else:
            placer.place_service(need)
    for request in rec.one_offs:
        placer.place_one_off(request)
    blocked = placer.blocked + [
        Blocked(d.app, d.type, d.count, (d.hold,)) for d in rec.held if d.hold and d.count
    ]
    blocked.sort(key=lambda b: (b.app, b.type, b.job_id or ""))
    return Plan(tuple(placer.starts), rec.stops, rec.restarts, tuple(blocked))


class _Placer:
    """The mutable counters of one `plan` call (never outlives it)."""

    def __init__(self, inputs: Inputs, rec: Reconciled, seed: int) -> None:
        self.hosts = sorted(inputs.hosts, key=lambda h: h.name)
        self.free = {h.name: h.memory_mb for h in self.hosts}
        self.load = dict.fromkeys(self.free, 0)
        stopped = {s.job_id for s in rec.stops}
        for job in inputs.jobs:
            if job.host in self.free and job.holds_memory:
                self.free[job.host] -= job.memory_mb
                if job.state != "stopping" and job.id not in stopped:
                    self.load[job.host] += 1
        self.tiebreak = tiebreaks(self.free, seed)
        self.taken = {j.id for j in inputs.jobs} | {o.id for o in inputs.one_offs}
        self.seed = seed
        self.next_index: dict[tuple[str, str], int] = {}
        self.eligible: dict[Mapping[str, str], Eligible] = {}
        self.starts: list[Start] = []
        self.blocked: list[Blocked] = []

    def _start(self, d: Desired, host: str) -> None:
        index = self.next_index.get(d.group, 0)
        job_id = new_job_id(self.seed, d.app, d.type, index)
        while job_id in self.taken:  # a reused seed must not reuse an id
            index += 1
            job_id = new_job_id(self.seed, d.app, d.type, index)
        self.next_index[d.group] = index + 1
        self.taken.add(job_id)
        self.starts.append(Start(job_id, d.app, d.release, d.type, host, d.memory_mb))
        self.free[host] -= d.memory_mb
        self.load[host] += 1

    def place_service(self, need: Need) -> None:
        d, mem = need.desired, need.desired.memory_mb
        free, load, tb = self.free, self.load, self.tiebreak
        group = dict(need.kept)
        warm, built = d.slug_hosts, d.slug_built_on

        def scored(h: str, in_group: int) -> Score:
            return score(
                h, in_group, load[h], free[h], tb[h], has_slug=h in warm, built_here=h == built
            )

        spread = Spread(scored(h, group.get(h, 0)) for h in need.eligible.hosts if free[h] >= mem)
        placed = 0
        while placed < need.count:
            host = spread.pop_best()
            if host is None:
                break
            self._start(d, host)
            placed += 1
            group[host] = group.get(host, 0) + 1
            if free[host] >= mem:
                spread.push(scored(host, group[host]))
        if placed < need.count:  # the heap ran dry: every eligible host is short of memory
            self._block(d, need.count - placed, need.eligible, need.eligible.hosts)

    def place_omni(self, need: Need) -> None:
        d = need.desired
        short = [h for h in need.hosts if self.free[h] < d.memory_mb]
        for host in need.hosts:
            if self.free[host] >= d.memory_mb:
                self._start(d, host)
        if not need.eligible.hosts:  # it runs nowhere: say which filter left no host
            self._block(d, 0, need.eligible, ())
        elif short:  # only the target hosts matter: the others are not meant to run it
            n = len(short)
            headline = f"{n} host{'s' if n != 1 else ''} without {d.memory_mb} MB free"
            filtered = self._short(Eligible((), ()), short, d.memory_mb)
            reasons = explain(d.constraints, d.memory_mb, filtered, headline)
            self.blocked.append(Blocked(d.app, d.type, n, reasons))

    def place_one_off(self, request: OneOff) -> None:
        d = Desired(
            request.app,
            request.release,
            request.type,
            1,
            request.memory_mb,
            constraints=request.constraints,
        )
        el = self.eligible.get(d.constraints)
        if el is None:
            el = self.eligible[d.constraints] = eligible(self.hosts, d.constraints)
        fits = [h for h in el.hosts if self.free[h] >= d.memory_mb]
        if not fits:
            reasons = explain(d.constraints, d.memory_mb, self._short(el, el.hosts, d.memory_mb))
            self.blocked.append(Blocked(d.app, d.type, 1, reasons, request.id))
            return
        host = min(fits, key=lambda h: score(h, 0, self.load[h], self.free[h], self.tiebreak[h]))
        self.starts.append(Start(request.id, d.app, d.release, d.type, host, d.memory_mb, True))
        self.taken.add(request.id)
        self.free[host] -= d.memory_mb
        self.load[host] += 1

    def _short(self, el: Eligible, hosts: Sequence[str], mem: int) -> list[Filtered]:
        filtered = list(el.filtered)
        for h in hosts:
            why = check_memory(h, self.free[h], mem)
            if why is not None:
                filtered.append(why)
        return filtered

    def _block(self, d: Desired, count: int, el: Eligible, hosts: Sequence[str]) -> None:
        reasons = explain(d.constraints, d.memory_mb, self._short(el, hosts, d.memory_mb))
        self.blocked.append(Blocked(d.app, d.type, count, reasons))
