"""The one loop of the leader's state-driven duties (the scheduler, the deploy watcher).

Theory of operation
-------------------
``duty_loop(evaluate, kinds, ...)`` runs one leader term of a duty (see
`flynnp2p.leader`; it is cancelled on demotion):

1. it waits until this leader has caught up with its peers (``ready(epoch)``):
   a leader acting on a stale replica would undo what it has not heard of yet;
2. it calls ``evaluate(term)``, which looks at the replica and writes what it
   decides, only through ``term.write``; ``evaluate`` returns when it next falls
   due (ms), or None;
3. it sleeps until a record of one of ``kinds`` changes (a subscriber that
   falls behind is dropped: it subscribes again, and counts that as a change),
   one of ``watched`` changes (the membership), that time comes, or
   ``period_s`` passes; then ``debounce_s``, so a burst of changes makes one
   evaluation; and goes back to 2.

The fence has its home here: `Term.write` asks the `Fence` whether this node
still holds the leader key of the term before every write, and a duty told it
does not is over at once (`Deposed`), whatever the election believes yet.  (The
replicated state is not in etcd, so the check and the write are two steps: a
write can still land after the term ended only if this process stalls between
them; hosts fence placements by their epoch for that, and a formation write
puts the compare in its own etcd transaction, `flynnp2p.api.allocate`.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from flynnp2p.leader import Deposed, Fence
from flynnp2p.state.merge import Change
from flynnp2p.state.replica import WriteOutcome
from flynnp2p.state.service import StateService
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

READY_POLL_S = 0.05


@dataclass(frozen=True)
class Term:
    """One leader term as a duty sees it: its epoch, and its one way to write."""

    epoch: int
    state: StateService
    fence: Fence

    async def write(self, changes: Sequence[Change]) -> WriteOutcome:
        """Write ``changes`` while this node still holds the leader key of the term;
        `Deposed` (nothing written) once it does not."""
        if not await self.fence(self.epoch):
            raise Deposed(self.epoch)
        return await self.state.write(changes)


class _Alarm:
    """The loop's wake-up: set by any watcher, re-armed before each evaluation."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def rearm(self) -> None:
        self.event = trio.Event()

    def ring(self) -> None:
        self.event.set()


async def duty_loop(
    evaluate: Callable[[Term], Awaitable[int | None]],
    kinds: Collection[str],
    *,
    name: str,
    epoch: int,
    state: StateService,
    fence: Fence,
    now_ms: Callable[[], int],
    ready: Callable[[int], bool],
    period_s: float,
    debounce_s: float,
    watched: Sequence[Watched[Any]] = (),
) -> None:
    """Evaluate on every change until cancelled, or until the term is found over."""
    while not ready(epoch):  # noqa: ASYNC110 - the catch-up duty sets it
        await trio.sleep(READY_POLL_S)
    log.info("%s: leading with epoch %d", name, epoch)
    term = Term(epoch, state, fence)
    alarm = _Alarm()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ring_on_records, state, kinds, alarm)
        for value in watched:
            nursery.start_soon(_ring_on_change, value, alarm)
        while True:
            alarm.rearm()
            try:
                next_at = await evaluate(term)
            except Deposed as exc:
                log.warning("%s: %s; stopping", name, exc)
                nursery.cancel_scope.cancel()
                return
            timeout = period_s
            if next_at is not None:
                timeout = min(timeout, max(0.0, (next_at - now_ms()) / 1000))
            with trio.move_on_after(timeout):
                await alarm.event.wait()
            await trio.sleep(debounce_s)


async def _ring_on_records(state: StateService, kinds: Collection[str], alarm: _Alarm) -> None:
    while True:  # a subscriber that falls behind is dropped: subscribe again
        async with state.subscribe(kinds) as (_, changes):
            async for _batch in changes:
                alarm.ring()
        alarm.ring()


async def _ring_on_change(value: Watched[Any], alarm: _Alarm) -> None:
    version = value.version
    while True:
        version, _ = await value.wait_change(version)
        alarm.ring()
