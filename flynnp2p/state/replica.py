"""What the rest of the agent needs from the replicated state, and the one way to
wait for a record that has not reached this replica yet.

`ReplicatedState` is the one Protocol (implemented by
`flynnp2p.state.service.StateService`); `Readable`, `Subscribable` and `Writable`
are the parts of it a component may ask for alone (the blobstore only reads and
writes).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

import trio

from flynnp2p.state.merge import Change, Entry, State
from flynnp2p.state.records import Record

R = TypeVar("R", bound=Record)


class WriteOutcome(Protocol):
    @property
    def replicas(self) -> int:
        """Nodes that hold the write, this one included."""
        ...


class Readable(Protocol):
    @property
    def state(self) -> State:
        """The current snapshot (immutable; never blocks)."""
        ...


class Subscribable(Readable, Protocol):
    def subscribe(
        self, kinds: Collection[str] | None = None
    ) -> AbstractAsyncContextManager[tuple[State, trio.MemoryReceiveChannel[list[Entry]]]]:
        """The snapshot, then every later change (no gap). It must not open a cancel
        scope or nursery: the event stream yields inside it. A subscriber that falls
        behind is dropped (its channel ends)."""
        ...


class Writable(Readable, Protocol):
    async def write(self, changes: Sequence[Change]) -> WriteOutcome:
        """Commit one atomic batch; `ClusterError` (503) when no alive peer acknowledged it."""
        ...


class ReplicatedState(Subscribable, Writable, Protocol):
    @property
    def last_event_id(self) -> int: ...

    def events_since(self, event_id: int) -> list[tuple[int, Entry]] | None:
        """Numbered events after `event_id`; None when the ring does not reach back."""
        ...

    async def catch_up(self) -> None:
        """Pull from every alive peer."""
        ...


async def wait_for_record(state: Subscribable, cls: type[R], key: str) -> R:
    """Record `cls`/`key` once it is in this replica: subscribe before the snapshot,
    so no write slips between them; subscribe again if dropped. Unbounded: the
    caller bounds the wait."""
    while True:
        async with state.subscribe([cls.KIND]) as (snapshot, changes):
            record = snapshot.record(cls, key)
            if record is not None:
                return record
            async for batch in changes:
                if any(e.key == key for e in batch):
                    record = state.state.record(cls, key)
                    if record is not None:
                        return record
