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
Formation and meta changes take the same per-app lock, so the leader applies
them one after another on the record it wrote last.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from flynnp2p.coord.claims import (
    Claims,
    ReleaseCounter,
    app_key,
    owner_value,
    route_keys,
)
from flynnp2p.errors import ClusterError, Conflict, FlynnError
from flynnp2p.state.merge import Change
from flynnp2p.state.records import App, Release, Route
from flynnp2p.state.replica import R, ReplicatedState, WriteOutcome, wait_for_record

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
        with trio.move_on_after(RECORD_WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.state.catch_up)
                found = await wait_for_record(self.state, cls, key)
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
        on the release the counter names (``current()`` before numbering began)."""
        claims = self.claims()
        async with self.app_lock(app.id):
            for _ in range(CAS_TRIES):
                counter = await claims.release_counter(app.id)
                base = await self._base(app, counter, current)
                number = counter.number + 1 if counter.number else legacy_count + 1
                release, extra = build(base, number)
                seen = _as_seen(counter, number)
                if await claims.advance_release(app.id, seen, release.id, self.now_ms()):
                    result = await self.state.write([release, *extra])
                    return release, extra, result
            raise ClusterError(f"app {app.name!r}: releases are changing concurrently; retry")

    async def _base(
        self, app: App, counter: ReleaseCounter, current: Callable[[], Release | None]
    ) -> Release | None:
        if counter.release_id is None:
            return current()
        found = await self.wait_record(Release, counter.release_id)
        if not isinstance(found, Release):
            if self.now_ms() - counter.at_ms > ORPHAN_RELEASE_MS:
                return current()  # its leader died before committing it: skip the number
            raise ClusterError(
                f"app {app.name!r}: release v{counter.number} ({counter.release_id}) has not "
                "reached this node yet; retry"
            )
        return found


def _as_seen(counter: ReleaseCounter, number: int) -> ReleaseCounter:
    """The counter to compare against, with ``number - 1`` as the number it holds."""
    return ReleaseCounter(number - 1, counter.release_id, counter.mod_revision, counter.at_ms)
