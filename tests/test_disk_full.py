"""A full disk under the big writes: a blob, a build, a build cache save, an image
unpack (`flynnp2p.host.space`). Each fails saying "no space left on <node>" and
leaves nothing half-written behind.

The full disk is real: a tmpfs of a few MiB (root only: mounting needs it).
Where a test is about what happens when the disk fills *during* a write, the
up-front room check (`room_for`) is turned off for it, since the check alone
would refuse first. Last, the deploy watcher's verdict on a job that could not
start for such a reason carries it (it said "exited by itself").
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flynnp2p.build import cache as cache_module
from flynnp2p.build.blobstore import BlobStore
from flynnp2p.build.builder import BuildError, build
from flynnp2p.errors import InsufficientStorage
from flynnp2p.host import rootfs, space
from flynnp2p.host.rootfs import unpack_image
from flynnp2p.host.space import no_space, room_for
from flynnp2p.scheduler.rollout import Verdict, judge
from flynnp2p.state.records import BuildCache, Formation
from tests import test_deploy_watcher as watched
from tests.diskfill import small_tmpfs
from tests.image_archives import config_doc, save_archive
from tests.test_blobstore import service
from tests.test_build_cache import Said, caches, fill
from tests.test_scheduler_model import state_of

MIB = 1 << 20


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tiny", "4m") as mnt:
        yield mnt


def everything(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 256 << 10):
        yield data[i : i + (256 << 10)]


def test_room_for_says_what_was_needed_and_what_is_free(tmp_path: Path) -> None:
    assert room_for(tmp_path, 1, reserve=0) is None
    free = space.free_bytes(tmp_path / "not" / "made" / "yet")  # its nearest parent's
    assert free > 0
    short = room_for(tmp_path, free + 10 * MIB, reserve=0)
    assert short is not None and "needed" in short and "free" in short
    assert room_for(tmp_path, 1, reserve=free + MIB) is not None  # the reserve counts
    assert no_space("n2", "blob x was not stored", "No space left on device") == (
        "no space left on n2: blob x was not stored (No space left on device)"
    )


async def test_a_blob_that_does_not_fit_is_507_naming_the_node_and_leaves_no_temp_file(
    tiny: Path,
) -> None:
    store = BlobStore(tiny / "blobs")
    await store.clean_temp()
    data = os.urandom(5 * MIB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(InsufficientStorage, match="no space left on n7: blob sha256:"):
        await store.write(digest, chunks(data), node="n7")
    assert list(store.tmp.iterdir()) == [] and not await store.has(digest)


async def test_a_build_on_a_full_disk_fails_naming_the_node_and_leaves_nothing(
    tiny: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Procfile").write_text("web: python3 -m http.server $PORT\n")
    (src / "big.bin").write_bytes(os.urandom(5 * MIB))  # copied into the build tree: no room
    lines: list[str] = []

    async def on_line(line: str) -> None:
        lines.append(line)

    with pytest.raises(BuildError) as info:
        await build(
            src, app_id="app-1", work_dir=tiny / "work", cache_dir=tiny / "cache", env={},
            on_line=on_line, tools=[], isolation="none", node="n7",
        )  # fmt: skip
    assert info.value.message.startswith("no space left on n7: the build could not write"), (
        info.value
    )
    assert everything(tiny / "work") == []  # the sandbox is gone


async def test_a_cache_save_without_room_is_skipped_before_it_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs, replica, _ = service(tmp_path / "blobs")
    n1 = caches(tmp_path, "n1", blobs, replica)
    fill(n1.dir("app-1"), {"deps.bin": os.urandom(MIB)})
    monkeypatch.setattr(space, "RESERVE_BYTES", 1 << 60)  # no disk has that much to spare
    said = Said()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    await n1.save("app-1", scratch, said)
    assert said.text.startswith("-----> Build cache not saved: no space left on n1: "), said.text
    assert "needed" in said.text and "a later build may start cold" in said.text
    assert replica.state.record(BuildCache, "app-1") is None and await blobs.list_local() == []
    assert list(scratch.iterdir()) == [] and n1.stats["no_room"] == 1


async def test_a_cache_save_that_fills_the_disk_removes_its_file_and_the_push_goes_on(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs, replica, _ = service(tmp_path / "blobs")
    n1 = caches(tmp_path, "n1", blobs, replica)
    fill(n1.dir("app-1"), {"deps.bin": os.urandom(5 * MIB)})  # packs to more than 4 MiB
    monkeypatch.setattr(cache_module, "room_for", lambda *_: None)  # as if it seemed to fit
    said = Said()
    await n1.save("app-1", tiny, said)  # never raises: a cache not saved fails no push
    assert "Build cache not saved (no space left on n1: the build cache was not packed" in said.text
    assert replica.state.record(BuildCache, "app-1") is None and await blobs.list_local() == []
    assert everything(tiny) == []


def busybox_image(path: Path, size: int) -> Path:
    layer = [("bin", "dir", b"", 0o755), ("bin/data", "file", os.urandom(size), 0o644)]
    return save_archive(path, [layer], config_doc(Cmd=["/bin/data"]))


async def test_an_image_that_does_not_fit_is_refused_before_it_unpacks(
    tiny: Path, tmp_path: Path
) -> None:
    archive = busybox_image(tmp_path / "image.tar", MIB)  # fits, but not with the reserve
    with pytest.raises(InsufficientStorage) as info:
        await unpack_image(archive, tiny, "sha256:abc", node="n7")
    assert info.value.message.startswith(
        "no space left on n7: image sha256:abc was not unpacked (a layer's files do not fit: "
    ), info.value.message
    assert everything(tiny) == ["images"]


async def test_an_image_unpack_that_fills_the_disk_removes_its_partial_root(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = busybox_image(tmp_path / "image.tar", 5 * MIB)
    monkeypatch.setattr(rootfs, "room_for", lambda *_: None)  # as if it seemed to fit
    with pytest.raises(InsufficientStorage) as info:
        await unpack_image(archive, tiny, "sha256:abc", node="n7")
    assert info.value.message.startswith("no space left on n7: image sha256:abc was not unpacked")
    assert everything(tiny) == ["images"]  # no half-unpacked root for a later unpack to take
    small = busybox_image(tmp_path / "small.tar", 1000)
    unpacked = await unpack_image(small, tiny, "sha256:abc", node="n7")  # the digest is free
    assert (unpacked.rootfs / "bin" / "data").stat().st_size == 1000


def test_a_deploy_whose_job_could_not_start_says_its_hosts_reason() -> None:
    why = "cannot get image archive sha256:x: no space left on h1: image sha256:x was not unpacked"
    crashed = dataclasses.replace(watched.job("new1", "r2", "crashed"), reason=why)
    state = state_of(watched.APP, watched.R1, watched.R2, watched.DEP,
                     Formation(app_id="a1", release_id="r2", updated_at=watched.T0_MS, processes={"web": 2}),
                     watched.placed("new1", "r2"), crashed)  # fmt: skip
    verdict = judge(state, watched.DEP, watched.T0_MS + 1000)
    assert verdict == Verdict("failed", f"job new1 (web) could not start: {why}", "new1")
    # One that ran and exited says how, whatever its host said.
    exited = dataclasses.replace(crashed, exit_code=3, reason="exited with code 3")
    state = state_of(watched.APP, watched.R2, watched.DEP, watched.placed("new1", "r2"), exited,
                     Formation(app_id="a1", release_id="r2", updated_at=watched.T0_MS, processes={"web": 2}))  # fmt: skip
    assert judge(state, watched.DEP, watched.T0_MS + 1000) == Verdict(
        "failed", "job new1 (web) exited with code 3", "new1"
    )
