"""The leader's scheduling loop: evaluate, commit placements, sleep until something changes.

Theory of operation
-------------------
`Scheduler.duty(epoch)` is a leader duty (see `flynnp2p.leader`): it runs for one
term and is cancelled on demotion, in the loop every state-driven duty shares
(`flynnp2p.scheduler.duty`). It first waits until the new leader has caught up
with its peers (a leader planning from a stale replica would stop jobs of apps
it has not heard of yet), then loops:

1. **Evaluate**: build `Inputs` from this replica and the membership
   (`inputs_from_state`), run the pure `plan`, and turn the plan into writes, all
   carrying this term's ``epoch``: a start `Placement` per new job, the placement
   rewritten with action "stop" and the reason per stop, ``generation + 1`` per
   restart that is due, and the `Blocked` records (written only when they change,
   deleted once the jobs are placed). Finished records are collected here too:
   stop placements whose job is down, and finished one-offs, after ``retain_ms``.
   The writes are fenced: made only while this node still holds the leader key
   of the term; a scheduler told its term is over stops.
2. **Sleep** until the state changes (formations, releases, jobs, placements,
   run requests), the membership changes, the next restart falls due, or
   ``period_s`` passes; then wait ``debounce_s`` so a burst of changes (a scale
   of 10 acknowledged one by one) makes one evaluation.

The evaluation is idempotent: its own writes wake the loop once more, and the
second plan is empty (a property the core's tests check). A write the cluster
cannot acknowledge (no peer answered) is committed locally and spreads later; the
loop logs it and goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from flynnp2p.errors import FlynnError
from flynnp2p.gossip.tags import roles, user_tags
from flynnp2p.leader import Fence, unfenced
from flynnp2p.scheduler.duty import Term, duty_loop
from flynnp2p.scheduler.model import Host, inputs_from_state
from flynnp2p.scheduler.plan import Blocked as PlanBlocked
from flynnp2p.scheduler.plan import Plan, Start, plan
from flynnp2p.scheduler.reconcile import Restart, Stop
from flynnp2p.state.errors import RecordError
from flynnp2p.state.jobs import DOWN, STOP, effective_state, is_finished, restart_reason
from flynnp2p.state.merge import Change, Delete, State
from flynnp2p.state.records import Blocked, Formation, Job, Placement, Release, RunRequest
from flynnp2p.state.replica import WriteOutcome
from flynnp2p.state.service import StateService
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

WATCHED_KINDS = (Formation.KIND, Release.KIND, Job.KIND, Placement.KIND, RunRequest.KIND)
RETAIN_MS = 10 * 60_000  # how long stopped jobs and finished one-offs stay listed

Write = Callable[[Sequence[Change]], Awaitable[WriteOutcome]]


class Scheduler:
    def __init__(
        self,
        state: StateService,
        hosts: Callable[[], Sequence[Host]],
        membership: Watched[Any],
        now_ms: Callable[[], int],
        ready: Callable[[int], bool],
        *,
        period_s: float = 5.0,
        debounce_s: float = 0.02,
        retain_ms: int = RETAIN_MS,
        rng: random.Random | None = None,
        fence: Fence = unfenced,
    ) -> None:
        self.state = state
        self.hosts = hosts
        self.membership = membership
        self.now_ms = now_ms
        self.ready = ready
        self.period_s = period_s
        self.debounce_s = debounce_s
        self.retain_ms = retain_ms
        self.rng = rng or random.Random()
        self.fence = fence
        self.stats = {"evaluations": 0, "placed": 0, "stopped": 0, "restarted": 0, "errors": 0}
        self.last_seed: int | None = None

    async def duty(self, epoch: int) -> None:
        await duty_loop(
            self._evaluate_safely, WATCHED_KINDS, name="scheduler", epoch=epoch, state=self.state,
            fence=self.fence, now_ms=self.now_ms, ready=self.ready, period_s=self.period_s,
            debounce_s=self.debounce_s, watched=(self.membership,),
        )  # fmt: skip

    async def _evaluate_safely(self, term: Term) -> int | None:
        epoch = term.epoch
        try:
            return await self.evaluate(epoch, term.write)
        except RecordError as exc:  # before FlynnError: a RecordError is one too
            # A record the planner built is invalid: a bug, but one that must not
            # take this node (and every next leader, on the same state) down.
            self.stats["errors"] += 1
            log.error(
                "scheduler: evaluation at epoch %d (seed %s) failed: %s", epoch, self.last_seed, exc
            )
            return self.now_ms() + 5000
        except FlynnError as exc:
            self.stats["errors"] += 1
            log.warning("scheduler: evaluation at epoch %d not acknowledged: %s", epoch, exc)
            return self.now_ms() + 1000

    async def evaluate(self, epoch: int, write: Write | None = None) -> int | None:
        """One evaluation, written with ``write`` (the term's fenced write; the
        state's own by default); returns when the next restart falls due (or None)."""
        state = self.state.state
        now = self.now_ms()
        seed = self.rng.getrandbits(63)
        self.last_seed = seed
        hosts = self.hosts()
        result = plan(inputs_from_state(state, hosts, now), now, seed)
        self.stats["evaluations"] += 1
        changes = changes_for(state, result, epoch, now)
        changes += blocked_changes(state, result.blocked, epoch, now)
        alive = {h.name for h in hosts if h.alive}
        changes += collect_finished(state, now, self.retain_ms, alive)
        if changes:
            for start in result.starts:
                log.info("place %s/%s %s on %s", start.app, start.type, start.job_id, start.host)
            for stop in result.stops:
                log.info("stop %s on %s: %s", stop.job_id, stop.host, stop.reason)
            await (write or self.state.write)(changes)
            # counted once written (a deposed leader's fenced write raises first)
            self.stats["placed"] += len(result.starts)
            self.stats["stopped"] += len(result.stops)
            self.stats["restarted"] += len(result.restarts_due(now))
        return result.next_restart_ms(now)


def changes_for(state: State, result: Plan, epoch: int, now: int) -> list[Change]:
    """The placement writes that carry out `result` (restarts only once due)."""

    def placement(job: Start | Stop | Restart, action: str) -> Placement:
        return Placement(
            id=job.job_id, app_id=job.app, release_id=job.release, process_type=job.type,
            host=job.host, action=action, epoch=epoch, created_at=now,
        )  # fmt: skip

    changes: list[Change] = []
    for s in result.starts:
        request = state.record(RunRequest, s.job_id) if s.one_off else None
        p = placement(s, "start")
        if request is not None:
            old, job = state.record(Placement, s.job_id), state.record(Job, s.job_id)
            p = dataclasses.replace(
                p, one_off=True, args=request.args, env=request.env, memory_mb=request.memory_mb,
                # placed again after its host refused it: a new generation to act on
                generation=max(old.generation if old else -1, job.generation if job else -1) + 1,
            )  # fmt: skip
        changes.append(p)
    for stop in result.stops:
        # A job whose placement was collected gets one made to stop it.
        p = state.record(Placement, stop.job_id) or placement(stop, "stop")
        changes.append(
            dataclasses.replace(p, action="stop", epoch=epoch, reason=stop.reason[:4096])
        )
    for r in result.restarts_due(now):
        old, job = state.record(Placement, r.job_id), state.record(Job, r.job_id)
        generation = max(old.generation if old else 0, job.generation if job else 0) + 1
        restart = dataclasses.replace(
            old or placement(r, "start"), epoch=epoch, generation=generation,
            restarts=r.restarts, reason=restart_reason(job)[:4096],
        )  # fmt: skip
        changes.append(restart)
    return changes


def blocked_changes(
    state: State, blocked: Sequence[PlanBlocked], epoch: int, now: int
) -> list[Change]:
    """Write the blocked groups that changed; delete those that are placed now."""
    want = {
        (b.job_id or f"{b.app}/{b.type}"): Blocked(
            app_id=b.app,
            process_type=b.type,
            count=b.count,
            reasons=tuple(r[:4096] for r in b.reasons[:32]),
            epoch=epoch,
            updated_at=now,
            job_id=b.job_id,
        )
        for b in blocked
    }
    have = {b.key: b for b in state.records(Blocked)}
    changes: list[Change] = []
    for key, b in want.items():
        old = have.get(key)
        if old is None or (old.count, old.reasons) != (b.count, b.reasons):
            changes.append(b)
    changes.extend(Delete(Blocked.KIND, key) for key in have.keys() - want.keys())
    return changes


def collect_finished(
    state: State, now: int, retain_ms: int, alive: Collection[str] = ()
) -> list[Change]:
    """Delete stop placements of jobs down for `retain_ms`, and finished one-offs.

    A host deletes its own `Job` record once the placement is gone (it is the only
    writer of its jobs); records of hosts that are gone for good are deleted here,
    as are the jobs the leader stopped on a host not `alive` for `retain_ms` (it
    cannot report them down; if it comes back it finds no placement and stops them).
    """
    jobs = {j.id: j for j in state.records(Job)}
    changes: list[Change] = []
    for p in state.records(Placement):
        job = jobs.get(p.id)
        seen = effective_state(p, job)  # (a crashed job the leader stopped is down)
        finished = job is not None and seen is not None and is_finished(seen, p.one_off)
        lost = p.action == STOP and p.host not in alive and job is not None
        if lost and job is not None and now - max(p.created_at, job.updated_at) >= retain_ms:
            changes += [Delete(Placement.KIND, p.id), Delete(Job.KIND, p.id)]
            if p.one_off:
                changes.append(Delete(RunRequest.KIND, p.id))
        elif finished and job is not None and now - job.updated_at >= retain_ms:
            changes.append(Delete(Placement.KIND, p.id))
            if p.one_off:
                changes.append(Delete(RunRequest.KIND, p.id))
        elif job is None and p.action == STOP and now - p.created_at >= retain_ms:
            changes.append(Delete(Placement.KIND, p.id))
    placed = {p.id for p in state.records(Placement)}
    for job in jobs.values():
        if job.id not in placed and job.state == DOWN and now - job.updated_at >= 2 * retain_ms:
            changes.append(Delete(Job.KIND, job.id))  # its host never came back to do it
    return changes


def hosts_from_members(members: Sequence[Any]) -> list[Host]:
    """Hosts as the planner sees them: members with the "host" role."""
    hosts = []
    for m in members:
        if "host" not in roles(m.tags):
            continue
        try:
            memory = int(m.tags.get("mem", "0"))
        except ValueError:
            memory = 0
        hosts.append(Host(m.name, m.status == "alive", user_tags(m.tags), memory))
    return hosts
