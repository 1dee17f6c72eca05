"""The leader's deploy watcher: finish running deployments, roll failed ones back.

Theory of operation
-------------------
`DeployWatcher.duty(epoch)` is a leader duty (see `flynnp2p.leader`), cancelled
on demotion. Like the scheduler it first waits until this leader has caught up
with its peers, then loops:

1. **Judge** every running `Deployment` in this replica (`rollout.judge`), and
   write what a verdict means (`rollout.outcome`): the deployment finished, and
   for a failure the formation moved back to the old release. Each write is made
   under the app's lock (the one the API's formation writes take), after judging
   again on the state as it is then, so a deploy the API starts meanwhile is not
   overwritten by the rollback of the one it replaced.
   Finished deployments beyond each app's newest 50 are deleted
   (`rollout.expired`).
2. **Sleep** until the state changes (deployments, formations, jobs, placements),
   the nearest deadline of a running deployment falls due, or ``period_s``
   passes; then ``debounce_s`` so one burst of job reports makes one pass.

Nothing lives in memory between passes: the deployments and their deadlines are
in the replicated state, so a new leader picks up the running ones where the
last one left them (a deadline that passed meanwhile fails at its first pass).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from flynnp2p.errors import FlynnError
from flynnp2p.scheduler.rollout import deadline_ms, expired, judge, outcome
from flynnp2p.state.records import Deployment, Formation, Job, Placement
from flynnp2p.state.service import StateService

log = logging.getLogger(__name__)

WATCHED_KINDS = (Deployment.KIND, Formation.KIND, Job.KIND, Placement.KIND)

AppLock = Callable[[str], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def _no_lock(_app_id: str) -> AsyncIterator[None]:
    yield


class DeployWatcher:
    def __init__(
        self,
        state: StateService,
        now_ms: Callable[[], int],
        ready: Callable[[int], bool],
        *,
        app_lock: AppLock = _no_lock,
        period_s: float = 5.0,
        debounce_s: float = 0.05,
    ) -> None:
        self.state = state
        self.now_ms = now_ms
        self.ready = ready
        self.app_lock = app_lock
        self.period_s = period_s
        self.debounce_s = debounce_s
        self.stats = {"passes": 0, "complete": 0, "failed": 0, "rolled_back": 0, "errors": 0}
        self._wake = trio.Event()

    async def duty(self, epoch: int) -> None:
        while not self.ready(epoch):  # noqa: ASYNC110 - the catch-up duty sets it
            await trio.sleep(0.05)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_state)
            while True:
                self._wake = trio.Event()
                next_at = await self._pass_safely()
                timeout = self.period_s
                if next_at is not None:
                    timeout = min(timeout, max(0.0, (next_at - self.now_ms()) / 1000))
                with trio.move_on_after(timeout):
                    await self._wake.wait()
                await trio.sleep(self.debounce_s)

    async def _watch_state(self) -> None:
        while True:  # a subscriber that falls behind is dropped: subscribe again
            async with self.state.subscribe(WATCHED_KINDS) as (_, changes):
                async for _batch in changes:
                    self._wake.set()
            self._wake.set()

    async def _pass_safely(self) -> int | None:
        try:
            return await self.run_pass()
        except FlynnError as exc:  # not acknowledged, or a record a bug made invalid
            self.stats["errors"] += 1
            log.warning("deploy watcher: a write failed, trying again in 1 s: %s", exc)
            return self.now_ms() + 1000

    async def run_pass(self) -> int | None:
        """Judge every running deployment once; returns the nearest deadline left."""
        self.stats["passes"] += 1
        running = [d for d in self.state.state.records(Deployment) if d.status == "running"]
        nearest: int | None = None
        for dep in sorted(running, key=lambda d: (d.created_at, d.id)):
            if judge(self.state.state, dep, self.now_ms()) is None:
                at = deadline_ms(self.state.state, dep)
                nearest = at if nearest is None else min(nearest, at)
                continue
            async with self.app_lock(dep.app_id):
                state, now = self.state.state, self.now_ms()
                current = state.record(Deployment, dep.id)
                if current is None or current.status != "running":
                    continue
                verdict = judge(state, current, now)
                if verdict is None:
                    continue
                changes = outcome(state, current, verdict, now)
                await self.state.write(changes)
            status = next(c.status for c in changes if isinstance(c, Deployment))
            self.stats[status.replace("-", "_")] += 1
            log.info(
                "deployment %s of app %s: %s%s", dep.id, dep.app_id, status,
                f" ({verdict.reason})" if verdict.reason else "",
            )  # fmt: skip
        old = expired(self.state.state)
        if old:
            await self.state.write(old)
        return nearest
