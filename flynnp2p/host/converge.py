"""The host's converge step: what this node should do about what the leader placed on it.

Theory of operation
-------------------
`converge` compares what the leader placed on this node (a `HostView`: its
placements, the ones deleted, the job reports, the newest epoch seen) with what
runs here (`Local`) and returns the actions that close the gap; the runner
(`flynnp2p.host.runner`) carries them out and owns every effect. It is called on
every change and once a second, so it asks for nothing already under way: no
action for a job with a bookkeeping task in flight (`Local.busy`) or a run that
is already stopping, and at most one per job.

For each placement naming this node, in job id order:

* **stop**: `Stop` the local run (or the job re-adopted from a previous agent
  run); with nothing here, `Report` the record down unless it is finished (a job
  lost with a previous agent run).
* **start**, with a run of an older generation: `Restart` it (stop it; the next
  step starts the new generation once it has ended).
* **start**, nothing running here:
  - never reported, and placed at an epoch older than the newest seen (in the
    membership or any placement): a deposed leader placed it. **Fenced**: `Report`
    it down with the reason, never started; the current leader replaces it.
  - reported at a newer generation, or this generation exited (down or crashed):
    nothing; the leader decides what happens next.
  - else `Start`: never run, a restart ordered (a newer generation), or the
    record says it should be running and nothing runs it (this agent restarted).

Then, only a *deleted* placement (a tombstone) ends a run or a record: a replica
reset and refilling from its peers lacks placements that were never deleted, and
stops nothing. A run whose placement was deleted is `Stop`ped; a record of this
node whose placement was deleted and that nothing runs is `Forget`-ten. A job
re-adopted from a previous agent run that no start placement claims is stopped
(`recover` hands those over once, at boot).

**Leaving** (`Local.leaving`: the agent got SIGTERM/SIGINT): every run and
re-adopted job not stopping already is `Stop`ped for that reason, and nothing
else happens (no start, no report): a node that leaves starts nothing.

**Draining**: every `Stop` and `Restart` says whether the job drains first
(`flynnp2p.state.jobs.drains`: its report says up and routers may be sending it
requests); the runner then reports it ``stopping``, waits the deregistration
delay, and only then stops it. The decision is taken once, with the stop: a run
already stopping is never asked again, so a second stop (its placement deleted
during the drain, the agent leaving) neither restarts nor skips the delay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flynnp2p.state.jobs import (
    DOWN,
    EXITED,
    START,
    STOP,
    STOPPING,
    drains,
    fenced_reason,
    is_finished,
)
from flynnp2p.state.merge import State
from flynnp2p.state.records import Job, Placement
from flynnp2p.state.schema import EMPTY

STOPPED_BY_SCHEDULER = "stopped by the scheduler"  # a stop placement without a reason
PLACEMENT_REMOVED = "its placement was removed"
NOT_PLACED = "not placed here any more"
RESTARTING = "restarting"


@dataclass(frozen=True, slots=True)
class Start:
    """Run `placement` (taking over the re-adopted job if there is one)."""

    placement: Placement


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop what runs here of `job_id` (a run, or a re-adopted job) and report why;
    with `drain`, report it stopping and wait the deregistration delay first."""

    job_id: str
    reason: str
    drain: bool = False


@dataclass(frozen=True, slots=True)
class Restart:
    """Stop the run of an older generation (draining it first, as `Stop`); its end
    lets the next step start `generation`."""

    job_id: str
    generation: int
    drain: bool = False


@dataclass(frozen=True, slots=True)
class Report:
    """Write `job`, this node's report, as it is (nothing to run or stop)."""

    job: Job


@dataclass(frozen=True, slots=True)
class Forget:
    """Delete this node's report of `job_id`: its placement was deleted, nothing runs it."""

    job_id: str


Action = Start | Stop | Restart | Report | Forget


@dataclass(frozen=True, slots=True)
class HostView:
    """What the replicated state says about this node (see `view_of`)."""

    node: str
    placements: tuple[Placement, ...] = ()  # naming this node
    reports: Mapping[str, Job] = EMPTY  # by job id: this node's, and those of its placements
    removed: frozenset[str] = frozenset()  # job ids whose placement is deleted (a tombstone)
    newest_epoch: int = 0


@dataclass(frozen=True, slots=True)
class LocalRun:
    generation: int  # of the placement it runs
    stopping: bool = False  # asked to stop already


@dataclass(frozen=True, slots=True)
class Local:
    """What runs on this node now, as the runner knows it."""

    runs: Mapping[str, LocalRun] = field(default_factory=dict)
    adopted: frozenset[str] = frozenset()  # found running at boot, not taken over by a run yet
    busy: frozenset[str] = frozenset()  # a report, forget or adopted stop in flight
    leaving: str | None = None  # the agent leaves the cluster, for this reason: stop everything


