"""Leader-only duties: run while this node leads, cancelled on demotion.

A duty is ``async def duty(epoch: int) -> None``; it runs until cancelled and
carries ``epoch`` (the fencing token) on every write it makes.  Duties of one
term share one cancel scope: demotion (or a quorum loss) cancels them all.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from flynnp2p.coord.election import Leadership
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

Duty = Callable[[int], Awaitable[None]]


class LeaderDuties:
    def __init__(self, leadership: Watched[Leadership]) -> None:
        self.leadership = leadership
        self.duties: list[Duty] = []
        self.terms = 0

    def add(self, duty: Duty) -> None:
        self.duties.append(duty)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        version, state = self.leadership.version, self.leadership.value
        while True:
            if not state.is_leader:
                version, state = await self.leadership.wait_change(version)
                continue
            self.terms += 1
            epoch = state.epoch
            async with trio.open_nursery() as nursery:
                for duty in self.duties:
                    nursery.start_soon(duty, epoch)
                while state.is_leader and state.epoch == epoch:
                    version, state = await self.leadership.wait_change(version)
                log.info("leader term %d ended: cancelling leader duties", epoch)
                nursery.cancel_scope.cancel()
