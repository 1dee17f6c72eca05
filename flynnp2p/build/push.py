"""A `git push` to any node: the push lease, the build seam, saving the repository.

Theory of operation
-------------------
Two things are decided once, in etcd, by the leader (`PushLocks`):

* ``f2p/push/<app id>``: the push lease, created only if absent and tied to an
  etcd lease of ``LEASE_TTL_S`` that the receiving node renews while the push
  runs. A second push to the app meanwhile, on any node, is refused with
  "another push to APP is in progress (on node N)". A node that dies mid-push
  frees the app when its lease runs out.
* ``f2p/repo/<app id>``: ``{"g": generation, "digest", "size"}``, the newest saved
  repository, advanced by compare-and-swap from the generation the push started
  from; the `Repo` record is written from it (and written again from it by a
  leader that finds the record behind: a leader that died between the swap and
  the write leaves nothing lost).

A push (`PushSession`, one per ``git-receive-pack`` POST) goes:

    pre-receive  lease taken (refused: the push is refused, with the reason)
                 → the local repo must be the generation etcd holds (else another
                   node's push landed since this one began: refused, "retry")
                 → the pre-receive step (`PreReceive`: today it accepts; the
                   builder plugs in here and its lines reach ``git push``)
    refs move    (git receive-pack)
    post-receive the repo bundled, stored in the blobstore (≥2 nodes), the
                 generation advanced by the leader, the local repo marked with it
    end          the lease released (the response's end, shielded and bounded)

Nodes reach the leader through `LeaderLink` (peer-credentialed HTTP to
``/v1/internal/git/…``, served by `flynnp2p.api.git`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import trio

from flynnp2p.build.hooks import RefUpdate, Say
from flynnp2p.build.repo import RepoStore
from flynnp2p.coord.client import KV
from flynnp2p.errors import ClusterError, Conflict, FlynnError, NotFound
from flynnp2p.state.records import App

log = logging.getLogger(__name__)

PUSH_PREFIX = "f2p/push/"
REPO_PREFIX = "f2p/repo/"
LEASE_TTL_S = 20
BUILD_BRANCHES = ("refs/heads/main", "refs/heads/master")


def push_key(app_id: str) -> str:
    return f"{PUSH_PREFIX}{app_id}"


def repo_key(app_id: str) -> str:
    return f"{REPO_PREFIX}{app_id}"


def in_progress(app_name: str, node: str) -> str:
    return (
        f"another push to {app_name} is in progress (on node {node}); retry when it finishes"
    )


# -- the leader's side ------------------------------------------------------


class LeaseStore(Protocol):
    """The part of `flynnp2p.coord.client.EtcdClient` the push locks use."""

    async def get(self, key: str) -> KV | None: ...

    async def create(self, puts: dict[str, bytes | str], lease: int = 0) -> tuple[bool, int]: ...

    async def swap(self, key: str, value: bytes | str, mod_revision: int) -> bool: ...

    async def grant(self, ttl_s: int) -> tuple[int, int]: ...

    async def keepalive(self, lease: int) -> int: ...

    async def revoke(self, lease: int) -> None: ...


def _repo_value(kv: KV | None) -> tuple[int, str | None, int, int]:
    """(generation, digest, size, mod revision) of the repo counter (0s if absent)."""
    if kv is None:
        return 0, None, 0, 0
    data = kv.json()
    if not isinstance(data, dict) or not isinstance(data.get("g"), int):
        raise ClusterError("the repo counter in etcd is not readable")
    digest, size = data.get("digest"), data.get("size")
    return (
        data["g"], digest if isinstance(digest, str) else None,
        size if isinstance(size, int) else 0, kv.mod_revision,
    )  # fmt: skip


class PushLocks:
    """Used on the leader only (its etcd member is a voter)."""

    def __init__(self, etcd: Callable[[], LeaseStore], now_ms: Callable[[], int]) -> None:
        self.etcd = etcd
        self.now_ms = now_ms

    async def current(self, app_id: str) -> tuple[int, str | None, int]:
        """(generation, digest, size) of the app's newest saved repository."""
        g, digest, size, _ = _repo_value(await self.etcd().get(repo_key(app_id)))
        return g, digest, size

    async def acquire(self, app: App, node: str) -> dict[str, Any]:
        etcd = self.etcd()
        lease, _ = await etcd.grant(LEASE_TTL_S)
        value = json.dumps({"node": node, "at": self.now_ms()})
        ok, _ = await etcd.create({push_key(app.id): value}, lease=lease)
        if not ok:
            await etcd.revoke(lease)
            held = await etcd.get(push_key(app.id))
            data = held.json() if held is not None else None
            holder = data.get("node") if isinstance(data, dict) else None
            raise Conflict(in_progress(app.name, str(holder or "another node")))
        g, digest, size = await self.current(app.id)
        return {"lease": lease, "ttl": LEASE_TTL_S, "generation": g, "digest": digest, "size": size}

    async def keepalive(self, lease: int) -> int:
        return await self.etcd().keepalive(lease)

    async def release(self, lease: int) -> None:
        await self.etcd().revoke(lease)

    async def commit(
        self, app: App, lease: int, seen: int, digest: str | None, size: int
    ) -> tuple[int, str | None, int]:
        """Advance the repo counter from `seen` (while `lease` still holds the push)."""
        etcd = self.etcd()
        held = await etcd.get(push_key(app.id))
        if held is None or held.lease != lease:
            raise Conflict(f"the push lock of {app.name} was lost (the push took too long?); push again")
        g, _, _, revision = _repo_value(await etcd.get(repo_key(app.id)))
        if g != seen:
            raise Conflict(
                f"the repository of {app.name} changed meanwhile (generation {g}, this push "
                f"began at {seen}); fetch and push again"
            )
        value = json.dumps({"g": seen + 1, "digest": digest, "size": size, "at": self.now_ms()})
        if not await etcd.swap(repo_key(app.id), value, revision):
            raise Conflict(f"the repository of {app.name} changed meanwhile; fetch and push again")
        return seen + 1, digest, size


