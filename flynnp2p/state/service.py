"""The state service: the replica's trio shell, and its replication with peers.

Theory of operation
-------------------
One task (``_owner``) owns the store: every mutation, a local write or a peer's
delta, is a message on a bounded channel, and the owner commits them one
transaction at a time in a worker thread (SQLite never runs on the trio
thread).  Local writes that queue up while a commit runs are committed together
(group commit), which is what makes many small writes per second cheap.

Durability.  After a local commit the entries go to ``_replicator``, which pushes
them (again batched) to every alive peer at once and resolves each write when
the round ends: a write is acknowledged when it is committed here **and** on at
least one other alive node (``WriteResult.replicas`` counts the holders).  If
peers are alive but none answers, the write fails with 503: it is committed
here and will still spread, but nobody else is known to hold it.

Propagation.  Pushes reach the alive peers at once.  A tiny serf user event
(``f2p-st``, payload ``"<origin> <seq>"``) tells everyone that an origin has new
writes; a node that lacks them pulls from the origin's node.  Anti-entropy pulls
from a random alive peer every few seconds repair anything lost; a pull sends
this replica's version vector and gets back, streamed in chunks, every entry it
lacks.  A new node pulls a full copy before it reports ready.

Nothing unencodable commits.  Every record of a local write is encoded as the
peer protocol will encode it (msgpack, UTF-8) before it commits; one that
cannot be is that write's RecordError (400), so no replica ever holds a value its
peers cannot read.  A push or pull that fails, for whatever reason, is one
failed attempt: it is logged and counted, and hints and anti-entropy pull again.
An entry that cannot be encoded when serving a pull is skipped and logged rather
than failing the whole pull.

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
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import msgpack
import trio

from flynnp2p.errors import ClusterError, InsufficientStorage
from flynnp2p.peering import Peer, Peers
from flynnp2p.state.errors import RecordError, StaleReplicaError, StoreError, StoreFullError
from flynnp2p.state.merge import Change, Delta, Entry, State, VersionVector, delta_of
from flynnp2p.state.store import StateStore
from flynnp2p.state.wire import (
    PACK_ERRORS,
    WIRE_VERSION,
    envelope,
    open_envelope,
    pack,
    packable,
    unencodable,
)

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 3.0
PULL_TIMEOUT_S = 120.0
ANTI_ENTROPY_S = 3.0
HINT_MIN_INTERVAL_S = 0.2
CHUNK_ENTRIES = 2000
EVENT_RING = 10_000
SUBSCRIBER_BUFFER = 1024
PROBE_INTERVAL_S = 2.0
MSGPACK = "application/x-msgpack"


@dataclass(frozen=True)
class WriteResult:
    entries: list[Entry]
    replicas: int


@dataclass
class _Write:
    changes: Sequence[Change]
    done: trio.Event = field(default_factory=trio.Event)
    entries: list[Entry] = field(default_factory=list)
    replicas: int = 0
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
        http: httpx.AsyncClient,
        clock_ms: Callable[[], int],
        gc_interval_s: float = 60.0,
    ) -> None:
        self.store = store
        self.peers = peers
        self.http = http
        self.clock_ms = clock_ms
        self._ops_send, self._ops_recv = trio.open_memory_channel[_Write | _Apply | _Call](256)
        self._repl_send, self._repl_recv = trio.open_memory_channel[_Write](256)
        self._subscribers: list[
            tuple[frozenset[str] | None, trio.MemorySendChannel[list[Entry]]]
        ] = []
        self._ring: deque[tuple[int, Entry]] = deque(maxlen=EVENT_RING)
        self.last_event_id = 0
        self._hint_due = trio.Event()
        self._pulling: set[str] = set()
        self.peer_vectors: dict[str, VersionVector] = {}
        self.gc_interval_s = gc_interval_s
        self.stats = {
            "pushes": 0, "push_failures": 0, "pulls": 0, "pull_failures": 0, "resets": 0,
            "collected": 0, "skipped_unencodable": 0,
        }  # fmt: skip
        self.degraded: str | None = None  # why commits fail (the disk is full), or None
        self._degraded_event = trio.Event()

    # -- reads ---------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.store.state

    @property
    def origin(self) -> str:
        return self.store.origin

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
        return WriteResult(op.entries, op.replicas)

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

    # -- the service ---------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[StateService] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._owner)
            nursery.start_soon(self._replicator)
            await self._initial_sync()
            nursery.start_soon(self._hint_sender)
            nursery.start_soon(self._hint_listener)
            nursery.start_soon(self._anti_entropy)
            nursery.start_soon(self._collect_tombstones)
            nursery.start_soon(self._probe_while_degraded)
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
        i = 0
        for w in writes:
            w.entries = entries[i : i + len(w.changes)]
            i += len(w.changes)
        self._publish(entries)
        self._hint_due.set()
        for w in writes:
            await self._repl_send.send(w)

    async def _commit_apply(self, op: _Apply) -> None:
        def apply() -> list[Entry]:
            delta = open_envelope(op.wire)
            try:
                return self.store.apply(delta)
            except StaleReplicaError:
                # Left out of a tombstone collection: empty and refill from peers.
                log.warning("this replica is stale (missed a tombstone collection): resetting")
                self.store.reset()
                self.stats["resets"] += 1
                raise

        try:
            op.applied = await trio.to_thread.run_sync(apply)
        except (RecordError, StaleReplicaError) as exc:
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

    # -- durability: push to every alive peer --------------------------------

    async def _replicator(self) -> None:
        while True:
            first = await self._repl_recv.receive()
            batch = [first]
            while sum(len(w.entries) for w in batch) < CHUNK_ENTRIES:
                try:
                    batch.append(self._repl_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            entries = [e for w in batch for e in w.entries]
            peers = self.peers.alive_peers()
            acks = await self._push(peers, entries) if peers and entries else 0
            for w in batch:
                if peers and acks == 0:
                    w.error = ClusterError(
                        f"the write is committed on this node but none of {len(peers)} alive "
                        "peers acknowledged it in time; it will spread when they are reachable"
                    )
                w.replicas = 1 + acks
                w.done.set()

    async def _push(self, peers: list[Peer], entries: list[Entry]) -> int:
        # Entries and vector from one snapshot (delta_of drops entries that a
        # later write already replaced), so the receiver's horizon check holds.
        delta = delta_of(self.state, entries)
        try:
            body = pack(envelope(delta))
        except PACK_ERRORS:
            # Unreachable while writes are checked before they commit; if it is
            # reached, push what encodes and leave the rest to the logged skip.
            good = packable(delta.entries)
            self.stats["skipped_unencodable"] += len(delta.entries) - len(good)
            body = pack(envelope(Delta(tuple(good), delta.vv, delta.horizon, delta.complete)))
        acks = 0

        async def one(peer: Peer) -> None:
            nonlocal acks
            # One attempt: whatever fails it (the network, an error answer) leaves
            # the entries to hints and anti-entropy, and must not end the replicator
            # (the agent with it). Peers' addresses are checked by `alive_peers`;
            # this catch is what is left if anything else still gets through.
            try:
                r = await self.http.post(
                    f"http://{peer.api}/v1/internal/state/push",
                    content=body,
                    headers={"Content-Type": MSGPACK},
                    timeout=PUSH_TIMEOUT_S,
                )
            except Exception as exc:
                self.stats["push_failures"] += 1
                log.info("push to %s failed: %s", peer.name, str(exc) or type(exc).__name__)
                return
            if r.status_code == 200:
                acks += 1
            else:
                self.stats["push_failures"] += 1
                log.warning("push to %s answered %d: %s", peer.name, r.status_code, r.text[:200])

        with trio.move_on_after(PUSH_TIMEOUT_S + 1):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(one, peer)
        self.stats["pushes"] += 1
        return acks

    # -- propagation: hints and pulls -----------------------------------------

    async def _hint_sender(self) -> None:
        """At most one hint per HINT_MIN_INTERVAL_S, carrying the newest seq."""
        while True:
            await self._hint_due.wait()
            self._hint_due = trio.Event()
            seq = self.state.vv.get(self.origin, 0)
            await self.peers.send_hint(f"{self.origin} {seq}".encode())
            await trio.sleep(HINT_MIN_INTERVAL_S)

    async def _hint_listener(self) -> None:
        async with trio.open_nursery() as nursery, self.peers.hints() as hints:
            async for payload in hints:
                try:
                    origin, seq_text = payload.decode().split(" ")
                    seq = int(seq_text)
                except ValueError:
                    continue
                if self.state.vv.get(origin, 0) >= seq:
                    continue
                node = origin.split("/", 1)[0]
                peer = next((p for p in self.peers.alive_peers() if p.name == node), None)
                if peer is not None and peer.name not in self._pulling:
                    nursery.start_soon(self._pull_quietly, peer)

    async def _anti_entropy(self) -> None:
        rng = random.Random()
        while True:
            await trio.sleep(ANTI_ENTROPY_S * (0.5 + rng.random()))
            peers = self.peers.alive_peers()
            if peers:
                await self._pull_quietly(rng.choice(peers))

    async def _collect_tombstones(self) -> None:
        """Drop tombstones once every member that may come back has seen them.

        Peers' vectors are learnt from pulls in both directions; an old vector
        only under-states what a peer holds, so using it is safe (it delays
        collection).  A member with no known vector blocks collection."""
        while True:
            await trio.sleep(self.gc_interval_s)
            names = self.peers.electorate()
            vectors = [self.peer_vectors.get(n) for n in names]
            known = [v for v in vectors if v is not None]
            if len(known) != len(vectors):
                continue
            try:
                dropped = await self._owned(partial(self.store.collect_tombstones, known))
            except StoreError:
                continue  # logged, and shown as degraded; tried again next round
            if dropped:
                self.stats["collected"] += len(dropped)
                log.info("collected %d tombstones", len(dropped))

    async def catch_up(self) -> None:
        """Pull from every alive peer (a new leader does this before it allocates
        unique names, so that it knows its predecessor's last allocations)."""
        async with trio.open_nursery() as nursery:
            for peer in self.peers.alive_peers():
                nursery.start_soon(self._pull_quietly, peer)

    async def _initial_sync(self) -> None:
        """A new (or returning) node copies what it lacks from one alive peer."""
        peers = self.peers.alive_peers()
        for peer in random.sample(peers, k=len(peers)):
            if await self._pull_quietly(peer):
                return

    async def _pull_quietly(self, peer: Peer) -> bool:
        if peer.name in self._pulling:
            return False
        self._pulling.add(peer.name)
        try:
            with trio.move_on_after(PULL_TIMEOUT_S):
                await self.pull(peer)
                return True
            log.warning("pull from %s timed out", peer.name)
        except StaleReplicaError:
            self.stats["pull_failures"] += 1
        except Exception as exc:
            # One attempt (see _push): logged, counted and tried again later.
            self.stats["pull_failures"] += 1
            log.info("pull from %s failed: %s", peer.name, str(exc) or type(exc).__name__)
        finally:
            self._pulling.discard(peer.name)
        return False

    async def pull(self, peer: Peer) -> int:
        """Fetch and apply every entry ``peer`` has that this replica lacks."""
        request = pack({"v": WIRE_VERSION, "vv": dict(self.state.vv), "node": self.origin})
        applied = 0
        async with self.http.stream(
            "POST",
            f"http://{peer.api}/v1/internal/state/sync",
            content=request,
            headers={"Content-Type": MSGPACK},
            # 30 s between chunks of a big copy, but a peer behind a partition (its
            # SYNs dropped) is given up in 2 s: a node restarted inside a partition
            # tries every peer it still believes alive before it is ready.
            timeout=httpx.Timeout(30.0, connect=2.0),
        ) as resp:
            if resp.status_code != 200:
                raise ValueError(f"sync answered {resp.status_code}")
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=256 << 20)
            async for chunk in resp.aiter_bytes():
                unpacker.feed(chunk)
                for wire in unpacker:
                    applied += len(await self.receive(wire))
                    delta = wire.get("delta") if isinstance(wire, dict) else None
                    if isinstance(delta, dict) and delta.get("complete"):
                        self.peer_vectors[peer.name] = dict(delta.get("vv", {}))
        self.stats["pulls"] += 1
        return applied

    async def sync_chunks(self, vv: VersionVector) -> AsyncIterator[bytes]:
        """Serve a pull: the delta for ``vv`` as msgpack chunks, the last one complete."""

        def chunks() -> list[bytes]:
            delta = self.store.delta_since(vv)
            entries = delta.entries
            out = []
            for start in range(0, max(len(entries), 1), CHUNK_ENTRIES):
                part = entries[start : start + CHUNK_ENTRIES]
                last = start + CHUNK_ENTRIES >= len(entries)
                try:
                    out.append(pack(envelope(Delta(part, delta.vv, delta.horizon, last))))
                except PACK_ERRORS:
                    # An entry no peer can read must not fail every pull from here.
                    good = tuple(packable(part))
                    self.stats["skipped_unencodable"] += len(part) - len(good)
                    out.append(pack(envelope(Delta(good, delta.vv, delta.horizon, last))))
            return out

        for chunk in await trio.to_thread.run_sync(chunks):
            yield chunk

    async def _probe_while_degraded(self) -> None:
        """While commits fail for lack of space, try an empty one now and then, so
        that the node stops reporting degraded once space frees even with no writes."""
        while True:
            await self._degraded_event.wait()
            await trio.sleep(PROBE_INTERVAL_S)
            if self.degraded is not None:
                with contextlib.suppress(StoreError):  # still full: stays degraded
                    await self._owned(self.store.probe)
