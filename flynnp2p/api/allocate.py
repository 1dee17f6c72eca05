"""The leader's side of the writes that must be decided once.

Theory of operation
-------------------
App names, HTTP domain+path and TCP ports are claimed in etcd
(`flynnp2p.coord.claims`) before the records are written to the replicated
state; a clash is a 409, etcd without quorum a 503 naming the cause.  The
claim is dropped again if the state write fails outright (nothing committed);
when the write is committed here but not yet acknowledged by a peer (a 503),
the claim stays, since the record will spread, and a retry with the same
``Idempotency-Key`` is answered with the app already made.

Releases of one app are serialised on this node by a per-app lock and across
leaders by the release counter's compare-and-swap: each new release is built
on the release the counter names (waiting, bounded, until that record has
reached this node), so concurrent env changes never lose one another.

Formation writes (a scale, a deploy, an env change, a rollback, the deploy
watcher's rollback) are serialised the same way by the app's formation
generation (`flynnp2p.coord.generation`): each is built on the formation the
last acknowledged write made, waiting (bounded) for that record to reach this
node, and refused with a 503 rather than built on older counts; it commits by
compare-and-swap before the record is written.  A change that makes a release
and moves the formation to it swaps both counters in one etcd transaction.  A
leader duty's formation write also carries its term (``epoch``): the swap then
commits only while this node still holds the leader key of that term.

Meta and route changes take the same per-app lock, so the leader applies them
one after another on the record it wrote last.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from flynnp2p.coord.claims import (
    Claims,
    ReleaseCounter,
    app_key,
    owner_value,
    route_keys,
)
from flynnp2p.coord.generation import Base, FormationGeneration, base_verdict
from flynnp2p.errors import ClusterError, Conflict, FlynnError, Untouched
from flynnp2p.leader import Deposed
from flynnp2p.state.merge import Change, State
from flynnp2p.state.records import App, Formation, Release, Route
from flynnp2p.state.replica import R, ReplicatedState, WriteOutcome, wait_for_record

T = TypeVar("T")

RECORD_WAIT_S = 5.0
CAS_TRIES = 8
ORPHAN_RELEASE_MS = 30_000


class Allocator:
    """One per node; used on the leader only."""

    def __init__(self, state: ReplicatedState, claims: Callable[[], Claims], now_ms: Callable[[], int]) -> None:
        self.state = state
        self.claims = claims
        self.now_ms = now_ms
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)

    @asynccontextmanager
    async def app_lock(self, app_id: str) -> AsyncIterator[None]:
        lock = self._locks[app_id]
        async with lock:
            yield
        if not lock.locked() and not lock.statistics().tasks_waiting:
            self._locks.pop(app_id, None)

    async def wait_record(self, cls: type[R], key: str) -> R | None:
        """The record once it has reached this node (pulling from every peer
        meanwhile), or None after ``RECORD_WAIT_S``."""
        return await self._pulling(lambda: wait_for_record(self.state, cls, key))

    async def _pulling(self, wait: Callable[[], Awaitable[T]]) -> T | None:
        """``wait()``, pulling from every peer meanwhile; None after ``RECORD_WAIT_S``."""
        with trio.move_on_after(RECORD_WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.state.catch_up)
                found = await wait()
                nursery.cancel_scope.cancel()
                return found
        return None

    # -- unique claims ---------------------------------------------------------

    async def claim_and_write(
        self,
        app_id: str,
        keys: Sequence[str],
        changes: Sequence[Change],
        idem: str | None,
        clash: str,
    ) -> WriteOutcome | None:
        """Claim ``keys`` for ``app_id`` and write ``changes``; None when the claim
        belongs to the same ``idem`` already (a retried request)."""
        claims = self.claims()
        value = owner_value(app_id, idem, self.now_ms())
        if not await claims.claim(keys, value):
            for key in keys:
                owner = await claims.owner(key)
                if owner is not None and idem is not None and owner.idem == idem:
                    return None
            raise Conflict(clash)
        try:
            return await self.state.write(changes)
        except ClusterError:
            raise  # committed here, not yet acknowledged: it spreads; the claim stays
        except FlynnError:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                for key in keys:
                    await claims.drop(key, value)
            raise

    @staticmethod
    def claims_of_app(app: App, routes: Sequence[Route]) -> list[str]:
        keys = [app_key(app.name)]
        for route in routes:
            keys += route_keys(route)
        return keys

    # -- releases --------------------------------------------------------------

    async def next_release(
        self,
        app: App,
        build: Callable[[Release | None, int], tuple[Release, list[Change]]],
        current: Callable[[], Release | None],
        legacy_count: int,
    ) -> tuple[Release, list[Change], WriteOutcome]:
        """Number and write the app's next release, built by ``build(base, number)``
        on the release the counter names (``current()`` before numbering began);
        when it moves the formation too, on the formation the last write made."""
        claims = self.claims()
        async with self.app_lock(app.id):
            for _ in range(CAS_TRIES):
                counter = await claims.release_counter(app.id)
                generation = await claims.formation_generation(app.id)
                base = await self._base(app, counter, current)
                await self._formation_base(app, generation)
                number = counter.number + 1 if counter.number else legacy_count + 1
                release, extra = build(base, number)
                seen = _as_seen(counter, number)
                moved = _formation_of(extra)
                formation = None if moved is None else (generation, moved)
                if await claims.advance(
                    app.id, release=(seen, release.id), formation=formation, now_ms=self.now_ms()
                ):
                    result = await self.state.write([release, *extra])
                    return release, extra, result
            raise Untouched(f"app {app.name!r}: releases are changing concurrently; retry")

    async def _base(
        self, app: App, counter: ReleaseCounter, current: Callable[[], Release | None]
    ) -> Release | None:
        if counter.release_id is None:
            return current()
        found = await self.wait_record(Release, counter.release_id)
        if not isinstance(found, Release):
            if self.now_ms() - counter.at_ms > ORPHAN_RELEASE_MS:
                return current()  # its leader died before committing it: skip the number
            raise Untouched(
                f"app {app.name!r}: release v{counter.number} ({counter.release_id}) has not "
                "reached this node yet; retry"
            )
        return found

    # -- formations ------------------------------------------------------------

    async def write_formation(
        self,
        app: App,
        build: Callable[[State], Sequence[Change]],
        *,
        epoch: int | None = None,
    ) -> tuple[list[Change], WriteOutcome | None]:
        """Under the app's lock, write ``build(state)`` (nothing when it is empty),
        built on the formation the app's last formation write made; a formation
        among the changes commits generation + 1 first.  With ``epoch`` (a leader
        duty's term) nothing is written once this node no longer holds the leader
        key of that term: `Deposed`."""
        claims = self.claims()
        async with self.app_lock(app.id):
            for _ in range(CAS_TRIES):
                generation = await claims.formation_generation(app.id)
                await self._formation_base(app, generation)
                changes = list(build(self.state.state))
                if not changes:
                    return [], None
                moved = _formation_of(changes)
                if moved is None:  # no formation (a deployment's verdict): only the fence
                    if epoch is not None and not await claims.leads(epoch):
                        raise Deposed(epoch)
                    return changes, await self.state.write(changes)
                if await claims.advance(
                    app.id, formation=(generation, moved), epoch=epoch, now_ms=self.now_ms()
                ):
                    return changes, await self.state.write(changes)
                if epoch is not None and not await claims.leads(epoch):
                    raise Deposed(epoch)
            raise Untouched(f"app {app.name!r}: its formation is changing concurrently; retry")

    async def _formation_base(self, app: App, generation: FormationGeneration) -> None:
        """Return once this node's formation of `app` is one a write may build on
        (`base_verdict`), waiting for the one the last write made; 503 if it does
        not come in ``RECORD_WAIT_S``."""

        def verdict() -> Base:
            return base_verdict(generation, self.state.state.record(Formation, app.id), self.now_ms())

        if verdict() is not Base.BEHIND:
            return
        await self._pulling(lambda: _wait_until(self.state, lambda: verdict() is not Base.BEHIND))
        if verdict() is Base.BEHIND:
            raise Untouched(
                f"app {app.name!r}: its last formation change (generation {generation.number}) "
                "has not reached this node yet; retry"
            )


async def _wait_until(state: ReplicatedState, ready: Callable[[], bool]) -> bool:
    """Until ``ready()`` holds after a formation change (subscribed before the
    first look, so none slips by; subscribed again if dropped)."""
    while True:
        async with state.subscribe([Formation.KIND]) as (_, changes):
            if ready():
                return True
            async for _batch in changes:
                if ready():
                    return True


def _formation_of(changes: Sequence[Change]) -> Formation | None:
    return next((c for c in changes if isinstance(c, Formation)), None)


def _as_seen(counter: ReleaseCounter, number: int) -> ReleaseCounter:
    """The counter to compare against, with ``number - 1`` as the number it holds."""
    return ReleaseCounter(number - 1, counter.release_id, counter.mod_revision, counter.at_ms)
