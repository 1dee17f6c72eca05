"""Both ends of the replication (`flynnp2p.state.replication`) talking in memory.

Each node is a real `StateService` over a `MemoryStore`; what joins them is an
in-memory network: `MemoryTransport` is a real `Transport` that hands the
bytes a replicator sends to the other replicator's server functions
(`accept_push`, `serve_sync`), exactly as the HTTP edge does, and
`MemoryPeers` a real `Peers` whose hints are broadcast on memory channels.  A
node can be cut off (nobody reaches it, it reaches nobody), or only miss its
pushes.  Virtual time (MockClock) makes the timers' bounds exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio
import trio.testing

from flynnp2p.errors import ClusterError
from flynnp2p.peering import Peer
from flynnp2p.state.errors import RecordError, StaleReplicaError
from flynnp2p.state.merge import Delete
from flynnp2p.state.records import App
from flynnp2p.state.replica import wait_for_record
from flynnp2p.state.replication import ANTI_ENTROPY_S
from flynnp2p.state.service import StateService
from flynnp2p.state.store import MemoryStore
from flynnp2p.state.transport import PeerRefused
from flynnp2p.state.wire import CHUNK_ENTRIES
from tests.harness import wait_for

T0 = 1_700_000_000_000


def app(name: str) -> App:
    return App(id=f"id-{name}", name=name, created_at=T0)


def clock_ms() -> int:
    return T0 + int(trio.current_time() * 1000)


class Network:
    """Nodes by name, and what is broken between them."""

    def __init__(self, cut_bytes: int = 997) -> None:
        self.nodes: dict[str, StateService] = {}
        self.alive: set[str] = set()  # started, and not stopped
        self.cut: set[str] = set()  # partitioned away: reach nobody, reached by nobody
        self.no_pushes: set[str] = set()  # pushes to these are lost
        self.hint_inboxes: dict[str, trio.MemorySendChannel[bytes]] = {}
        self.cut_bytes = cut_bytes  # sync replies are re-cut into pieces this long
        self.chunks_served = 0

    def node(
        self, name: str, store: MemoryStore | None = None, gc_interval_s: float = 60.0
    ) -> StateService:
        service = StateService(
            store or MemoryStore(name), MemoryPeers(self, name), MemoryTransport(self, name),
            clock_ms, gc_interval_s,
        )  # fmt: skip
        self.nodes[name] = service
        return service

    async def start(self, nursery: trio.Nursery, *names: str) -> None:
        for name in names:
            await nursery.start(self.nodes[name].run)
            self.alive.add(name)

    def reachable(self, a: str, b: str) -> bool:
        return b in self.alive and a not in self.cut and b not in self.cut


class MemoryPeers:
    def __init__(self, net: Network, name: str) -> None:
        self.net = net
        self.name = name

    def alive_peers(self) -> list[Peer]:
        return [
            Peer(n, f"mem:{n}") for n in sorted(self.net.nodes)
            if n != self.name and self.net.reachable(self.name, n)
        ]  # fmt: skip

    def electorate(self) -> list[str]:
        return sorted(n for n in self.net.nodes if n != self.name)

    async def send_hint(self, payload: bytes) -> None:
        for name, inbox in self.net.hint_inboxes.items():
            if name != self.name and self.net.reachable(self.name, name):
                inbox.send_nowait(payload)

    @asynccontextmanager
    async def hints(self) -> AsyncIterator[AsyncIterator[bytes]]:
        send, recv = trio.open_memory_channel[bytes](1000)
        self.net.hint_inboxes[self.name] = send
        try:
            yield recv
        finally:
            del self.net.hint_inboxes[self.name]


class MemoryTransport:
    """Calls the other side's server half with the bytes an HTTP body would carry."""

    def __init__(self, net: Network, name: str) -> None:
        self.net = net
        self.name = name

    def _target(self, peer: Peer) -> StateService:
        if not self.net.reachable(self.name, peer.name):
            raise ConnectionRefusedError(f"{peer.name} is unreachable")
        return self.net.nodes[peer.name]

    async def push(self, peer: Peer, body: bytes) -> None:
        target = self._target(peer)
        if peer.name in self.net.no_pushes:
            raise ConnectionResetError("push lost")
        try:
            await target.replication.accept_push(msgpack.unpackb(body, raw=False))
        except (RecordError, StaleReplicaError) as exc:
            raise PeerRefused(f"answered {type(exc).__name__}: {exc}") from None

    @asynccontextmanager
    async def sync(self, peer: Peer, request: bytes) -> AsyncIterator[AsyncIterator[bytes]]:
        target = self._target(peer)
        try:
            chunks = target.replication.serve_sync(msgpack.unpackb(request, raw=False))
        except RecordError as exc:
            raise PeerRefused(f"sync answered 400: {exc}") from None

        async def pieces() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                self.net.chunks_served += 1
                for i in range(0, len(chunk), self.net.cut_bytes):
                    yield chunk[i : i + self.net.cut_bytes]

        yield pieces()


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps once every task has been idle 10 ms of real time
    (the stores' worker threads would race a zero threshold)."""
    return trio.testing.MockClock(autojump_threshold=0.01)


async def test_a_write_is_acknowledged_once_every_alive_peer_holds_it(
    clock: trio.testing.MockClock,
) -> None:
    net = Network()
    n1, n2, n3 = (net.node(n) for n in ("n1", "n2", "n3"))
    async with trio.open_nursery() as nursery:
        await net.start(nursery, "n1", "n2", "n3")
        result = await n1.write([app("web")])
        assert result.replicas == 3
        # pushed and committed on both before the write returned
        assert n2.state.record(App, "id-web") == n3.state.record(App, "id-web") == app("web")
        assert n1.stats["pushes"] == 1 and n1.stats["push_failures"] == 0
        nursery.cancel_scope.cancel()


async def test_a_lost_push_fails_the_write_and_the_hint_brings_it_at_once(
    clock: trio.testing.MockClock,
) -> None:
    net = Network()
    n1, n2 = net.node("n1"), net.node("n2")
    async with trio.open_nursery() as nursery:
        await net.start(nursery, "n1", "n2")
        net.no_pushes.add("n2")
        with pytest.raises(ClusterError, match="none of 1 alive peers"):
            await n1.write([app("web")])
        assert n1.stats["push_failures"] == 1
        # Anti-entropy's first pull comes at ANTI_ENTROPY_S / 2 at the earliest:
        # before that, only the hint (and the pull it starts) can bring the write.
        with trio.fail_after(ANTI_ENTROPY_S / 2 - 0.1):
            await wait_for_record(n2, App, "id-web")
        assert n2.stats["pulls"] >= 1
        nursery.cancel_scope.cancel()


async def test_anti_entropy_repairs_a_node_that_heard_nothing(
    clock: trio.testing.MockClock,
) -> None:
    net = Network()
    n1, n2, n3 = (net.node(n) for n in ("n1", "n2", "n3"))
    async with trio.open_nursery() as nursery:
        await net.start(nursery, "n1", "n2", "n3")
        net.cut.add("n3")
        assert (await n1.write([app("web")])).replicas == 2
        await trio.sleep(10 * ANTI_ENTROPY_S)
        assert n3.state.record(App, "id-web") is None  # cut off: nothing reaches it
        net.cut.discard("n3")
        # hints are gone for good; the next anti-entropy round (1.5 x at most) repairs
        with trio.fail_after(1.5 * ANTI_ENTROPY_S + 0.1):
            await wait_for_record(n3, App, "id-web")
        assert n2.state.record(App, "id-web") == app("web")
        nursery.cancel_scope.cancel()


async def test_a_new_node_holds_a_full_copy_before_it_reports_started(
    clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore("n1")
    many = [app(f"a{i}") for i in range(CHUNK_ENTRIES + 500)]
    store.write(many, physical_ms=T0)
    net = Network()
    n1, n2 = net.node("n1", store), net.node("n2")
    async with trio.open_nursery() as nursery:
        await net.start(nursery, "n1")
        await net.start(nursery, "n2")
        assert list(n2.state.entries()) == list(n1.state.entries())
        assert n2.state.vv == n1.state.vv
        assert net.chunks_served == 2  # 2,500 entries: a full chunk, then the last
        nursery.cancel_scope.cancel()


async def test_a_malformed_sync_request_is_refused_before_anything_is_sent() -> None:
    net = Network()
    n1 = net.node("n1")
    with pytest.raises(RecordError, match="unsupported wire version"):
        n1.replication.serve_sync({"v": 99, "vv": {}})
    with pytest.raises(RecordError, match="vv"):
        n1.replication.serve_sync({"v": 1, "vv": ["not", "a", "map"]})


async def test_tombstones_are_collected_only_once_every_member_has_seen_them(
    clock: trio.testing.MockClock,
) -> None:
    net = Network()
    nodes = [net.node(n, gc_interval_s=5.0) for n in ("n1", "n2", "n3")]
    n1, n2, n3 = nodes
    async with trio.open_nursery() as nursery:
        await net.start(nursery, "n1", "n2", "n3")
        net.cut.add("n3")
        await n1.write([app("web")])
        await n1.write([Delete("app", "id-web")])
        assert n2.state.get("app", "id-web") is not None  # the tombstone

        # n3 may come back and has never said what it holds: nobody collects
        await trio.sleep(30.0)
        assert n1.stats["collected"] == n2.stats["collected"] == 0
        assert n1.state.get("app", "id-web") is not None

        # back: it pulls the tombstone, vectors travel both ways, all collect
        net.cut.discard("n3")
        await wait_for(
            lambda: all(n.stats["collected"] == 1 for n in nodes),
            60.0,
            "every node to collect",
            0.5,
        )
        assert all(n.state.get("app", "id-web") is None for n in nodes)
        assert n1.state.vv == n2.state.vv == n3.state.vv
        nursery.cancel_scope.cancel()
