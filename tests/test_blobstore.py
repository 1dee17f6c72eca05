"""The blob store on a real temp dir, and the blob service's put/get/gc over fakes."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from flynnp2p.build.blobs import REPLICA_HEADER, BlobService
from flynnp2p.build.blobstore import BlobStore, check_digest
from flynnp2p.errors import ClusterError, NotFound, UserError
from flynnp2p.peering import Peer
from flynnp2p.state.merge import Change, Delete
from flynnp2p.state.records import Artifact, BlobLocation, Record


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def chunked(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await trio.lowlevel.checkpoint()


async def read_all(chunks: AsyncIterator[bytes]) -> tuple[bytes, list[int]]:
    parts = [c async for c in chunks]
    return b"".join(parts), [len(p) for p in parts]


def leftovers(store: BlobStore) -> list[str]:
    return sorted(os.listdir(store.tmp)) if store.tmp.exists() else []


# -- the store ----------------------------------------------------------------


async def test_write_then_stream_back_in_chunks(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", chunk_size=4096)
    data = os.urandom(10_000)
    digest = digest_of(data)
    assert await store.write(digest, chunked(data)) == 10_000
    assert (tmp_path / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes() == data
    assert await store.has(digest) and await store.size(digest) == 10_000
    size, chunks = await store.open(digest)
    body, sizes = await read_all(chunks)
    assert (size, body, sizes) == (10_000, data, [4096, 4096, 1808])
    assert [(b.digest, b.size) for b in await store.list()] == [(digest, 10_000)]
    assert leftovers(store) == []


async def test_mismatch_names_both_digests_and_stores_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    claimed = digest_of(b"what was promised")
    with pytest.raises(UserError) as err:
        await store.write(claimed, chunked(b"what was sent"))
    assert claimed in err.value.message and digest_of(b"what was sent") in err.value.message
    assert not await store.has(claimed)
    assert await store.list() == [] and leftovers(store) == []


async def test_a_write_cut_off_midway_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(50_000)
    digest = digest_of(data)
    reached = trio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield data[:20_000]
        reached.set()
        await trio.sleep_forever()
        yield data[20_000:]  # pragma: no cover

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, digest, stalls())
        await reached.wait()
        assert len(leftovers(store)) == 1  # the partial write is only ever a temp file
        assert not await store.has(digest)
        nursery.cancel_scope.cancel()
    assert not await store.has(digest) and leftovers(store) == []


async def test_a_failing_source_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)

    async def broken() -> AsyncIterator[bytes]:
        yield b"some bytes"
        raise httpx.ReadError("peer went away")

    with pytest.raises(httpx.ReadError):
        await store.write(digest_of(b"some bytes and more"), broken())
    assert await store.list() == [] and leftovers(store) == []


async def test_delete_open_missing_and_crash_leftovers(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = digest_of(b"x")
    await store.write(digest, chunked(b"x"))
    (store.tmp / "in-crashed").write_bytes(b"partial")
    assert await store.clean_temp() == 1 and leftovers(store) == []
    assert await store.delete(digest) is True
    assert await store.delete(digest) is False
    with pytest.raises(NotFound):
        await store.open(digest)


@pytest.mark.parametrize(
    "text",
    ["", "sha256:", "sha256:" + "A" * 64, "sha256:" + "0" * 63, "md5:" + "0" * 32, "0" * 64,
     "sha256:" + "0" * 64 + "/../x"],
)
def test_digest_format(text: str) -> None:
    with pytest.raises(UserError, match="sha256"):
        check_digest(text)
    assert check_digest("sha256:" + "0" * 64) == "sha256:" + "0" * 64


# -- the service, over fakes ---------------------------------------------------


@dataclass
class FakeOutcome:
    replicas: int


@dataclass
class FakeState:
    """Just enough of State: records by class and key."""

    items: dict[tuple[str, str], Record] = field(default_factory=dict)

    def records(self, cls: type[Record]) -> list[Record]:
        return [r for (k, _), r in sorted(self.items.items()) if k == cls.KIND]

    def record(self, cls: type[Record], key: str) -> Record | None:
        return self.items.get((cls.KIND, key))


@dataclass
class FakeReplica:
    state: FakeState = field(default_factory=FakeState)

    async def write(self, changes: Sequence[Change]) -> FakeOutcome:
        for change in changes:
            if isinstance(change, Delete):
                self.state.items.pop((change.kind, change.key), None)
            else:
                self.state.items[(change.KIND, change.key)] = change
        return FakeOutcome(2)


@dataclass
class FakePeers:
    peers: list[Peer] = field(default_factory=list)

    def alive_peers(self) -> list[Peer]:
        return list(self.peers)


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now


def service(
    tmp_path: Path, handler: httpx.MockTransport | None = None, peers: list[Peer] | None = None
) -> tuple[BlobService, FakeReplica, Clock]:
    replica = FakeReplica()
    clock = Clock(int(time.time() * 1000))  # file mtimes are wall-clock
    http = httpx.AsyncClient(transport=handler or httpx.MockTransport(lambda r: httpx.Response(500)))
    blobs = BlobService(
        BlobStore(tmp_path), replica, FakePeers(peers or []), http, "n1", clock,  # type: ignore[arg-type]
        gc_grace_s=60.0,
    )
    return blobs, replica, clock


async def test_put_streams_a_copy_to_a_peer_marked_as_replica(tmp_path: Path) -> None:
    data = os.urandom(3000)
    digest = digest_of(data)
    received: list[httpx.Request] = []

    async def peer(request: httpx.Request) -> httpx.Response:
        received.append(request)
        body = b"".join([c async for c in request.stream])  # type: ignore[union-attr]
        assert body == data
        return httpx.Response(201, json={"digest": digest, "size": 3000, "replicas": 1})

    blobs, replica, _ = service(tmp_path, httpx.MockTransport(peer), [Peer("n2", "n2:7100")])
    assert await blobs.put(digest, chunked(data)) == (3000, 2)
    (request,) = received
    assert request.method == "PUT" and str(request.url) == f"http://n2:7100/v1/blobs/{digest}"
    assert request.headers[REPLICA_HEADER] == "1" and request.headers["Content-Length"] == "3000"
    assert replica.state.record(BlobLocation, f"{digest}@n1") is not None


async def test_put_fails_503_when_no_alive_peer_accepts(tmp_path: Path) -> None:
    blobs, _, _ = service(tmp_path, peers=[Peer("n2", "n2:7100"), Peer("n3", "n3:7100")])
    with pytest.raises(ClusterError, match="n1 only"):
        await blobs.put(digest_of(b"x"), chunked(b"x"))
    # It stays here, recorded: nothing acknowledged was lost, and it can spread later.
    assert await blobs.store.has(digest_of(b"x"))


async def test_alone_a_put_is_acknowledged_with_one_holder(tmp_path: Path) -> None:
    blobs, _, _ = service(tmp_path)
    assert await blobs.put(digest_of(b"x"), chunked(b"x")) == (1, 1)


async def test_get_fetches_from_an_alive_holder_and_records_it(tmp_path: Path) -> None:
    data = os.urandom(5000)
    digest = digest_of(data)
    blobs, replica, clock = service(
        tmp_path,
        httpx.MockTransport(lambda r: httpx.Response(200, content=data)),
        [Peer("n2", "n2:7100")],
    )
    with pytest.raises(NotFound, match="no node holds"):
        await blobs.open(digest)
    await replica.write([BlobLocation(digest=digest, node="n2", size=5000, created_at=clock.now)])
    assert await blobs.size(digest) == 5000
    size, chunks = await blobs.open(digest)
    assert (size, (await read_all(chunks))[0]) == (5000, data)
    assert await blobs.store.has(digest)
    assert replica.state.record(BlobLocation, f"{digest}@n1") is not None


async def test_a_corrupt_copy_on_the_holder_is_not_stored(tmp_path: Path) -> None:
    digest = digest_of(b"right")
    blobs, replica, clock = service(
        tmp_path,
        httpx.MockTransport(lambda r: httpx.Response(200, content=b"wrong")),
        [Peer("n2", "n2:7100")],
    )
    await replica.write([BlobLocation(digest=digest, node="n2", size=5, created_at=clock.now)])
    with pytest.raises(ClusterError, match="digest mismatch"):
        await blobs.open(digest)
    assert not await blobs.store.has(digest)


async def test_holders_that_are_down_are_a_503_not_a_404(tmp_path: Path) -> None:
    digest = digest_of(b"x")
    blobs, replica, clock = service(tmp_path)
    await replica.write([BlobLocation(digest=digest, node="n2", size=1, created_at=clock.now)])
    with pytest.raises(ClusterError, match="down"):
        await blobs.open(digest)


async def test_gc_keeps_referenced_and_young_blobs(tmp_path: Path) -> None:
    blobs, replica, clock = service(tmp_path)
    kept, young, old = digest_of(b"kept"), digest_of(b"young"), digest_of(b"old")
    for d, data in ((kept, b"kept"), (old, b"old")):
        await blobs.put(d, chunked(data))
    stored = {b.digest: b.mtime_ms for b in await blobs.store.list()}
    clock.now = max(stored.values()) + 61_000
    await blobs.put(young, chunked(b"young"))
    os.utime(blobs.store.path(young), ns=(clock.now * 1_000_000,) * 2)
    artifact = Artifact(id="a1", type="slug", uri=f"blob:{kept}", created_at=1, digest=kept)
    await replica.write([artifact])
    assert await blobs.gc() == [old]
    assert sorted(b.digest for b in await blobs.store.list()) == sorted([kept, young])
    assert replica.state.record(BlobLocation, f"{old}@n1") is None
    assert replica.state.record(BlobLocation, f"{kept}@n1") is not None
