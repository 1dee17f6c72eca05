"""Leader-only duties: run while this node leads, cancelled on demotion.

A duty is ``async def duty(epoch: int) -> None``; it runs until cancelled and
carries ``epoch`` (the fencing token) on every write it makes.  Duties of one
term share one cancel scope: demotion (or a quorum loss) cancels them all.

Demotion is this node's own conclusion (`flynnp2p.coord.election`: its lease
renewal failed or ran out of time), and a duty may be in the middle of a write
when the term really ended.  So a duty's writes are also **fenced**: before it
writes, a duty asks etcd (`Fence`, a linearizable read of the leader key) whether
the key still has its term's create revision, and a formation write puts that
compare in the same transaction as its generation swap.  A duty told that its
term is over raises `Deposed` and stops at once (`flynnp2p.scheduler.duty`),
before the election notices.  `Deposed` is control flow inside the leader's
duties, outside the error tree on purpose: no API caller ever sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from flynnp2p.coord.election import Leadership
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

Duty = Callable[[int], Awaitable[None]]

# Whether this node still holds the leader key of term ``epoch`` (a `CoordError`
# when etcd cannot say: no write then either).
Fence = Callable[[int], Awaitable[bool]]


async def unfenced(_epoch: int) -> bool:
    """The fence of a node without etcd (component tests): always leading."""
    return True


class Deposed(Exception):
    """The leader key is no longer this duty's term's: the duty's write was not made."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"leader term {epoch} is over: this node no longer holds the leader key")
        self.epoch = epoch


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
