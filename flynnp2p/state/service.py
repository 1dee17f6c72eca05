"""The state service: the replica's trio shell, which composes its replication.

Theory of operation
-------------------
One task (``_owner``) owns the store: every mutation, a local write, a peer's
delta or a tombstone collection, is a message on a bounded channel, and the
owner commits them one transaction at a time in a worker thread (SQLite never
runs on the trio thread).  Local writes that queue up while a commit runs are
committed together (group commit), which is what makes many small writes per
second cheap.

Replication is `flynnp2p.state.replication.Replicator`'s (push, pull, hints,
anti-entropy, tombstone collection, and serving peers); it reads the snapshot
and sends every mutation here.  A write is acknowledged when it is committed
here **and**, after the replicator's push round, on at least one other alive
node (``WriteResult.replicas`` counts the holders); if peers are alive but none
answers, the write fails with 503: it is committed here and will still spread,
but nobody else is known to hold it.  A new node pulls a full copy before
`run` reports started.

Nothing unencodable commits.  Every record of a local write is encoded as the
peer protocol will encode it (msgpack, UTF-8) before it commits; one that
cannot be is that write's RecordError (400), so no replica ever holds a value its
peers cannot read.

A full disk.  A commit that fails for lack of space fails its writes with 507
(`InsufficientStorage`) and marks the service ``degraded`` (shown in
``/v1/status``); the state in memory is untouched, so reads go on.  While degraded,
the service probes the store every few seconds, and the first commit that
succeeds, a probe or a write, clears it.

Watch.  ``subscribe`` registers the subscriber and takes the snapshot without a
checkpoint in between, so no change falls in a gap; subscribers that fall
behind their bounded buffer are closed (they resubscribe).  Applied entries are
also kept in a bounded ring with local event ids for ``/v1/events`` resumption.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio

from flynnp2p.errors import ClusterError, InsufficientStorage
from flynnp2p.peering import Peers
from flynnp2p.state.errors import RecordError, StaleReplicaError, StoreError, StoreFullError
from flynnp2p.state.merge import Change, Delta, Entry, State, VersionVector
from flynnp2p.state.replication import Pending, Replicator
from flynnp2p.state.store import StateStore
from flynnp2p.state.transport import HttpTransport, Transport
from flynnp2p.state.wire import open_envelope, unencodable

log = logging.getLogger(__name__)

EVENT_RING = 10_000
SUBSCRIBER_BUFFER = 1024
PROBE_INTERVAL_S = 2.0


@dataclass(frozen=True)
class WriteResult:
    entries: list[Entry]
    replicas: int


@dataclass
class _Write:
    changes: Sequence[Change]
    done: trio.Event = field(default_factory=trio.Event)  # committed here, or failed
    pending: Pending | None = None  # once committed: its push round
    error: BaseException | None = None


@dataclass
class _Call:
    fn: Callable[[], Any]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass
class _Apply:
    wire: Any  # an envelope (decoded in the worker thread)
    done: trio.Event = field(default_factory=trio.Event)
    applied: list[Entry] = field(default_factory=list)
    error: BaseException | None = None


class StateService:
    def __init__(
        self,
        store: StateStore,
        peers: Peers,
        transport: Transport | httpx.AsyncClient,
        clock_ms: Callable[[], int],
        gc_interval_s: float = 60.0,
    ) -> None:
        """`transport` reaches peers; an httpx client is the agent's `HttpTransport`."""
        self.store = store
        self.clock_ms = clock_ms
        if isinstance(transport, httpx.AsyncClient):
            transport = HttpTransport(transport)
        self.replication = Replicator(self, peers, transport, gc_interval_s)
        self._ops_send, self._ops_recv = trio.open_memory_channel[_Write | _Apply | _Call](256)
        self._subscribers: list[
            tuple[frozenset[str] | None, trio.MemorySendChannel[list[Entry]]]
        ] = []
        self._ring: deque[tuple[int, Entry]] = deque(maxlen=EVENT_RING)
        self.last_event_id = 0
        self._resets = 0
        self.degraded: str | None = None  # why commits fail (the disk is full), or None
        self._degraded_event = trio.Event()

    # -- reads ---------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.store.state

    @property
    def origin(self) -> str:
        return self.store.origin

    @property
    def stats(self) -> dict[str, int]:
        """Counters for ``/v1/status``: the replication's, and resets."""
        return {**self.replication.stats, "resets": self._resets}

    def delta_since(self, vv: VersionVector) -> Delta:
        """What the holder of `vv` lacks (blocking; a read, so not through the owner)."""
        return self.store.delta_since(vv)

    def events_since(self, event_id: int) -> list[tuple[int, Entry]] | None:
        """Ring entries after ``event_id``; None when it is older than the ring."""
        if event_id == self.last_event_id:
            return []
        if event_id > self.last_event_id or not self._ring or event_id < self._ring[0][0] - 1:
            return None
        return [(i, e) for i, e in self._ring if i > event_id]

    @asynccontextmanager
    async def subscribe(
        self, kinds: Collection[str] | None = None
    ) -> AsyncIterator[tuple[State, trio.MemoryReceiveChannel[list[Entry]]]]:
        send, recv = trio.open_memory_channel[list[Entry]](SUBSCRIBER_BUFFER)
        sub = (frozenset(kinds) if kinds is not None else None, send)
        self._subscribers.append(sub)  # no checkpoint between this and the snapshot
        try:
            yield self.state, recv
        finally:
            if sub in self._subscribers:
                self._subscribers.remove(sub)
            send.close()
            recv.close()

    # -- writes --------------------------------------------------------------

    async def write(self, changes: Sequence[Change]) -> WriteResult:
        op = _Write(list(changes))
        await self._ops_send.send(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error
        assert op.pending is not None  # committed
        await op.pending.done.wait()
        if op.pending.error is not None:
            raise op.pending.error
        return WriteResult(op.pending.entries, op.pending.replicas)

    async def _owned(self, fn: Callable[[], Any]) -> Any:
        """Run a store mutation on the owner task (in its worker thread)."""
        op = _Call(fn)
        await self._ops_send.send(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result

    async def receive(self, wire: Any) -> list[Entry]:
        """Apply a peer's message (``envelope`` form); RecordError if it is malformed."""
        op = _Apply(wire)
        await self._ops_send.send(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.applied

    async def collect_tombstones(self, vectors: list[VersionVector]) -> list[Entry]:
        """Drop the tombstones every one of `vectors` covers (on the owner task)."""
        dropped: list[Entry] = await self._owned(partial(self.store.collect_tombstones, vectors))
        return dropped

    async def catch_up(self) -> None:
        """Pull from every alive peer (see `Replicator.catch_up`)."""
        await self.replication.catch_up()

    # -- the service ---------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[StateService] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._owner)
            nursery.start_soon(self._probe_while_degraded)
            await nursery.start(self.replication.run)  # after the initial pull
            task_status.started(self)

    async def _owner(self) -> None:
        while True:
            first = await self._ops_recv.receive()
            batch = [first]
            if isinstance(first, _Write):
                while len(batch) < 512:
                    try:
                        nxt = self._ops_recv.receive_nowait()
                    except trio.WouldBlock:
                        break
                    batch.append(nxt)
            writes = [op for op in batch if isinstance(op, _Write)]
            if writes:
                await self._commit_writes(writes)
            for op in batch:
                if isinstance(op, _Apply):
                    await self._commit_apply(op)
                elif isinstance(op, _Call):
                    try:
                        op.result = await trio.to_thread.run_sync(op.fn)
                    except StoreError as exc:
                        self._store_failed(exc)
                        op.error = exc
                    else:
                        self._store_ok()
                    op.done.set()

    def _store_failed(self, exc: StoreError) -> Exception:
        """The error a write answers with; a full disk degrades the service."""
        if isinstance(exc, StoreFullError):
            if self.degraded is None:
                log.error("state writes fail, this node is degraded: %s", exc)
                self._degraded_event.set()
            self.degraded = str(exc)
            return InsufficientStorage(
                f"this node's disk is full, nothing was written ({exc}); "
                "reads still work, and writes will once space is freed"
            )
        log.error("local commit failed: %s", exc)
        return ClusterError(f"the local commit failed: {exc}")

    def _store_ok(self) -> None:
        if self.degraded is not None:
            log.warning("state writes succeed again: no longer degraded")
            self.degraded = None
            self._degraded_event = trio.Event()

    async def _commit_writes(self, writes: list[_Write]) -> None:
        # Inline: encoding is pure CPU (microseconds for a typical record) and a
        # thread hop here doubled the cost of a small write (measured).
        bad = [unencodable(w.changes) for w in writes]
        for w, error in zip(writes, bad, strict=True):
            if error is not None:
                w.error = error
                w.done.set()
        writes = [w for w, error in zip(writes, bad, strict=True) if error is None]
        if not writes:
            return
        changes = [c for w in writes for c in w.changes]
        now = self.clock_ms()
        try:
            entries = await trio.to_thread.run_sync(
                lambda: self.store.write(changes, physical_ms=now)
            )
        except Exception as exc:  # a failed commit fails every write of the batch
            failure: Exception
            if isinstance(exc, StoreError):
                failure = self._store_failed(exc)
            elif isinstance(exc, RecordError):
                failure = exc
            else:
                log.exception("local commit failed")
                failure = ClusterError(f"the local commit failed: {str(exc) or type(exc).__name__}")
            for w in writes:
                w.error = failure
                w.done.set()
            return
        self._store_ok()
        self._publish(entries)
        i = 0
        for w in writes:
            w.pending = Pending(entries[i : i + len(w.changes)])
            i += len(w.changes)
            w.done.set()
            await self.replication.replicate(w.pending)

    async def _commit_apply(self, op: _Apply) -> None:
        def apply() -> list[Entry]:
            delta = open_envelope(op.wire)
            try:
                return self.store.apply(delta)
            except StaleReplicaError:
                # Left out of a tombstone collection: empty and refill from peers.
                log.warning("this replica is stale (missed a tombstone collection): resetting")
                self.store.reset()
                raise

        try:
            op.applied = await trio.to_thread.run_sync(apply)
        except StaleReplicaError as exc:
            self._resets += 1
            op.error = exc
        except RecordError as exc:
            op.error = exc
        except StoreError as exc:
            op.error = self._store_failed(exc)
        else:
            self._store_ok()
            self._publish(op.applied)
        op.done.set()

    def _publish(self, entries: list[Entry]) -> None:
        if not entries:
            return
        for e in entries:
            self.last_event_id += 1
            self._ring.append((self.last_event_id, e))
        for sub in list(self._subscribers):
            kinds, send = sub
            mine = entries if kinds is None else [e for e in entries if e.kind in kinds]
            if not mine:
                continue
            try:
                send.send_nowait(mine)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(sub)  # too slow or gone: it must resubscribe
                send.close()

    async def _probe_while_degraded(self) -> None:
        """While commits fail for lack of space, try an empty one now and then, so
        that the node stops reporting degraded once space frees even with no writes."""
        while True:
            await self._degraded_event.wait()
            await trio.sleep(PROBE_INTERVAL_S)
            if self.degraded is not None:
                with contextlib.suppress(StoreError):  # still full: stays degraded
                    await self._owned(self.store.probe)
