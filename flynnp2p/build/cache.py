"""An app's build cache, kept in the blobstore so that a warm build is warm on every node.

Theory of operation
-------------------
Each node keeps an app's CACHE_DIR between builds at ``<root>/<app id>``, and
beside it a marker ``<root>/<app id>.json``: the digest of the blob that
directory was restored from or saved as, and the tree's `fingerprint` then
(every entry's path, kind, size and mtime, hashed). The newest saved cache of
the app, whichever node saved it, is named by its `BuildCache` record.

Before a build, `BuildCaches.restore`:

* no record: the local directory is used as it is (a first build, or an app
  whose cache was never saved);
* the marker names the record's digest and the tree is unchanged since: the
  local directory *is* that cache (the common case: the last build was here);
* else the blob is fetched (from any holder), unpacked into a fresh directory
  (``tarfile``'s "data" filter: no absolute or escaping paths or links, no
  devices) that then replaces the local one.

A cache that cannot be restored (no alive holder, a corrupt blob, a full disk)
only makes the build cold: the local directory is emptied and the push goes on.

The fetch and unpack begin before that: when a push to the app begins here
(`BuildCaches.prefetch`, called on git's first request), while git negotiates and
sends the pack, into a fresh directory of its own that the restore then waits for
and swaps in (unpacking the example's 2.8 MB cache, 215 files, took 0.3 s of a
warm push to another node: file creation is what this machine is slowest at). A
prefetch of a blob that is no longer the newest is discarded by the restore; one
no push took is used by the next, or removed with the scratch an earlier agent
left (``*.restore-*``, ``*.old-*``) when the agent starts (`BuildCaches.run`).
A node that holds the newest cache blob of an app (the second copy of a save
made elsewhere) unpacks it ahead as soon as it holds it (`BuildCaches.keep_warm`),
so a push there finds it ready; that costs the holder the unpacked tree beside
the blob until a push takes it.

After a build that succeeded, `BuildCaches.save`: a tree whose fingerprint is
the marker's is not packed again (the build changed nothing in it). Else, when
the tree holds at most ``MAX_CACHE_BYTES`` (512 MiB of files), it is packed
(gzip level 1: the cache is mostly compressed wheels and tarballs already;
owners 0; regular files, directories, symlinks and hard links only) and stored in the
blobstore (on at least two nodes before ``put`` returns), then the record and
the marker are written. A bigger cache is not stored (the push says so: the
next build on another node is cold) and the previous record stays. Nor is one
whose packed file and its copy in the blobstore (twice the tree's size, at most)
would leave less than `flynnp2p.host.space.RESERVE_BYTES` free: the save is
skipped before it writes anything, saying "no space left on <node>", so that it
never takes the space the push's own slug, release and job need. A save that
fails all the same (the disk filled meanwhile) removes what it wrote, says why
and never fails the push: the release is already made.

Pushes to one app are serialised by the push lease (`flynnp2p.build.push`), so
one node's cache directory of an app is only ever used by one build at a time,
and two nodes never write the app's record at once. The blobs of records are
referenced for the blobstore's garbage collection (`flynnp2p.build.blobs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from flynnp2p.errors import FlynnError
from flynnp2p.host.space import is_full, no_space, room_for
from flynnp2p.state.merge import State
from flynnp2p.state.records import BlobLocation, BuildCache
from flynnp2p.state.replica import Subscribable, Writable

log = logging.getLogger(__name__)

MAX_CACHE_BYTES = 512 * 1024 * 1024  # of files in the tree; a bigger cache is not stored

Say = Callable[[str], Awaitable[None]]


class CacheBlobs(Protocol):
    """The part of `flynnp2p.build.blobs.BlobService` the cache uses."""

    async def put(self, digest: str, chunks: AsyncIterator[bytes]) -> tuple[int, int]: ...

    async def local_path(self, digest: str) -> Path: ...


@dataclass(frozen=True, slots=True)
class Tree:
    fingerprint: str
    files: int
    size: int  # bytes of regular files


def scan(root: Path) -> Tree:
    """The fingerprint of the tree at `root` (blocking): entries in sorted order."""
    h = hashlib.sha256()
    files = size = 0
    for base, dirs, names in os.walk(root):
        dirs.sort()
        rel = Path(base).relative_to(root)
        for name in sorted(dirs + names):
            st = os.lstat(Path(base) / name)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            h.update(f"{rel / name}\0{kind}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return Tree(h.hexdigest(), files, size)


def _keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
        return None  # sockets, fifos, devices: nothing a cache needs
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(root: Path, dest: Path) -> tuple[str, int]:
    """Pack the tree at `root` into `dest` (blocking); its (digest, size)."""
    with tarfile.open(dest, "w:gz", compresslevel=1) as tar:
        for entry in sorted(os.listdir(root)):
            tar.add(root / entry, arcname=entry, filter=_keep)
    h = hashlib.sha256()
    with dest.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), dest.stat().st_size


def unpack(blob: Path, dest: Path) -> None:
    """Unpack a packed cache into the new directory `dest` (blocking); tar errors,
    and what the "data" filter refuses, raise ``tarfile.TarError``."""
    dest.mkdir(parents=True)
    with tarfile.open(blob, "r:gz") as tar:
        tar.extractall(dest, filter="data")


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    f = await trio.open_file(path, "rb")
    async with f:
        while chunk := await f.read(1 << 20):
            yield chunk


@dataclass
class _Prefetch:
    """A cache blob being fetched and unpacked ahead of a push's restore."""

    digest: str
    done: trio.Event = field(default_factory=trio.Event)
    path: Path | None = None  # the unpacked directory, once done (None: it failed)