# -- the receiving node's side ----------------------------------------------


class LeaderLink:
    """Calls the leader's ``/v1/internal/git/…`` endpoints (peer-credentialed `http`)."""

    def __init__(self, http: httpx.AsyncClient, leader_api: Callable[[], str | None]) -> None:
        self.http = http
        self.leader_api = leader_api

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        leader = self.leader_api()
        if leader is None:
            raise ClusterError("the cluster has no leader right now (no quorum?); retry")
        try:
            resp = await self.http.request(
                method, f"http://{leader}/v1/internal/git/{path}", json=body, timeout=10.0
            )
        except httpx.HTTPError as exc:
            raise ClusterError(f"cannot reach the leader at {leader}: {str(exc) or type(exc).__name__}") from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            message = str(err.get("message") or resp.text[:200] or resp.status_code)
            error: FlynnError = {409: Conflict, 404: NotFound}.get(resp.status_code, ClusterError)(message)
            raise error
        return data

    async def current(self, app_id: str) -> int:
        data = await self.call("GET", f"{app_id}/current")
        return int(data["generation"])


class BlobPut(Protocol):
    async def put(self, digest: str, chunks: AsyncIterator[bytes]) -> tuple[int, int]: ...


class PreReceive(Protocol):
    """The step that decides whether a push's refs are accepted (the build plugs
    in here). Lines given to `say` reach the pusher as ``remote: …``."""

    async def __call__(self, app: App, updates: Sequence[RefUpdate], say: Say) -> bool: ...


async def accept_push(app: App, updates: Sequence[RefUpdate], say: Say) -> bool:
    """Today's pre-receive step: every ref is stored, none is built yet."""
    for update in updates:
        if update.ref in BUILD_BRANCHES and not update.deleted:
            await say(f"-----> {app.name}: {update.ref[len('refs/heads/'):]} at {update.new[:7]} "
                      "received (no build yet: the ref is stored)")  # fmt: skip
    return True


def _file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    f = await trio.open_file(path, "rb")
    async with f:
        while chunk := await f.read(1 << 20):
            yield chunk


class PushSession:
    """One ``git-receive-pack`` POST (see the module's theory of operation)."""

    def __init__(
        self, app: App, node: str, repos: RepoStore, leader: LeaderLink, blobs: BlobPut,
        step: PreReceive, scratch: Path,
    ) -> None:  # fmt: skip
        self.app = app
        self.node = node
        self.repos = repos
        self.leader = leader
        self.blobs = blobs
        self.step = step
        self.scratch = scratch
        self.lease: int | None = None
        self.seen = 0

    async def pre_receive(self, updates: Sequence[RefUpdate], say: Say) -> bool:
        try:
            grant = await self.leader.call("POST", f"{self.app.id}/lease", {"node": self.node})
        except Conflict as exc:
            await say(f"flynnp2p: {exc.message}")
            return False
        except ClusterError as exc:
            await say(f"flynnp2p: cannot take the push lock of {self.app.name}: {exc.message}")
            return False
        self.lease, self.seen = int(grant["lease"]), int(grant["generation"])
        local = self.repos.generation(self.app.id)
        if local != self.seen:
            await say(
                f"flynnp2p: the repository of {self.app.name} changed on another node while this "
                f"push began (generation {self.seen} in the cluster, {local} here); push again"
            )
            return False
        return await self.step(self.app, updates, say)

    async def post_receive(self, updates: Sequence[RefUpdate], say: Say) -> None:
        app_id = self.app.id
        if self.lease is None:
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        path = self.scratch / f"{app_id}-{uuid.uuid4().hex}.bundle"
        try:
            digest: str | None = None
            size, holders = 0, 0
            if await self.repos.bundle(app_id, path):
                digest, size = await trio.to_thread.run_sync(_file_digest, path)
                _, holders = await self.blobs.put(str(digest), _file_chunks(path))
            body = {"lease": self.lease, "seen": self.seen, "digest": digest, "size": size}
            done = await self.leader.call("POST", f"{app_id}/commit", body)
            self.repos.set_generation(app_id, int(done["generation"]))
        except FlynnError as exc:
            self.repos.set_generation(app_id, -1)  # the next request restores the cluster's copy
            await say(f"flynnp2p: error: the push could not be saved ({exc.message}); "
                      "it is not kept: push again")  # fmt: skip
            return
        finally:
            path.unlink(missing_ok=True)
        where = f" on {holders} nodes" if digest else ""
        await say(f"-----> repository saved (generation {done['generation']}{where})")

    async def renew(self) -> None:
        if self.lease is not None:
            await self.leader.call("POST", f"{self.app.id}/lease/{self.lease}/keepalive")

    async def close(self) -> None:
        """Release the lease (bounded; if this fails, it expires by itself)."""
        lease, self.lease = self.lease, None
        if lease is None:
            return
        with trio.move_on_after(5):
            try:
                await self.leader.call("DELETE", f"{self.app.id}/lease/{lease}")
            except FlynnError as exc:
                log.warning("push lease %s of %s not released (it expires): %s", lease, self.app.name, exc)
