"""Replication between replicas: both ends of push, pull, hints and anti-entropy.

Theory of operation
-------------------
The `Replicator` does not touch the store: it reads the replica's immutable
snapshot (`Local.state`) and hands every mutation (a peer's delta, a tombstone
collection) to the replica's owner task (`Local.receive`,
`Local.collect_tombstones`).  It reaches peers through a `Transport` (HTTP in the
agent, `flynnp2p.state.transport`) and learns who they are from `Peers`
(gossip, `flynnp2p.peering`).  Messages are `flynnp2p.state.wire`'s.

Durability.  The owner hands each committed local write to `replicate`; the push
task batches them (up to `CHUNK_ENTRIES` entries), pushes the batch to every
alive peer at once, and resolves each write when the round ends: acknowledged by
``1 + acks`` nodes, or, when peers are alive but none answered, a `ClusterError`
(503): the write is committed here and will still spread, but nobody else is
known to hold it.

Propagation.  After a commit a hint (serf user event, `wire.hint`) tells everyone
that an origin has new writes, at most one per `HINT_MIN_INTERVAL_S`; a node that
lacks them pulls from the origin's node.  Anti-entropy pulls from a random alive
peer every few seconds to repair anything lost; a pull sends this replica's
version vector and gets back, streamed in chunks, every entry it lacks.  A new
node pulls a full copy before `run` reports started.  A push or pull that fails,
for whatever reason, is one failed attempt: it is logged and counted, and hints
and anti-entropy pull again.

Serving.  `accept_push` and `serve_sync` are the server half (the HTTP edge,
`flynnp2p.api.internal`, only decodes and delegates).  An entry that cannot be
encoded when serving a pull is skipped and counted rather than failing the pull.

Tombstones.  A tombstone is dropped once every member that may come back has
seen it.  Peers' vectors are learnt from pulls in both directions (the puller's
vector from its request, the served peer's from the last, complete chunk) and
sent to the collection task, which alone holds them.  An old vector only
under-states what a peer holds, so using one is safe (it delays collection); a
member with no known vector blocks collection.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from flynnp2p.errors import ClusterError
from flynnp2p.peering import Peer, Peers
from flynnp2p.state.errors import StaleReplicaError, StoreError
from flynnp2p.state.merge import Delta, Entry, VersionVector, delta_of
from flynnp2p.state.replica import Readable
from flynnp2p.state.transport import PUSH_TIMEOUT_S, PeerRefused, Transport
from flynnp2p.state.wire import (
    CHUNK_ENTRIES,
    chunked,
    complete_vector,
    hint,
    message_reader,
    open_hint,
    open_sync_request,
    pack_delta,
    sync_request,
)

log = logging.getLogger(__name__)

PUSH_ROUND_S = PUSH_TIMEOUT_S + 1  # a push round waits no longer for acknowledgements
PULL_TIMEOUT_S = 120.0
ANTI_ENTROPY_S = 3.0
HINT_MIN_INTERVAL_S = 0.2
PENDING_BUFFER = 256
VECTOR_BUFFER = 256


class Local(Readable, Protocol):
    """The replica as replication sees it (`flynnp2p.state.service.StateService`)."""

    @property
    def origin(self) -> str: ...

    async def receive(self, wire: Any) -> list[Entry]:
        """Apply a peer's envelope through the owner; the entries it changed.
        RecordError if malformed, StaleReplicaError if this replica had to reset."""
        ...

    async def collect_tombstones(self, vectors: list[VersionVector]) -> list[Entry]:
        """Drop, through the owner, the tombstones all `vectors` cover; StoreError if it fails."""
        ...

    def delta_since(self, vv: VersionVector) -> Delta:
        """What the holder of `vv` lacks (blocking: called in a worker thread)."""
        ...


@dataclass
class Pending:
    """A committed local write waiting for peers; resolved by the push task."""

    entries: list[Entry]
    done: trio.Event = field(default_factory=trio.Event)
    replicas: int = 0
    error: ClusterError | None = None


class Replicator:
    def __init__(
        self, local: Local, peers: Peers, transport: Transport, gc_interval_s: float = 60.0
    ) -> None:
        self.local = local
        self.peers = peers
        self.transport = transport
        self.gc_interval_s = gc_interval_s
        self._pending_send, self._pending_recv = trio.open_memory_channel[Pending](PENDING_BUFFER)
        self._vectors_send, self._vectors_recv = trio.open_memory_channel[
            tuple[str, VersionVector]
        ](VECTOR_BUFFER)
        self._hint_due = trio.Event()
        self._pulling: set[str] = set()
        self.stats = {
            "pushes": 0, "push_failures": 0, "pulls": 0, "pull_failures": 0,
            "collected": 0, "skipped_unencodable": 0,
        }  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Started once this replica holds what one alive peer has (or none answered).
        The owner must run already: pulls apply through it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._push_rounds)
            await self._initial_sync()
            nursery.start_soon(self._hint_sender)
            nursery.start_soon(self._hint_listener)
            nursery.start_soon(self._anti_entropy)
            nursery.start_soon(self._collect_tombstones)
            task_status.started()

    # -- durability: push to every alive peer --------------------------------

    async def replicate(self, pending: Pending) -> None:
        """Hand a committed local write over: it is pushed, and hinted."""
        self._hint_due.set()
        await self._pending_send.send(pending)

    async def _push_rounds(self) -> None:
        while True:
            first = await self._pending_recv.receive()
            batch = [first]
            while sum(len(p.entries) for p in batch) < CHUNK_ENTRIES:
                try:
                    batch.append(self._pending_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            entries = [e for p in batch for e in p.entries]
            peers = self.peers.alive_peers()
            acks = await self._push(peers, entries) if peers and entries else 0
            for p in batch:
                if peers and acks == 0:
                    p.error = ClusterError(
                        f"the write is committed on this node but none of {len(peers)} alive "
                        "peers acknowledged it in time; it will spread when they are reachable"
                    )
                p.replicas = 1 + acks
                p.done.set()

    async def _push(self, peers: list[Peer], entries: list[Entry]) -> int:
        # Entries and vector from one snapshot (delta_of drops entries that a
        # later write already replaced), so the receiver's horizon check holds.
        # Nothing should be left out (writes are checked before they commit); if
        # something is, push what encodes and leave the rest to the logged skip.
        body, skipped = pack_delta(delta_of(self.local.state, entries))
        self.stats["skipped_unencodable"] += skipped
        acks = 0

        async def one(peer: Peer) -> None:
            nonlocal acks
            # One attempt: whatever fails it (the network, an error answer) leaves
            # the entries to hints and anti-entropy, and must not end the push task
            # (the agent with it). Peers' addresses are checked by `alive_peers`;
            # this catch is what is left if anything else still gets through.
            try:
                await self.transport.push(peer, body)
            except PeerRefused as exc:
                self.stats["push_failures"] += 1
                log.warning("push to %s %s", peer.name, exc)
                return
            except Exception as exc:
                self.stats["push_failures"] += 1
                log.info("push to %s failed: %s", peer.name, str(exc) or type(exc).__name__)
                return
            acks += 1

        with trio.move_on_after(PUSH_ROUND_S):
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
            origin = self.local.origin
            await self.peers.send_hint(hint(origin, self.local.state.vv.get(origin, 0)))
            await trio.sleep(HINT_MIN_INTERVAL_S)

    async def _hint_listener(self) -> None:
        async with trio.open_nursery() as nursery, self.peers.hints() as hints:
            async for payload in hints:
                heard = open_hint(payload)
                if heard is None:
                    continue
                origin, seq = heard
                if self.local.state.vv.get(origin, 0) >= seq:
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
        request = sync_request(self.local.state.vv, self.local.origin)
        applied = 0
        async with self.transport.sync(peer, request) as chunks:
            reader = message_reader()
            async for chunk in chunks:
                reader.feed(chunk)
                for message in reader:
                    applied += len(await self.local.receive(message))
                    vv = complete_vector(message)
                    if vv is not None:
                        self._learn(peer.name, vv)
        self.stats["pulls"] += 1
        return applied

    # -- the server half -----------------------------------------------------

    async def accept_push(self, message: Any) -> int:
        """Serve a peer's push: apply it through the owner; how many entries it
        changed.  RecordError if malformed; StaleReplicaError if this replica had
        to reset (it refills by pulling)."""
        return len(await self.local.receive(message))

    def serve_sync(self, message: Any) -> AsyncIterator[bytes]:
        """Serve a pull: the chunks of what the puller lacks (see `sync_chunks`).
        RecordError, before anything is sent, if the request is malformed."""
        vv, node = open_sync_request(message)
        if node is not None:
            self._learn(node.split("/", 1)[0], vv)
        return self.sync_chunks(vv)

    async def sync_chunks(self, vv: VersionVector) -> AsyncIterator[bytes]:
        """The delta for ``vv`` as msgpack chunks, the last one complete."""

        def packed() -> tuple[list[bytes], int]:
            out, skipped = [], 0
            for part in chunked(self.local.delta_since(vv)):
                body, left_out = pack_delta(part)  # an entry no peer can read fails no pull
                out.append(body)
                skipped += left_out
            return out, skipped

        chunks, skipped = await trio.to_thread.run_sync(packed)
        self.stats["skipped_unencodable"] += skipped
        for chunk in chunks:
            yield chunk

    # -- tombstones ------------------------------------------------------------

    def _learn(self, name: str, vv: VersionVector) -> None:
        """Tell the collection task what `name` holds. Dropped if it is behind:
        a vector not learnt only delays collection."""
        try:
            self._vectors_send.send_nowait((name, vv))
        except trio.WouldBlock:
            log.debug("vector of %s not recorded: the tombstone collection is behind", name)

    async def _collect_tombstones(self) -> None:
        """Every gc_interval_s, drop the tombstones every member that may come back has seen."""
        vectors: dict[str, VersionVector] = {}
        while True:
            with trio.move_on_after(self.gc_interval_s):
                async for name, vv in self._vectors_recv:
                    vectors[name] = vv
            known = [vectors.get(n) for n in self.peers.electorate()]
            if any(v is None for v in known):
                continue
            try:
                dropped = await self.local.collect_tombstones([v for v in known if v is not None])
            except StoreError:
                continue  # logged, and shown as degraded; tried again next round
            if dropped:
                self.stats["collected"] += len(dropped)
                log.info("collected %d tombstones", len(dropped))