def newest_epoch(floor: int, placements: Iterable[Placement]) -> int:
    """The newest leader epoch seen: `floor` (membership, election) or in any placement."""
    return max([floor, *(p.epoch for p in placements)])


def view_of(state: State, node: str, epoch_floor: int) -> HostView:
    placements = state.records(Placement)
    mine = tuple(p for p in placements if p.host == node)
    ids = {p.id for p in mine}
    reports = {j.id: j for j in state.records(Job) if j.host == node or j.id in ids}
    table = state.tables.get(Placement.KIND, EMPTY)
    removed = frozenset(key for key, entry in table.items() if entry.value is None)
    return HostView(node, mine, reports, removed, newest_epoch(epoch_floor, placements))


def converge(view: HostView, local: Local, now_ms: int) -> list[Action]:
    """The actions that bring this node to what `view` asks of it (see the module doc)."""
    actions: list[Action] = []
    claimed = set(local.busy)  # jobs with bookkeeping under way, or asked for in this step

    def bookkeeping(job_id: str, action: Action) -> None:
        if job_id not in claimed:
            claimed.add(job_id)
            actions.append(action)

    if local.leaving is not None:
        for job_id in sorted(local.runs):
            if not local.runs[job_id].stopping:
                actions.append(Stop(job_id, local.leaving, drains(view.reports.get(job_id))))
        for job_id in sorted(local.adopted - local.runs.keys()):
            bookkeeping(job_id, Stop(job_id, local.leaving, drains(view.reports.get(job_id))))
        return actions
    started: set[str] = set()
    placed = {p.id for p in view.placements}
    for p in sorted(view.placements, key=lambda p: p.id):
        run, job = local.runs.get(p.id), view.reports.get(p.id)
        if p.action == STOP:
            reason = p.reason or STOPPED_BY_SCHEDULER
            if run is not None:
                if not run.stopping:
                    actions.append(Stop(p.id, reason, drains(job)))
            elif p.id in local.adopted:
                bookkeeping(p.id, Stop(p.id, reason, drains(job)))
            elif job is not None and not is_finished(job.state, job.one_off):
                record = dataclasses.replace(job, state=DOWN, reason=reason, updated_at=now_ms)
                bookkeeping(p.id, Report(record))
            continue
        assert p.action == START
        if run is not None:
            if p.generation > run.generation and not run.stopping:
                actions.append(Restart(p.id, p.generation, drains(job)))
            continue
        if job is None:
            if p.epoch < view.newest_epoch and p.id not in local.adopted:
                reason = fenced_reason(p.epoch, view.newest_epoch)
                bookkeeping(p.id, Report(job_report(p, view.node, DOWN, now_ms, None, reason=reason)))
                continue
        elif p.generation < job.generation or (p.generation == job.generation and job.state in EXITED):
            continue
        if p.id not in claimed:
            bookkeeping(p.id, Start(p))
            started.add(p.id)
    for job_id in sorted(local.runs.keys() - placed):
        if job_id in view.removed and not local.runs[job_id].stopping:
            actions.append(Stop(job_id, PLACEMENT_REMOVED, drains(view.reports.get(job_id))))
    for job_id in sorted(local.adopted - local.runs.keys() - started):
        bookkeeping(job_id, Stop(job_id, NOT_PLACED, drains(view.reports.get(job_id))))
    for job_id in sorted(view.removed & view.reports.keys() - placed - local.runs.keys()):
        if view.reports[job_id].host == view.node:  # (the only writer of its records)
            bookkeeping(job_id, Forget(job_id))
    return actions


def job_report(
    p: Placement,
    node: str,
    state: str,
    now_ms: int,
    previous: Job | None,
    address: str | None = None,
    exit_code: int | None = None,
    up_since: int | None = None,
    reason: str | None = None,
) -> Job:
    """This node's report of the run of `p` (`previous`: the record it replaces).

    A run that ends keeps the time it became up (the leader's backoff goes by it),
    unless that was another generation's."""
    if up_since is None and state in (STOPPING, *EXITED) and previous is not None:
        up_since = previous.up_since if previous.generation == p.generation else None
    return Job(
        id=p.id,
        app_id=p.app_id,
        release_id=p.release_id,
        process_type=p.process_type,
        host=node,
        state=state,
        created_at=p.created_at,
        updated_at=now_ms,
        address=address,
        exit_code=None if exit_code is None else max(-255, min(255, exit_code)),
        restarts=p.restarts,
        one_off=p.one_off,
        generation=p.generation,
        up_since=up_since,
        reason=reason[:4096] if reason else None,
    )
