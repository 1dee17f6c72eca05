"""This node's content-addressed blob files.

Layout under the store's root (``<data_dir>/blobs``)::

    sha256/<64 hex>     one file per blob, named by the sha256 of its bytes
    tmp/<random>        writes in progress (removed on failure; leftovers of a
                        crash are removed by `clean_temp` at start)

Theory of operation
-------------------
A write streams into a temp file while hashing, then checks the digest, fsyncs
the file, renames it into place and fsyncs the directory.  The rename is atomic,
so a reader sees the whole blob or none of it; a digest mismatch, an error or a
cancellation mid-stream deletes the temp file and leaves nothing behind.  Two
concurrent writes of one digest write identical bytes: the later rename wins
harmlessly.  A full disk (ENOSPC, EDQUOT) is `InsufficientStorage` (507), the
temp file removed, its message "no space left on <node>" (`flynnp2p.host.space`).  All blocking file I/O runs in worker threads, a chunk at a time, so
a multi-gigabyte blob never sits in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from flynnp2p.errors import InsufficientStorage, NotFound, UserError
from flynnp2p.host.space import is_full, no_space

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
DIGEST_ACCEPTED = "'sha256:' followed by 64 lowercase hex digits"
CHUNK = 256 << 10


def check_digest(text: str) -> str:
    """`text` if it is a sha256 digest in our format; UserError naming what is accepted."""
    if DIGEST.fullmatch(text) is None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise UserError(f"digest: expected {DIGEST_ACCEPTED}, got {shown!r}")
    return text


@dataclass(frozen=True, slots=True)
class StoredBlob:
    digest: str
    size: int
    mtime_ms: int  # when this node finished writing it


class BlobStore:
    def __init__(self, root: Path, chunk_size: int = CHUNK) -> None:
        self.root = root
        self.blobs = root / "sha256"
        self.tmp = root / "tmp"
        self.chunk_size = chunk_size

    def path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest).removeprefix("sha256:")

    async def clean_temp(self) -> int:
        """Create the directories; remove writes a crash left behind."""

        def clean() -> int:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            removed = 0
            for leftover in self.tmp.iterdir():
                leftover.unlink(missing_ok=True)
                removed += 1
            return removed

        return await trio.to_thread.run_sync(clean)

    # -- writes --------------------------------------------------------------

    async def write(
        self, digest: str, chunks: AsyncIterable[bytes], *, node: str = "this node"
    ) -> int:
        """Store the bytes of `chunks` as `digest`; its size.  UserError on a mismatch;
        `InsufficientStorage` naming `node` on a full disk."""
        final = self.path(digest)
        try:
            return await self._write(digest, final, chunks)
        except OSError as exc:
            if not is_full(exc):
                raise
            why = no_space(node, f"blob {digest} was not stored", exc.strerror or str(exc))
            raise InsufficientStorage(f"{why}; retry once space is freed") from None

    async def _write(self, digest: str, final: Path, chunks: AsyncIterable[bytes]) -> int:
        fd, tmp_name = await trio.to_thread.run_sync(self._open_temp)
        tmp = Path(tmp_name)
        done = False
        try:
            with os.fdopen(fd, "wb") as f:
                hasher = hashlib.sha256()
                size = 0
                async for chunk in chunks:
                    if not chunk:
                        continue
                    await trio.to_thread.run_sync(_write_hashed, f, hasher, chunk)
                    size += len(chunk)
                actual = "sha256:" + hasher.hexdigest()
                if actual != digest:
                    raise UserError(
                        f"digest mismatch: the URL names {digest} but the {size} bytes "
                        f"received hash to {actual}; nothing was stored"
                    )
                await trio.to_thread.run_sync(_flush_sync, f)
            await trio.to_thread.run_sync(_rename_sync, tmp, final)
            done = True
            return size
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))

    def _open_temp(self) -> tuple[int, str]:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=self.tmp, prefix="in-")

    async def delete(self, digest: str) -> bool:
        """Remove the blob; False if it was not here."""
        path = self.path(digest)

        def unlink() -> bool:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            return True

        return await trio.to_thread.run_sync(unlink)

    # -- reads ---------------------------------------------------------------

    async def size(self, digest: str) -> int | None:
        """The blob's size, or None if this node does not hold it."""
        path = self.path(digest)

        def stat() -> int | None:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return None

        return await trio.to_thread.run_sync(stat)

    async def has(self, digest: str) -> bool:
        return await self.size(digest) is not None

    async def open(self, digest: str) -> tuple[int, AsyncIterator[bytes]]:
        """(size, chunks) of a blob held here; NotFound if it is not.

        The file is opened before this returns, so a delete (gc) after it does
        not cut the read short."""
        path = self.path(digest)

        def open_file() -> tuple[int, BinaryIO]:
            f = path.open("rb")
            return os.fstat(f.fileno()).st_size, f

        try:
            size, f = await trio.to_thread.run_sync(open_file)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not on this node") from None
        return size, self._chunks(f)

    async def _chunks(self, f: BinaryIO) -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await trio.to_thread.run_sync(f.read, self.chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            f.close()

    async def list(self) -> list[StoredBlob]:
        """The blobs held here, sorted by digest."""

        def scan() -> list[StoredBlob]:
            found: list[StoredBlob] = []
            try:
                entries = list(os.scandir(self.blobs))
            except FileNotFoundError:
                return found
            for entry in entries:
                digest = "sha256:" + entry.name
                if DIGEST.fullmatch(digest) is None:
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                found.append(StoredBlob(digest, st.st_size, int(st.st_mtime * 1000)))
            return sorted(found, key=lambda b: b.digest)

        return await trio.to_thread.run_sync(scan)


def _write_hashed(f: BinaryIO, hasher: hashlib._Hash, chunk: bytes) -> None:
    hasher.update(chunk)
    f.write(chunk)


def _flush_sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _rename_sync(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
