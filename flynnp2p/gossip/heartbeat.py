"""Heartbeats: which members serf calls alive have stopped answering.

Theory of operation
-------------------
Serf marks a member failed 5-7 s after it stops (probes, indirect probes, then a
suspicion window for it to refute).  That caution is right for membership (a
false "failed" moves jobs), but for those seconds the API would show the jobs of
a SIGKILLed host as ``up``.  So every node also pings each *other* member that
serf calls alive (a UDP datagram, `flynnp2p.gossip.ping`), every
`HeartbeatSettings.interval_s`, with a deadline of `HeartbeatSettings.timeout_s`,
and keeps when it last heard from each (`LastHeard`).  An answer means the
node's process is there.  A member not heard from for more than `unresponsive_after_s` is
*unresponsive*.

A member is counted as heard when it is first tracked, that is when serf first
calls it alive (or again, after serf had dropped it): a joining node gets the same
grace as one that just answered.  Members serf no longer calls alive are dropped;
serf's verdict is the stronger one.

This is one node's own view: it is not replicated, and the scheduler never acts
on it (it waits for serf).  What the API shows uses it, and so does this node's
router: after every round the names of the members this node does not hear
from are published in `Heartbeats.silent` (a `Watched`, changed only when the
set changes), and the router's table stops listing backends on those hosts
while others answer (`flynnp2p.router.build`).  They are the unresponsive
members and those serf no longer calls alive (``not_alive``): when serf calls a
silent member failed, heartbeats drop it, yet the leader has not stopped its
jobs yet (that takes another second or two), and its backends must not come
back into the table meanwhile.  The core
(`LastHeard`) is pure and takes ``now``; `Heartbeats` is the trio service, with
the clock and the probe as parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from flynnp2p.watch import Watched

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeartbeatSettings:
    interval_s: float = 0.5
    timeout_s: float = 0.5
    unresponsive_after_s: float = 2.0


# -- the core ---------------------------------------------------------------------


@dataclass
class LastHeard:
    """When each tracked member last answered (in the caller's clock, seconds)."""

    unresponsive_after_s: float
    heard: dict[str, float] = field(default_factory=dict)

    def track(self, names: Iterable[str], now: float) -> None:
        """Follow exactly `names`: new ones count as heard `now`, others are dropped."""
        wanted = set(names)
        for gone in self.heard.keys() - wanted:
            del self.heard[gone]
        for new in sorted(wanted - self.heard.keys()):
            self.heard[new] = now

    def heard_from(self, name: str, now: float) -> None:
        if name in self.heard:
            self.heard[name] = max(self.heard[name], now)

    def unresponsive(self, now: float) -> dict[str, float]:
        """The members silent for longer than the limit, and for how long."""
        return {
            name: now - at
            for name, at in sorted(self.heard.items())
            if now - at > self.unresponsive_after_s
        }


# -- the service ------------------------------------------------------------------


class Target(Protocol):
    """A member to probe (`flynnp2p.peering.Peer` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def api(self) -> str: ...


class Prober(Protocol):
    async def __call__(self, api: str) -> bool:
        """True if the node whose API is `api` answered."""
        ...


class Heartbeats:
    def __init__(
        self,
        targets: Callable[[], Iterable[Target]],
        probe: Prober,
        settings: HeartbeatSettings = HeartbeatSettings(),
        clock: Callable[[], float] = trio.current_time,
        not_alive: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.targets = targets
        self.not_alive = not_alive
        self.probe = probe
        self.settings = settings
        self.clock = clock
        self.last_heard = LastHeard(settings.unresponsive_after_s)
        # Unresponsive or not alive, as of the end of the last round (see the module).
        self.silent: Watched[frozenset[str]] = Watched(frozenset())

    def unresponsive(self) -> dict[str, float]:
        """Members serf calls alive that have not answered for a while (name → seconds)."""
        return self.last_heard.unresponsive(self.clock())

    async def run(self, *, task_status: trio.TaskStatus[Heartbeats] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        while True:
            start = self.clock()
            targets = {t.name: t.api for t in self.targets() if t.api}
            self.last_heard.track(targets, start)
            for name, at in await self._round(targets):
                self.last_heard.heard_from(name, at)
            self.silent.set(frozenset(self.unresponsive()).union(self.not_alive()))
            # A slow round (probes that hit their deadline) does not delay the
            # next one by more than the deadline: rounds start on a fixed beat.
            await trio.sleep_until(start + self.settings.interval_s)

    async def _round(self, targets: dict[str, str]) -> list[tuple[str, float]]:
        """Probe every target at once; who answered within the deadline, and when."""
        answered: list[tuple[str, float]] = []

        async def one(name: str, api: str) -> None:
            with trio.move_on_after(self.settings.timeout_s):
                if await self.probe(api):
                    answered.append((name, self.clock()))

        async with trio.open_nursery() as nursery:
            for name, api in sorted(targets.items()):
                nursery.start_soon(one, name, api)
        return answered
