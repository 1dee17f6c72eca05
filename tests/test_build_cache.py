"""The build cache in the blobstore (`flynnp2p.build.cache`) and a build's log lines
(`flynnp2p.build.buildlog`): real files, a real `BlobService` (alone: no peers),
the replicated state faked as in test_blobstore. "Another node" is another cache
root over the same blobstore and state: what is restored there came from the blob."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from flynnp2p.build.blobs import BlobService
from flynnp2p.build.buildlog import BATCH_LINES, BuildLog
from flynnp2p.build.cache import BuildCaches, pack, scan, unpack
from flynnp2p.host.loghub import LogHub
from flynnp2p.state.records import BlobLocation, BuildCache
from tests.test_blobstore import FakeReplica, service


class Said:
    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def fill(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def caches(
    tmp_path: Path, node: str, blobs: BlobService, replica: FakeReplica, **kw: int
) -> BuildCaches:
    return BuildCaches(
        tmp_path / node / "cache", blobs=blobs, state=replica, node=node,  # type: ignore[arg-type]
        now_ms=lambda: 1234, **kw,
    )  # fmt: skip


def test_pack_unpack_round_trip_and_fingerprint(tmp_path: Path) -> None:
    src = fill(tmp_path / "src", {"uv/wheels/a.whl": b"wheel", "npm/_cacache/x": b"y" * 5000})
    os.symlink("a.whl", src / "uv" / "wheels" / "latest")
    os.link(src / "uv" / "wheels" / "a.whl", src / "uv" / "a-linked.whl")
    os.mkfifo(src / "fifo")  # not a cache's: left out
    before = scan(src)
    digest, size = pack(src, tmp_path / "c.tgz")
    assert digest.startswith("sha256:") and size == (tmp_path / "c.tgz").stat().st_size
    unpack(tmp_path / "c.tgz", tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "uv/wheels/a.whl").read_bytes() == b"wheel"
    assert os.readlink(out / "uv/wheels/latest") == "a.whl"
    assert (out / "uv/a-linked.whl").read_bytes() == b"wheel"
    assert not (out / "fifo").exists()
    assert before.files == 3 and before.size == 5 + 5 + 5000
    (src / "uv/wheels/a.whl").write_bytes(b"wheel2")
    assert scan(src).fingerprint != before.fingerprint


def test_unpack_refuses_a_member_escaping_the_directory(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tgz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.TarError):
        unpack(bad, tmp_path / "out")
    assert not (tmp_path / "escaped").exists()


async def test_saved_on_one_node_restored_on_another(tmp_path: Path) -> None:
    blobs, replica, clock = service(tmp_path / "blobs")
    n1, n2 = caches(tmp_path, "n1", blobs, replica), caches(tmp_path, "n2", blobs, replica)
    said = Said()
    # A first build on n1: no record, the (empty) local directory is used.
    d1 = await n1.restore("app-1", said)
    assert list(d1.iterdir()) == [] and said.lines == []
    fill(d1, {"pip/http/dep-1.0.tar.gz": b"dependency"})
    await n1.save("app-1", tmp_path, said)
    record = replica.state.record(BuildCache, "app-1")
    assert isinstance(record, BuildCache) and record.node == "n1", said.text
    assert "Build cache saved" in said.text
    assert list(tmp_path.glob("cache-*.tgz")) == []  # the packed file was put, then removed

    # The next build, on n2: restored from the blob.
    d2 = await n2.restore("app-1", said)
    assert (d2 / "pip/http/dep-1.0.tar.gz").read_bytes() == b"dependency"
    assert "Build cache restored from node n1" in said.lines[-1]
    # A build that changes nothing in it: not packed nor stored again.
    await n2.save("app-1", tmp_path, said)
    assert n2.stats["unchanged"] == 1 and replica.state.record(BuildCache, "app-1") == record

    # Back on n1, whose directory is still the recorded cache: used as it is.
    await n1.restore("app-1", said)
    assert "this node's" in said.lines[-1]
    # n2 adds to it and saves; n1's directory is now behind and is replaced.
    fill(d2, {"pip/http/dep-2.0.tar.gz": b"two"})
    await n2.save("app-1", tmp_path, said)
    newer = replica.state.record(BuildCache, "app-1")
    assert isinstance(newer, BuildCache) and newer.node == "n2" and newer.digest != record.digest
    await n1.restore("app-1", said)
    assert sorted(p.name for p in (d1 / "pip/http").iterdir()) == [
        "dep-1.0.tar.gz",
        "dep-2.0.tar.gz",
    ]
    # The blobstore's collection keeps the recorded cache, not the one it replaced.
    clock.now += 120_000  # past the grace period
    removed = await blobs.gc()
    assert record.digest in removed and newer.digest not in removed


async def test_a_cache_that_cannot_be_restored_makes_the_build_cold(tmp_path: Path) -> None:
    blobs, replica, _ = service(tmp_path / "blobs")
    n2 = caches(tmp_path, "n2", blobs, replica)
    stale = fill(n2.dir("app-1"), {"old": b"stale"})
    gone = BuildCache(app_id="app-1", digest="sha256:" + "0" * 64, size=10, node="n1", updated_at=1)
    await replica.write([gone])
    said = Said()
    d = await n2.restore("app-1", said)
    assert d == stale and list(d.iterdir()) == []
    assert "could not be restored" in said.text and "building without it" in said.text
    assert n2.stats["restore_failed"] == 1

    # A corrupt blob (not a gzip tar), stored under its own digest: cold too.
    digest, _ = await put_bytes(blobs, b"not a tarball")
    await replica.write(
        [BuildCache(app_id="app-1", digest=digest, size=13, node="n1", updated_at=2)]
    )
    fill(d, {"x": b"y"})
    await n2.restore("app-1", said)
    assert list(d.iterdir()) == [] and n2.stats["restore_failed"] == 2


async def put_bytes(blobs: BlobService, data: bytes) -> tuple[str, int]:
    async def chunks() -> AsyncIterator[bytes]:
        yield data

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    size, _ = await blobs.put(digest, chunks())
    return digest, size


async def test_a_cache_over_its_bound_is_not_stored(tmp_path: Path) -> None:
    blobs, replica, _ = service(tmp_path / "blobs")
    n1 = caches(tmp_path, "n1", blobs, replica, max_bytes=1000)
    said = Said()
    d = await n1.restore("app-1", said)
    fill(d, {"big": b"z" * 2000})
    await n1.save("app-1", tmp_path, said)
    assert replica.state.record(BuildCache, "app-1") is None
    assert "over its bound of" in said.text and n1.stats["too_big"] == 1


def scratch_of(c: BuildCaches) -> list[str]:
    return sorted(p.name for p in c.root.iterdir() if ".restore-" in p.name or ".old-" in p.name)


async def test_a_push_beginning_fetches_the_cache_ahead_and_the_restore_takes_it(
    tmp_path: Path,
) -> None:
    blobs, replica, _ = service(tmp_path / "blobs")
    n1, n2 = caches(tmp_path, "n1", blobs, replica), caches(tmp_path, "n2", blobs, replica)
    said = Said()
    fill(await n1.restore("app-1", said), {"uv/a.whl": b"wheel"})
    await n1.save("app-1", tmp_path, said)
    n2.prefetch("app-1")  # not running yet: nothing starts
    assert n2._prefetches == {}
    async with trio.open_nursery() as nursery:
        await nursery.start(n2.run)
        n2.prefetch("app-1")
        n2.prefetch("app-1")  # (the push's second request: one prefetch)
        await n2._prefetches["app-1"].done.wait()
        assert n2.stats["prefetched"] == 1 and len(scratch_of(n2)) == 1

        async def unreachable(digest: str) -> Path:
            raise AssertionError("the restore fetched the blob again")

        real_local_path, blobs.local_path = blobs.local_path, unreachable  # type: ignore[method-assign]
        d = await n2.restore("app-1", said)
        assert (d / "uv/a.whl").read_bytes() == b"wheel"
        assert "Build cache restored from node n1" in said.lines[-1]
        assert scratch_of(n2) == [] and n2._prefetches == {}

        # Ahead of a push to the node whose directory is current: nothing to unpack.
        n1.prefetch("app-1")  # (n1 is not running: a no-op; n2 is current too now)
        n2.prefetch("app-1")
        await n2._prefetches["app-1"].done.wait()
        assert n2.stats["prefetched"] == 1 and scratch_of(n2) == []
        await n2.restore("app-1", said)
        assert "this node's" in said.lines[-1]
        blobs.local_path = real_local_path  # type: ignore[method-assign]

        # One fetched ahead, then a newer cache saved elsewhere before the push's
        # restore: the old one is dropped and the newer one restored.
        n3 = caches(tmp_path, "n3", blobs, replica)
        await nursery.start(n3.run)
        n3.prefetch("app-1")
        await n3._prefetches["app-1"].done.wait()
        fill(n1.dir("app-1"), {"uv/b.whl": b"newer"})
        await n1.save("app-1", tmp_path, said)
        d3 = await n3.restore("app-1", said)
        assert (d3 / "uv/b.whl").read_bytes() == b"newer"
        assert n3.stats["prefetch_unused"] == 1 and scratch_of(n3) == []
        nursery.cancel_scope.cancel()


async def test_a_failed_prefetch_leaves_the_restore_to_say_why(tmp_path: Path) -> None:
    blobs, replica, _ = service(tmp_path / "blobs")
    n2 = caches(tmp_path, "n2", blobs, replica)
    digest, _ = await put_bytes(blobs, b"not a tarball")
    await replica.write([BuildCache(app_id="app-1", digest=digest, size=13, node="n1", updated_at=2)])
    said = Said()
    async with trio.open_nursery() as nursery:
        await nursery.start(n2.run)
        n2.prefetch("app-1")
        await n2._prefetches["app-1"].done.wait()
        assert n2.stats["prefetch_failed"] == 1 and scratch_of(n2) == []
        await n2.restore("app-1", said)
        assert "could not be restored" in said.text and n2.stats["restore_failed"] == 1
        nursery.cancel_scope.cancel()


async def test_restores_an_earlier_agent_left_half_done_go_when_it_starts(tmp_path: Path) -> None:
    blobs, replica, _ = service(tmp_path / "blobs")
    root = tmp_path / "n2" / "cache"
    for name in ("app-1", "app-1.restore-dead1234", "app-1.old-5678abcd"):
        fill(root / name, {"f": b"x"})
    old = os.stat(root).st_mtime - 10
    for name in ("app-1.restore-dead1234", "app-1.old-5678abcd"):
        os.utime(root / name, (old, old))
    n2 = caches(tmp_path, "n2", blobs, replica)
    async with trio.open_nursery() as nursery:
        await nursery.start(n2.run)
        assert sorted(p.name for p in root.iterdir()) == ["app-1"]
        nursery.cancel_scope.cancel()


class Watched:
    """The fake replica, subscribable: `changed` wakes the subscriber."""

    def __init__(self, replica: FakeReplica) -> None:
        self.replica = replica
        self.send, self.recv = trio.open_memory_channel[list[object]](100)

    @property
    def state(self) -> Any:
        return self.replica.state

    @contextlib.asynccontextmanager
    async def subscribe(self, kinds: object = None) -> AsyncIterator[tuple[Any, Any]]:
        yield self.replica.state, self.recv

    async def changed(self) -> None:
        await self.send.send([])
        await trio.testing.wait_all_tasks_blocked()


async def test_a_node_that_comes_to_hold_the_newest_cache_unpacks_it_ahead(tmp_path: Path) -> None:
    blobs, replica, _ = service(tmp_path / "blobs")  # its copies are n1's
    n1, n2 = caches(tmp_path, "n1", blobs, replica), caches(tmp_path, "n2", blobs, replica)
    said = Said()
    watched = Watched(replica)
    async with trio.open_nursery() as nursery:
        for node in (n1, n2):
            await nursery.start(node.run)
            await nursery.start(node.keep_warm, watched)
        fill(await n1.restore("app-1", said), {"uv/a.whl": b"wheel"})
        await n1.save("app-1", tmp_path, said)
        record = replica.state.record(BuildCache, "app-1")
        assert isinstance(record, BuildCache)
        await watched.changed()
        assert "app-1" not in n2._prefetches  # no copy of the blob on n2 yet
        await n1._prefetches["app-1"].done.wait()  # the saver holds it: current, nothing to do
        assert n1.stats["prefetched"] == 0 and scratch_of(n1) == []

        # The second copy lands on n2: unpacked there at once, before any push.
        await replica.write([BlobLocation(record.digest, "n2", record.size, 0)])
        await watched.changed()
        await n2._prefetches["app-1"].done.wait()
        assert n2.stats["prefetched"] == 1 and len(scratch_of(n2)) == 1

        async def unreachable(digest: str) -> Path:
            raise AssertionError("the restore fetched the blob again")

        blobs.local_path = unreachable  # type: ignore[method-assign]
        d = await n2.restore("app-1", said)
        assert (d / "uv/a.whl").read_bytes() == b"wheel" and scratch_of(n2) == []
        # Blobs stored later (slugs, repos) wake it again: the same cache is not looked at again.
        await watched.changed()
        assert "app-1" not in n2._prefetches and n2.stats["prefetched"] == 1
        nursery.cancel_scope.cancel()


async def test_build_lines_go_live_at_once_and_to_the_app_file_in_batches(tmp_path: Path) -> None:
    hub = LogHub(tmp_path / "logs")
    log = BuildLog(hub, "hello", lambda: 42)
    async with hub.subscribe("hello") as live:
        await log.line("-----> Building hello")
        got = live.receive_nowait()
        assert (got.job_id, got.text, got.ts_ms) == ("build", "-----> Building hello", 42)
        assert await hub.history("hello", 10) == []  # not appended yet: one batch
        for i in range(BATCH_LINES):
            await log.line(f"line {i}")
        assert len(await hub.history("hello", 10_000)) == BATCH_LINES  # a full batch appended
        await log.flush()
    history = await hub.history("hello", 10_000)
    assert len(history) == BATCH_LINES + 1 and {h.job_id for h in history} == {"build"}
    assert (
        history[0].text == "-----> Building hello" and history[-1].text == f"line {BATCH_LINES - 1}"
    )
    await trio.lowlevel.checkpoint()
