"""The cluster's blobstore: this node's `BlobStore` plus replication between nodes.

Theory of operation
-------------------
Where blobs are is replicated state: a `BlobLocation` record ``<digest>@<node>``
per copy, written only by the node that holds the copy (after its file is in
place, removed when the file is deleted).

Put.  A blob is stored here (digest verified), its location recorded, and then
streamed to other alive peers, one at a time, until at least two alive nodes
hold it; only then is the put acknowledged, so losing any one node loses no
acknowledged blob.  The copy to a peer is a ``PUT /v1/blobs/<digest>`` marked
``X-Flynnp2p-Replica: 1``: the peer stores it and records its own location but
does not replicate further.  Peers alive but none accepting is a 503 (the blob
stays here and its location is recorded).

Get.  A node that lacks a blob fetches it from an alive holder (a ``GET`` marked
as a replica request, which the holder serves only from its own disk, so
fetches never chain or loop), verifying the digest while it stores it, records
its own location, then serves its local copy.  Concurrent gets of one missing
blob share one fetch.

Garbage collection.  Every ``gc_interval_s`` this node deletes its blobs that no
`Artifact` (nor `Repo`: an app's saved git repository; nor `BuildCache`: its build
cache) references and that are
older than ``gc_grace_s`` (an upload is referenced by its artifact only after it
is stored), and deletes their locations.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import httpx
import trio

from flynnp2p.build.blobstore import BlobStore, StoredBlob
from flynnp2p.errors import ClusterError, NotFound, UserError
from flynnp2p.peering import Peer
from flynnp2p.state.merge import Change, Delete
from flynnp2p.state.records import Artifact, BlobLocation, BuildCache, Repo
from flynnp2p.state.replica import Writable

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Flynnp2p-Replica"
MIN_HOLDERS = 2
GC_INTERVAL_S = 600.0
GC_GRACE_S = 3600.0


class Membership(Protocol):
    def alive_peers(self) -> list[Peer]: ...


class BlobService:
    def __init__(
        self,
        store: BlobStore,
        state: Writable,
        peers: Membership,
        http: httpx.AsyncClient,
        node_name: str,
        clock_ms: Callable[[], int],
        *,
        gc_interval_s: float = GC_INTERVAL_S,
        gc_grace_s: float = GC_GRACE_S,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.state = state
        self.peers = peers
        self.http = http
        self.node = node_name
        self.clock_ms = clock_ms
        self.gc_interval_s = gc_interval_s
        self.gc_grace_s = gc_grace_s
        self.rng = rng or random.Random()
        self._fetches: dict[str, trio.Lock] = {}
        self.stats = {"stored": 0, "replicated": 0, "fetched": 0, "collected": 0}

    # -- where blobs are -----------------------------------------------------

    def locations(self, digest: str) -> list[BlobLocation]:
        return [loc for loc in self.state.state.records(BlobLocation) if loc.digest == digest]

    def alive_holders(self, digest: str) -> list[tuple[Peer, BlobLocation]]:
        """Alive peers that hold `digest` according to the state (this node excluded)."""
        where = {loc.node: loc for loc in self.locations(digest)}
        return [(p, where[p.name]) for p in self.peers.alive_peers() if p.name in where]

    # -- put -----------------------------------------------------------------

    async def put(
        self, digest: str, chunks: AsyncIterable[bytes], *, replicate: bool = True
    ) -> tuple[int, int]:
        """Store, record, replicate; (size, alive nodes holding it, this one included)."""
        size = await self.store.write(digest, chunks, node=self.node)
        self.stats["stored"] += 1
        await self._record(digest, size)
        if not replicate:
            return size, 1
        return size, await self._replicate(digest, size)

    async def _record(self, digest: str, size: int) -> None:
        mine = self.state.state.record(BlobLocation, f"{digest}@{self.node}")
        if mine is None or mine.size != size:
            location = BlobLocation(digest=digest, node=self.node, size=size, created_at=self.clock_ms())
            await self.state.write([location])

    async def _replicate(self, digest: str, size: int) -> int:
        holders = 1 + len(self.alive_holders(digest))
        held = {p.name for p, _ in self.alive_holders(digest)}
        candidates = [p for p in self.peers.alive_peers() if p.name not in held]
        self.rng.shuffle(candidates)
        failures: list[str] = []
        for peer in candidates:
            if holders >= MIN_HOLDERS:
                break
            try:
                await self._push(peer, digest, size)
            except (httpx.HTTPError, ClusterError, OSError) as exc:
                failures.append(f"{peer.name}: {str(exc) or type(exc).__name__}")
                continue
            holders += 1
            self.stats["replicated"] += 1
        if holders < MIN_HOLDERS and candidates:
            raise ClusterError(
                f"blob {digest} is stored on {self.node} only: no other alive node accepted "
                f"a copy ({'; '.join(failures) or 'none tried'}); retry"
            )
        return holders

    async def _push(self, peer: Peer, digest: str, size: int) -> None:
        _, chunks = await self.store.open(digest)
        resp = await self.http.put(
            f"http://{peer.api}/v1/blobs/{digest}",
            content=chunks,
            headers={REPLICA_HEADER: "1", "Content-Length": str(size)},
        )
        if resp.status_code != 201:
            raise ClusterError(f"answered {resp.status_code}: {resp.text[:200]}")

    # -- get -----------------------------------------------------------------

    async def size(self, digest: str, *, local_only: bool = False) -> int:
        """The blob's size, from here or from a record of an alive holder."""
        size = await self.store.size(digest)
        if size is not None:
            return size
        if not local_only:
            holders = self.alive_holders(digest)
            if holders:
                return holders[0][1].size
        raise self._missing(digest, local_only)

    async def open(
        self, digest: str, *, local_only: bool = False
    ) -> tuple[int, AsyncIterator[bytes]]:
        """(size, chunks) of the blob, fetched from a peer first if this node lacks it."""
        if not local_only:
            await self._ensure_local(digest)
        return await self.store.open(digest)

    async def local_path(self, digest: str) -> Path:
        """The path of this node's copy of the blob, fetched from a peer first if needed."""
        await self._ensure_local(digest)
        return self.store.path(digest)

    async def _ensure_local(self, digest: str) -> None:
        if await self.store.has(digest):
            return
        lock = self._fetches.setdefault(digest, trio.Lock())
        try:
            async with lock:
                if not await self.store.has(digest):
                    await self._fetch(digest)
        finally:
            if lock.statistics().tasks_waiting == 0:
                self._fetches.pop(digest, None)

    async def _fetch(self, digest: str) -> None:
        holders = self.alive_holders(digest)
        if not holders:
            raise self._missing(digest, False)
        self.rng.shuffle(holders)
        failures: list[str] = []
        for peer, _ in holders:
            try:
                async with self.http.stream(
                    "GET", f"http://{peer.api}/v1/blobs/{digest}", headers={REPLICA_HEADER: "1"}
                ) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise ClusterError(f"answered {resp.status_code}: {resp.text[:200]}")
                    size = await self.store.write(digest, resp.aiter_bytes(), node=self.node)
            except (httpx.HTTPError, ClusterError, UserError) as exc:
                # UserError: the peer's bytes did not match (a corrupt copy there).
                failures.append(f"{peer.name}: {str(exc) or type(exc).__name__}")
                continue
            self.stats["fetched"] += 1
            await self._record(digest, size)
            return
        raise ClusterError(f"cannot fetch blob {digest} from its holders ({'; '.join(failures)})")

    def _missing(self, digest: str, local_only: bool) -> Exception:
        if local_only:
            return NotFound(f"blob {digest} is not on node {self.node}")
        if any(loc.node != self.node for loc in self.locations(digest)):
            nodes = ", ".join(sorted(loc.node for loc in self.locations(digest)))
            return ClusterError(f"blob {digest} is only on nodes that are down now ({nodes}); retry later")
        return NotFound(f"no node holds blob {digest}")

    async def list_local(self) -> list[StoredBlob]:
        return await self.store.list()

    # -- garbage collection --------------------------------------------------

    async def gc(self) -> list[str]:
        """Delete unreferenced blobs past the grace period and their locations here."""
        now = self.clock_ms()
        grace_ms = int(self.gc_grace_s * 1000)
        referenced = {a.digest for a in self.state.state.records(Artifact) if a.digest}
        referenced |= {d for r in self.state.state.records(Repo) for d in r.blobs}  # git bundles
        referenced |= {c.digest for c in self.state.state.records(BuildCache)}  # build caches
        removed: list[str] = []
        for blob in await self.store.list():
            if blob.digest in referenced or now - blob.mtime_ms < grace_ms:
                continue
            if await self.store.delete(blob.digest):
                removed.append(blob.digest)
        keys = [f"{d}@{self.node}" for d in removed]
        deletes: list[Change] = [
            Delete(BlobLocation.KIND, k) for k in keys if self.state.state.record(BlobLocation, k)
        ]
        if deletes:
            await self.state.write(deletes)
        self.stats["collected"] += len(removed)
        return removed

    async def run(
        self, *, task_status: trio.TaskStatus[BlobService] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.store.clean_temp()
        task_status.started(self)
        while True:
            await trio.sleep(self.gc_interval_s)
            try:
                removed = await self.gc()
            except ClusterError as exc:  # deleted here; the location deletes still spread
                log.warning("blob gc: %s", exc)
                continue
            if removed:
                log.info("blob gc removed %d unreferenced blobs", len(removed))
