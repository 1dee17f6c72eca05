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

Watch.  ``subscribe`` registers the subscriber and takes the snapshot without a
checkpoint in between, so no change falls in a gap; subscribers that fall
behind their bounded buffer are closed (they resubscribe).  Applied entries are
also kept in a bounded ring with local event ids for ``/v1/events`` resumption.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import httpx
import msgpack
import trio

from flynnp2p.errors import ClusterError
from flynnp2p.state.errors import RecordError, StaleReplicaError
from flynnp2p.state.merge import Change, Delta, Entry, State, VersionVector, delta_of
from flynnp2p.state.store import StateStore

log = logging.getLogger(__name__)

HINT_EVENT = "f2p-st"
PUSH_TIMEOUT_S = 3.0
PULL_TIMEOUT_S = 120.0
ANTI_ENTROPY_S = 3.0
HINT_MIN_INTERVAL_S = 0.2
CHUNK_ENTRIES = 2000
EVENT_RING = 10_000
SUBSCRIBER_BUFFER = 1024
MSGPACK = "application/x-msgpack"


@dataclass(frozen=True)
class Peer:
    name: str
    api: str  # "host:port"


class Peers(Protocol):
    """What replication needs from membership (the gossip service in the agent)."""

    def alive_peers(self) -> list[Peer]: ...

    def electorate(self) -> list[str]:
        """Names of the other members that may come back (alive or failed, not left)."""
        ...

    async def send_hint(self, payload: bytes) -> None:
        """Best effort: a lost hint only delays propagation until anti-entropy."""

    def hints(self) -> Any:  # async context manager yielding an async iterator of bytes
        ...


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


@dataclass
class _Apply:
    wire: Any  # an envelope (decoded in the worker thread)
    done: trio.Event = field(default_factory=trio.Event)
    applied: list[Entry] = field(default_factory=list)
    error: BaseException | None = None


WIRE_VERSION = 1


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def envelope(delta: Delta) -> dict[str, Any]:
    """Every message between peers carries the wire version."""
    return {"v": WIRE_VERSION, "delta": delta.to_wire()}


def check_version(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RecordError("message", "expected a map")
    if message.get("v") != WIRE_VERSION:
        raise RecordError(
            "message.v", f"unsupported wire version {message.get('v')!r}; this node speaks {WIRE_VERSION}"
        )
    return message


def open_envelope(message: Any) -> Delta:
    return Delta.from_wire(check_version(message).get("delta"))


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
        self.stats = {"pushes": 0, "pulls": 0, "pull_failures": 0, "resets": 0, "collected": 0}

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
                    op.result = await trio.to_thread.run_sync(op.fn)
                    op.done.set()

    async def _commit_writes(self, writes: list[_Write]) -> None:
        changes = [c for w in writes for c in w.changes]
        now = self.clock_ms()
        try:
            entries = await trio.to_thread.run_sync(
                lambda: self.store.write(changes, physical_ms=now)
            )
        except Exception as exc:  # a failed commit fails every write of the batch
            log.exception("local commit failed")
            for w in writes:
                w.error = ClusterError(f"the local commit failed: {exc}")
                w.done.set()
            return
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
        else:
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
        body = pack(envelope(delta_of(self.state, entries)))
        acks = 0

        async def one(peer: Peer) -> None:
            nonlocal acks
            try:
                r = await self.http.post(
                    f"http://{peer.api}/v1/internal/state/push",
                    content=body,
                    headers={"Content-Type": MSGPACK},
                    timeout=PUSH_TIMEOUT_S,
                )
            except httpx.HTTPError as exc:
                log.debug("push to %s failed: %s", peer.name, exc)
                return
            if r.status_code == 200:
                acks += 1
            else:
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
            dropped = await self._owned(partial(self.store.collect_tombstones, known))
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
        except (httpx.HTTPError, RecordError, ValueError, msgpack.UnpackException) as exc:
            self.stats["pull_failures"] += 1
            log.info("pull from %s failed: %s", peer.name, exc)
        except StaleReplicaError:
            self.stats["pull_failures"] += 1
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
            timeout=httpx.Timeout(30.0),
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
                out.append(pack(envelope(Delta(part, delta.vv, delta.horizon, last))))
            return out

        for chunk in await trio.to_thread.run_sync(chunks):
            yield chunk
