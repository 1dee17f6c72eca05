"""The leader's deploy watcher: finish running deployments, roll failed ones back.

Theory of operation
-------------------
`DeployWatcher.duty(epoch)` is a leader duty (see `flynnp2p.leader`), cancelled
on demotion, in the loop every state-driven duty shares (`flynnp2p.scheduler.duty`):
it first waits until this leader has caught up with its peers, then loops:

1. **Judge** every running `Deployment` in this replica (`rollout.judge`), and
   write what a verdict means (`rollout.outcome`): the deployment finished, and
   for a failure the formation moved back to the old release. Each write goes
   through the app's formation writes (``formations``: the API's allocator,
   `flynnp2p.api.allocate`): under the app's lock, on the formation the app's
   last acknowledged formation write made, judged again on the state as it is
   then (so a deploy the API starts meanwhile is not overwritten by the rollback
   of the one it replaced, and a rollback never restores counts older than an
   acknowledged scale), and fenced by this term's leader key in the same etcd
   transaction. Finished deployments beyond each app's newest 50 are deleted
   (`rollout.expired`).
2. **Sleep** until the state changes (deployments, formations, jobs, placements),
   the nearest deadline of a running deployment falls due, or ``period_s``
   passes; then ``debounce_s`` (20 ms, as the scheduler's) so one burst of job
   reports makes one pass. A pass that finds no verdict writes nothing; the
   debounce is on the path of every deploy's end (50 ms of the 110 ms between a
   push's new job up and the push saying so).

Nothing lives in memory between passes: the deployments and their deadlines are
in the replicated state, so a new leader picks up the running ones where the
last one left them (a deadline that passed meanwhile fails at its first pass).
Without ``formations`` (component tests, no etcd) a verdict is written with the
term's fenced write alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from flynnp2p.errors import FlynnError
from flynnp2p.leader import Fence, unfenced
from flynnp2p.scheduler.duty import Term, duty_loop
from flynnp2p.scheduler.rollout import deadline_ms, expired, judge, outcome
from flynnp2p.state.merge import Change, State
from flynnp2p.state.records import App, Deployment, Formation, Job, Placement
from flynnp2p.state.replica import WriteOutcome
from flynnp2p.state.service import StateService

log = logging.getLogger(__name__)

WATCHED_KINDS = (Deployment.KIND, Formation.KIND, Job.KIND, Placement.KIND)


class FormationWrites(Protocol):
    """How a verdict is written (`flynnp2p.api.allocate.Allocator` on a node)."""

    async def write_formation(
        self, app: App, build: Callable[[State], Sequence[Change]], *, epoch: int | None = None
    ) -> tuple[list[Change], WriteOutcome | None]: ...


class DeployWatcher:
    def __init__(
        self,
        state: StateService,
        now_ms: Callable[[], int],
        ready: Callable[[int], bool],
        *,
        formations: FormationWrites | None = None,
        fence: Fence = unfenced,
        period_s: float = 5.0,
        debounce_s: float = 0.02,
    ) -> None:
        self.state = state
        self.now_ms = now_ms
        self.ready = ready
        self.formations = formations
        self.fence = fence
        self.period_s = period_s
        self.debounce_s = debounce_s
        self.stats = {"passes": 0, "complete": 0, "failed": 0, "rolled_back": 0, "errors": 0}

    async def duty(self, epoch: int) -> None:
        await duty_loop(
            self._pass_safely, WATCHED_KINDS, name="deploy watcher", epoch=epoch,
            state=self.state, fence=self.fence, now_ms=self.now_ms, ready=self.ready,
            period_s=self.period_s, debounce_s=self.debounce_s,
        )  # fmt: skip

    async def _pass_safely(self, term: Term) -> int | None:
        try:
            return await self.run_pass(term)
        except FlynnError as exc:  # not acknowledged, or a record a bug made invalid
            self.stats["errors"] += 1
            log.warning("deploy watcher: a write failed, trying again in 1 s: %s", exc)
            return self.now_ms() + 1000

    async def run_pass(self, term: Term) -> int | None:
        """Judge every running deployment once; returns the nearest deadline left."""
        self.stats["passes"] += 1
        running = [d for d in self.state.state.records(Deployment) if d.status == "running"]
        nearest: int | None = None
        for dep in sorted(running, key=lambda d: (d.created_at, d.id)):
            if judge(self.state.state, dep, self.now_ms()) is None:
                at = deadline_ms(self.state.state, dep)
                nearest = at if nearest is None else min(nearest, at)
                continue
            changes = await self._conclude(term, dep)
            finished = next((c for c in changes if isinstance(c, Deployment)), None)
            if finished is None:
                continue
            self.stats[finished.status.replace("-", "_")] += 1
            log.info(
                "deployment %s of app %s: %s%s", dep.id, dep.app_id, finished.status,
                f" ({finished.reason})" if finished.reason else "",
            )  # fmt: skip
        old = expired(self.state.state)
        if old:
            await term.write(old)
        return nearest

    async def _conclude(self, term: Term, dep: Deployment) -> list[Change]:
        """Write the verdict on `dep`, judged again on the state as it is at the
        write (nothing when it is no longer running, or not yet decided)."""

        def build(state: State) -> list[Change]:
            current = state.record(Deployment, dep.id)
            if current is None or current.status != "running":
                return []
            now = self.now_ms()
            verdict = judge(state, current, now)
            return [] if verdict is None else outcome(state, current, verdict, now)

        app = self.state.state.record(App, dep.app_id)
        if self.formations is not None and app is not None:
            changes, _ = await self.formations.write_formation(app, build, epoch=term.epoch)
            return changes
        changes = build(self.state.state)  # (no formation is left to move without its app)
        if changes:
            await term.write(changes)
        return changes