_RESTORE_ERRORS = (FlynnError, OSError, tarfile.TarError, EOFError)


async def _remove_tree(path: Path) -> None:
    await trio.to_thread.run_sync(shutil.rmtree, path, True)


class BuildCaches:
    """The build caches of this node's apps (see the module's theory of operation)."""

    def __init__(
        self, root: Path, *, blobs: CacheBlobs, state: Writable, node: str,
        now_ms: Callable[[], int], max_bytes: int = MAX_CACHE_BYTES,
    ) -> None:  # fmt: skip
        self.root = root
        self.blobs = blobs
        self.state = state
        self.node = node
        self.now_ms = now_ms
        self.max_bytes = max_bytes
        self.stats = {
            "restored": 0, "restore_failed": 0, "saved": 0, "unchanged": 0, "too_big": 0,
            "no_room": 0, "prefetched": 0, "prefetch_failed": 0, "prefetch_unused": 0,
        }  # fmt: skip
        self.made_at = time.time()
        self._nursery: trio.Nursery | None = None
        self._prefetches: dict[str, _Prefetch] = {}
        self._warmed: dict[str, str] = {}  # app id -> the cache digest keep_warm prefetched

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Remove the restores an earlier agent left half-done, then run the
        prefetches `prefetch` starts (until cancelled)."""
        await trio.to_thread.run_sync(self._remove_scratch_before, self.made_at)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _remove_scratch_before(self, made_at: float) -> None:
        for pattern in ("*.restore-*", "*.old-*"):
            for path in self.root.glob(pattern):
                with contextlib.suppress(OSError):
                    if path.is_dir() and path.stat().st_mtime < made_at:
                        shutil.rmtree(path, ignore_errors=True)

    def prefetch(self, app_id: str) -> None:
        """A push of the app begins on this node: fetch and unpack its newest saved
        cache now, beside git's own work, for the push's `restore` to swap in. Does
        nothing when there is none, or one is being fetched or waits to be taken."""
        record = self.state.state.record(BuildCache, app_id)
        if self._nursery is None or record is None:
            return
        ahead = self._prefetches.get(app_id)
        if ahead is not None and (ahead.digest == record.digest or not ahead.done.is_set()):
            return  # the newest one, or one still under way (the restore judges it)
        if ahead is not None and ahead.path is not None:  # an older one, never taken
            self.stats["prefetch_unused"] += 1
            self._nursery.start_soon(_remove_tree, ahead.path)
        ahead = self._prefetches[app_id] = _Prefetch(record.digest)
        self._nursery.start_soon(self._prefetch, app_id, ahead)

    async def keep_warm(
        self, state: Subscribable, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Prefetch each app's newest cache on this node as soon as this node holds its
        blob (every change of the caches or of where blobs are; `run` must be
        running). The node that saved it has it current already: nothing to do."""
        started = False
        while True:  # a subscriber that falls behind is dropped: subscribe again
            async with state.subscribe([BuildCache.KIND, BlobLocation.KIND]) as (snapshot, changes):
                self._warm(snapshot)
                if not started:
                    started = True
                    task_status.started()
                async for _ in changes:
                    self._warm(state.state)

    def _warm(self, state: State) -> None:
        """Prefetch each newest cache this node holds, once per cache (a blob stored
        anywhere wakes this: looking again is a dict lookup, not a scan of the tree)."""
        for record in state.records(BuildCache):
            if self._warmed.get(record.app_id) == record.digest:
                continue
            if state.record(BlobLocation, f"{record.digest}@{self.node}") is not None:
                self._warmed[record.app_id] = record.digest
                self.prefetch(record.app_id)

    async def _prefetch(self, app_id: str, ahead: _Prefetch) -> None:
        try:
            if await self._is_current(app_id, ahead.digest):
                return  # nothing to do: the restore finds this node's directory current
            blob = await self.blobs.local_path(ahead.digest)
            fresh = self._fresh(app_id)
            await trio.to_thread.run_sync(self._unpack_fresh, blob, fresh)
            ahead.path = fresh
            self.stats["prefetched"] += 1
        except _RESTORE_ERRORS as exc:  # the push's restore tries again, and says why
            self.stats["prefetch_failed"] += 1
            log.info("build cache of %s not fetched ahead: %s", app_id, exc)
        finally:
            ahead.done.set()

    async def _is_current(self, app_id: str, digest: str) -> bool:
        """This node's directory of the app is the cache `digest`, unchanged since."""
        marked, fingerprint = await trio.to_thread.run_sync(self._read_marker, app_id)
        if marked != digest:
            return False
        return fingerprint == (await trio.to_thread.run_sync(scan, self.dir(app_id))).fingerprint

    def _fresh(self, app_id: str) -> Path:
        return self.root / f"{app_id}.restore-{uuid.uuid4().hex[:8]}"

    async def _take_prefetch(self, app_id: str, digest: str) -> Path | None:
        """The directory a prefetch unpacked of cache `digest` (waited for), if any;
        one of another digest is removed."""
        ahead = self._prefetches.get(app_id)
        if ahead is None:
            return None
        await ahead.done.wait()
        if self._prefetches.get(app_id) is ahead:
            del self._prefetches[app_id]
        if ahead.path is not None and ahead.digest != digest:
            self.stats["prefetch_unused"] += 1
            await _remove_tree(ahead.path)
            return None
        return ahead.path

    def dir(self, app_id: str) -> Path:
        return self.root / app_id

    def _marker(self, app_id: str) -> Path:
        return self.root / f"{app_id}.json"

    def app_ids(self) -> list[str]:
        """The apps that have a cache directory or marker here (blocking)."""
        try:
            names = [p.name for p in self.root.iterdir()]
        except FileNotFoundError:
            return []
        return sorted({n.split(".", 1)[0] for n in names if n and not n.startswith(".")})

    def remove(self, app_id: str) -> None:
        """Delete everything of the app's here (blocking): its directory, marker and
        any restore a killed agent left half-done."""
        for path in self.root.glob(f"{app_id}*"):
            if path.name == app_id or path.name.startswith(f"{app_id}."):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _read_marker(self, app_id: str) -> tuple[str | None, str | None]:
        try:
            data = json.loads(self._marker(app_id).read_text())
            return str(data["digest"]), str(data["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, None

    def _write_marker(self, app_id: str, digest: str, fingerprint: str) -> None:
        tmp = self._marker(app_id).with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"digest": digest, "fingerprint": fingerprint}))
        os.replace(tmp, self._marker(app_id))

    async def restore(self, app_id: str, say: Say) -> Path:
        """Make this node's cache directory of the app the newest saved one; its path."""
        target = self.dir(app_id)
        await trio.to_thread.run_sync(lambda: target.mkdir(parents=True, exist_ok=True))
        record = self.state.state.record(BuildCache, app_id)
        if record is None:
            return target
        ahead = await self._take_prefetch(app_id, record.digest)
        if ahead is None and await self._is_current(app_id, record.digest):
            await say(f"-----> Build cache: this node's ({record.size / 1e6:.1f} MB)")
            return target
        try:
            fresh = ahead
            if fresh is None:
                blob = await self.blobs.local_path(record.digest)
                fresh = self._fresh(app_id)
                await trio.to_thread.run_sync(self._unpack_fresh, blob, fresh)
            await trio.to_thread.run_sync(self._swap_in, fresh, target, record.digest)
        except _RESTORE_ERRORS as exc:
            self.stats["restore_failed"] += 1
            why = exc.message if isinstance(exc, FlynnError) else str(exc) or type(exc).__name__
            await say(f"-----> Build cache could not be restored ({why}): building without it")
            await trio.to_thread.run_sync(self._empty, target)
            return target
        self.stats["restored"] += 1
        await say(
            f"-----> Build cache restored from node {record.node} ({record.size / 1e6:.1f} MB)"
        )
        return target

    @staticmethod
    def _unpack_fresh(blob: Path, fresh: Path) -> None:
        try:
            unpack(blob, fresh)
        except BaseException:
            shutil.rmtree(fresh, ignore_errors=True)
            raise

    def _swap_in(self, fresh: Path, target: Path, digest: str) -> None:
        """The unpacked cache `fresh` made this node's directory of the app."""
        self._marker(target.name).unlink(missing_ok=True)
        old = target.with_name(target.name + ".old-" + uuid.uuid4().hex[:8])
        if target.exists():
            os.replace(target, old)
        os.replace(fresh, target)
        shutil.rmtree(old, ignore_errors=True)
        self._write_marker(target.name, digest, scan(target).fingerprint)

    def _empty(self, target: Path) -> None:
        self._marker(target.name).unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True, exist_ok=True)

    async def save(self, app_id: str, scratch: Path, say: Say) -> None:
        """Store the app's cache directory after a build that succeeded (never raises
        a `FlynnError`: a cache not saved only makes a later build cold)."""
        target = self.dir(app_id)
        tree = await trio.to_thread.run_sync(scan, target)
        _, fingerprint = await trio.to_thread.run_sync(self._read_marker, app_id)
        if (
            fingerprint == tree.fingerprint
            and self.state.state.record(BuildCache, app_id) is not None
        ):
            self.stats["unchanged"] += 1
            return
        if tree.files == 0:
            return
        if tree.size > self.max_bytes:
            self.stats["too_big"] += 1
            await say(f"-----> Build cache not saved: {tree.size / 1e6:.0f} MB of files is over its "
                      f"bound of {self.max_bytes / 1e6:.0f} MB (a build on another node starts cold)")  # fmt: skip
            return
        # The packed file and its copy in the blobstore, both in the data dir; a
        # tar's headers are 512 bytes an entry, and gzip can grow what it cannot shrink.
        needed = 2 * (tree.size + tree.size // 100 + 1024 * (tree.files + 1))
        short = await trio.to_thread.run_sync(room_for, scratch, needed)
        if short is not None:
            self.stats["no_room"] += 1
            why = no_space(
                self.node, f"the build cache holds {tree.size / 1e6:.1f} MB of files", short
            )
            log.warning("app %s: %s", app_id, why)
            await say(f"-----> Build cache not saved: {why}; a later build may start cold")
            return
        dest = scratch / f"cache-{uuid.uuid4().hex[:8]}.tgz"
        try:
            digest, size = await trio.to_thread.run_sync(pack, target, dest)
            _, holders = await self.blobs.put(digest, _chunks(dest))
            record = BuildCache(
                app_id=app_id, digest=digest, size=size, node=self.node, updated_at=self.now_ms()
            )
            await self.state.write([record])
            # The tree as packed: a build that leaves it alone is not packed again.
            await trio.to_thread.run_sync(self._write_marker, app_id, digest, tree.fingerprint)
        except (FlynnError, OSError, tarfile.TarError) as exc:
            why = exc.message if isinstance(exc, FlynnError) else str(exc) or type(exc).__name__
            if is_full(exc):
                why = no_space(self.node, "the build cache was not packed", why)
            log.warning("app %s: the build cache is not saved: %s", app_id, why)
            await say(f"-----> Build cache not saved ({why}): a later build may start cold")
            return
        finally:
            await trio.to_thread.run_sync(lambda: dest.unlink(missing_ok=True))
        self.stats["saved"] += 1
        await say(f"-----> Build cache saved ({size / 1e6:.1f} MB on {holders} nodes)")
