"""Judging a running deployment: complete, failed (and rolled back), or not yet.

Theory of operation
-------------------
A `Deployment` is written, "running", with the formation write that names its new
release (`flynnp2p.api.ops.deployment_changes`). The leader's deploy watcher
(`flynnp2p.scheduler.watcher`) calls `judge` on every running one whenever jobs
change, and on the deployment's deadline; `outcome` turns a verdict into writes.
The rules, in the order they are checked:

1. The formation no longer names the new release (another write moved it, or the
   app is gone): failed, nothing to restore.
2. A job of the new release crashed: its host reports it crashed, or it was
   placed for this deployment and restarted since (the scheduler restarts a
   crashed job at once, so the report alone may be gone before it is seen):
   failed, naming the job (and, for one that could not even start, its host's
   reason: a full disk, an image that cannot be fetched).
3. Every process type of the formation has its count of new jobs up (an omni type:
   at least one, and all of its new jobs up) and no job of another release is
   left that has not been told to stop: complete. (A stopped job still draining
   counts as gone: routers dropped it when it was reported stopping.)
4. Past ``created_at + deploy_timeout_s`` of the app: failed, naming a new job
   that is not up (if one was even placed).

A failed deployment whose formation still names its new release, and which has an
old release that this replica holds, is rolled back: the formation moves to the
old release (`formation_on`) and the status is "rolled-back". The surge rule
(`flynnp2p.scheduler.surge`) then keeps the old jobs that still serve, and
stops the failed release's jobs that are not up. A rolled-back formation gets no
deployment of its own: a failed restore must not bounce back to the release that
failed.

Finished deployments are kept for the record, the newest `KEEP_FINISHED` per
app (`expired` lists the others for the watcher to delete).

Pure: state, deployment and ``now`` in, a verdict or records out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flynnp2p.state.jobs import CRASHED, LIVE, RESTARTED, START, UP, effective_state, how_it_ended
from flynnp2p.state.merge import Change, Delete, State
from flynnp2p.state.records import App, Deployment, Formation, Job, Placement, Release

KEEP_FINISHED = 50  # finished deployments kept per app
DEFAULT_TIMEOUT_S = 120  # `App.deploy_timeout_s`'s default, for an app this replica lacks


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # "complete" | "failed"
    reason: str | None = None
    failed_job_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Seen:
    id: str
    type: str
    state: str
    new: bool
    crashed: bool
    restarts: int
    how: str = "exited by itself"  # a crashed one's end (`how_it_ended`)


def deadline_ms(state: State, dep: Deployment) -> int:
    """When `dep` is failed if it is not complete by then (the app's deploy timeout)."""
    app = state.record(App, dep.app_id)
    timeout_s = DEFAULT_TIMEOUT_S if app is None else app.deploy_timeout_s
    return dep.created_at + timeout_s * 1000


def judge(state: State, dep: Deployment, now: int) -> Verdict | None:
    """The verdict on running deployment `dep` at `now`, or None: keep waiting."""
    formation = state.record(Formation, dep.app_id)
    if formation is None:
        return Verdict("failed", "the app's formation is gone")
    if formation.release_id != dep.new_release_id:
        return Verdict("failed", f"the formation moved to release {formation.release_id}")
    jobs = _jobs_of(state, dep)
    for job in jobs:
        if job.new and job.crashed:
            how = job.how
            again = f" (restarted {job.restarts} time(s))" if job.restarts else ""
            return Verdict("failed", f"job {job.id} ({job.type}) {how}{again}", job.id)
    release = state.record(Release, dep.new_release_id)
    missing: list[str] = []
    for ptype, count in sorted(formation.processes.items()):
        if count == 0:
            continue
        mine = [j for j in jobs if j.new and j.type == ptype and j.state in LIVE]
        up = sum(1 for j in mine if j.state == UP)
        spec = None if release is None else release.processes.get(ptype)
        if spec is not None and spec.omni:
            if up == 0 or up < len(mine):
                missing.append(f"{ptype}: {up}/{len(mine) or 1} up")
        elif up < count:
            missing.append(f"{ptype}: {up}/{count} up")
    old_left = [j for j in jobs if not j.new and j.state in LIVE]
    if not missing and not old_left:
        return Verdict("complete")
    if now < deadline_ms(state, dep):
        return None
    timeout_s = (deadline_ms(state, dep) - dep.created_at) // 1000
    waiting = next((j for j in jobs if j.new and j.state in LIVE and j.state != UP), None)
    what = "; ".join(missing) or f"{len(old_left)} job(s) of the old release still running"
    tail = f"; job {waiting.id} is {waiting.state}" if waiting is not None else ""
    return Verdict(
        "failed",
        f"not healthy within {timeout_s} s ({what}){tail}",
        None if waiting is None else waiting.id,
    )


def outcome(state: State, dep: Deployment, verdict: Verdict, now: int) -> list[Change]:
    """The writes that finish `dep`: the deployment, and for a failure the formation
    moved back to the old release when it still names the new one."""
    finished = dataclasses.replace(
        dep, status=verdict.status, finished_at=now,
        reason=None if verdict.reason is None else verdict.reason[:4096],
        failed_job_id=verdict.failed_job_id,
    )  # fmt: skip
    if verdict.status != "failed" or dep.old_release_id is None:
        return [finished]
    formation = state.record(Formation, dep.app_id)
    old = state.record(Release, dep.old_release_id)
    if formation is None or formation.release_id != dep.new_release_id or old is None:
        return [finished]
    back = formation_on(formation, old, now)
    return [back, dataclasses.replace(finished, status="rolled-back")]


def expired(state: State, keep: int = KEEP_FINISHED) -> list[Change]:
    """Deletes of each app's finished deployments beyond its newest `keep`."""
    by_app: dict[str, list[Deployment]] = {}
    for dep in state.records(Deployment):
        if dep.status != "running":
            by_app.setdefault(dep.app_id, []).append(dep)
    changes: list[Change] = []
    for app_id in sorted(by_app):
        old = sorted(by_app[app_id], key=lambda d: (d.created_at, d.id), reverse=True)[keep:]
        changes.extend(Delete(Deployment.KIND, d.id) for d in old)
    return changes


def formation_on(formation: Formation, release: Release, now: int) -> Formation:
    """`formation` moved to `release`: the counts of the types it lacks are dropped."""
    counts = {t: n for t, n in formation.processes.items() if t in release.processes}
    return dataclasses.replace(formation, release_id=release.id, updated_at=now, processes=counts)


def _how(p: Placement | None, j: Job | None) -> str:
    """How a crashed job's run ended: its host's report, or once a restart has
    replaced that report, what the restart placement kept of it."""
    if j is not None and j.state == CRASHED:
        return how_it_ended(j.exit_code, j.reason)
    if p is not None and p.reason and p.reason.startswith(RESTARTED):
        return p.reason.removeprefix(RESTARTED)
    return "exited by itself"


def _jobs_of(state: State, dep: Deployment) -> list[_Seen]:
    """The app's service jobs as the leader sees them (the merge of report and
    placement), sorted by id."""
    placements = {p.id: p for p in state.records(Placement) if p.app_id == dep.app_id}
    reports = {j.id: j for j in state.records(Job) if j.app_id == dep.app_id}
    seen = []
    for job_id in sorted(placements.keys() | reports.keys()):
        p, j = placements.get(job_id), reports.get(job_id)
        if (p is not None and p.one_off) or (j is not None and j.one_off):
            continue
        job_state = effective_state(p, j)
        if job_state is None:
            continue
        release = p.release_id if p is not None else j.release_id  # type: ignore[union-attr]
        ptype = p.process_type if p is not None else j.process_type  # type: ignore[union-attr]
        placed = p is None or p.action == START  # a job told to stop is no crash
        restarts = max(p.restarts if p is not None else 0, j.restarts if j is not None else 0)
        # restarted: only a job placed for this deployment (an older one may have
        # crashed long before it began)
        lately = p is not None and p.created_at >= dep.created_at and restarts > 0
        crashed = placed and ((j is not None and j.state == CRASHED) or lately)
        seen.append(
            _Seen(
                id=job_id,
                type=ptype,
                state=job_state,
                new=release == dep.new_release_id,
                crashed=crashed,
                restarts=restarts,
                how=_how(p, j),
            )
        )
    return seen
