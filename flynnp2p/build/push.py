"""A `git push` to any node: the push lease, the build seam, saving the repository.

Theory of operation
-------------------
Two things are decided once, in etcd, by the leader (`PushLocks`):

* ``f2p/push/<app id>``: the push lease, created only if absent and tied to an
  etcd lease of ``LEASE_TTL_S`` that the receiving node renews while the push
  runs. A second push to the app meanwhile, on any node, is refused with
  "another push to APP is in progress (on node N)". A node that dies mid-push
  frees the app when its lease runs out.
* ``f2p/repo/<app id>``: the newest saved repository (`Saved`: generation, base
  bundle, increments, refs), advanced by compare-and-swap from the generation
  the push started from; the `Repo` record is written from it (and written again from it by a
  leader that finds the record behind: a leader that died between the swap and
  the write leaves nothing lost).

A push (`PushSession`, one per ``git-receive-pack`` POST) goes:

    pre-receive  lease taken (refused: the push is refused, with the reason)
                 → the local repo must be the generation etcd holds (else another
                   node's push landed since this one began: refused, "retry")
                 → the save: the repository as the push will leave it (a scratch
                   repo on the quarantined objects, `RepoStore.staged`) stored in
                   the blobstore (≥2 nodes): where it pays, an increment (a bundle
                   of only what the push added, its prerequisites the refs the push
                   began from) on the saved chain, with the exact refs; else a full
                   bundle (`_save`). Refused if it cannot be stored: nothing is
                   released.
                 → meanwhile, the pre-receive step (`PreReceive`: the build, then,
                   once the save is done, the release and deploy; its lines reach
                   ``git push``): the save no longer waits for the build or the
                   build for the save (0.15-0.5 s of a warm push)
                 → the generation advanced by the leader (refused if the lease was
                   lost or etcd cannot be reached), the local repo marked with it
    refs move    (git receive-pack)
    end          once receive-pack has exited: the refs checked against the save (a
                 ref that did not move as saved: the local repo is marked stale, so
                 the next request restores the cluster's copy, which is the saved
                 one), then the lease released (shielded and bounded)

So a push git reports as accepted is built, released and saved in the cluster,
and a push whose save or record fails is refused before any ref moves: the next
node never restores a repository older than what a pusher was told was kept. A
bundle stored for a push then refused is referenced by nothing and collected.

A forced push (``git push --force``: a non-fast-forward the client asked for) is
accepted as git itself accepts it, built and deployed like any other; its save
is the forced history (an increment names the old tip as its prerequisite, which
the chain holds, and the refs are exact), so every node restores the forced
refs. A non-fast-forward without ``--force`` is refused by the git client.

Nodes reach the leader through `LeaderLink` (peer-credentialed HTTP to
``/v1/internal/git/…``, served by `flynnp2p.api.git`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import trio

from flynnp2p.build.hooks import GitSource, RefUpdate, Say
from flynnp2p.build.repo import RepoStore
from flynnp2p.coord.client import KV
from flynnp2p.errors import ClusterError, Conflict, FlynnError, NotFound
from flynnp2p.state.records import MAX_MANIFEST_REFS, App

log = logging.getLogger(__name__)

PUSH_PREFIX = "f2p/push/"
REPO_PREFIX = "f2p/repo/"
LEASE_TTL_S = 20
MAX_INCREMENTS = 8  # then a full bundle again: a restore applies at most 1 + 8
BUILD_BRANCHES = ("refs/heads/main", "refs/heads/master")


def push_key(app_id: str) -> str:
    return f"{PUSH_PREFIX}{app_id}"


def repo_key(app_id: str) -> str:
    return f"{REPO_PREFIX}{app_id}"


class KeyDeleter(Protocol):
    async def delete(self, key: str) -> int: ...


async def forget_repo(etcd: KeyDeleter, app_id: str) -> None:
    """Drop a deleted app's saved-repository counter and push lease from etcd (a
    push still running for it then fails its commit: its lease is gone)."""
    for key in (repo_key(app_id), push_key(app_id)):
        await etcd.delete(key)


def in_progress(app_name: str, node: str, silent: bool = False) -> str:
    if silent:  # that push died with its node: its lease runs out by itself
        return (
            f"another push to {app_name} holds its lock on node {node}, which is not "
            f"answering; the lock is freed within {LEASE_TTL_S} s of its last renewal: retry then"
        )
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


@dataclass(frozen=True)
class Saved:
    """The newest saved repository as etcd holds it (see `flynnp2p.state.records.Repo`)."""

    generation: int = 0
    digest: str | None = None
    size: int = 0
    increments: tuple[str, ...] = ()
    refs: Mapping[str, str] = field(default_factory=dict)
    mod_revision: int = 0

    def wire(self) -> dict[str, Any]:
        return {"generation": self.generation, "digest": self.digest, "size": self.size,
                "increments": list(self.increments), "refs": dict(self.refs)}  # fmt: skip

    @classmethod
    def from_wire(cls, data: Mapping[str, Any], mod_revision: int = 0) -> Saved:
        g = data.get("generation")
        digest, size = data.get("digest"), data.get("size")
        inc, refs = data.get("increments"), data.get("refs")
        if not isinstance(g, int) or g < 0:
            raise ClusterError("the saved repository's generation is not readable")
        return cls(
            g, digest if isinstance(digest, str) else None, size if isinstance(size, int) else 0,
            tuple(d for d in inc if isinstance(d, str)) if isinstance(inc, list) else (),
            {str(k): str(v) for k, v in refs.items()} if isinstance(refs, dict) else {},
            mod_revision,
        )  # fmt: skip


def _saved(kv: KV | None) -> Saved:
    if kv is None:
        return Saved()
    data = kv.json()
    if not isinstance(data, dict):
        raise ClusterError("the repo counter in etcd is not readable")
    return Saved.from_wire(data, kv.mod_revision)


class PushLocks:
    """Used on the leader only (its etcd member is a voter)."""

    def __init__(
        self, etcd: Callable[[], LeaseStore], now_ms: Callable[[], int],
        silent: Callable[[], Collection[str]] = frozenset,
    ) -> None:  # fmt: skip
        self.etcd = etcd
        self.now_ms = now_ms
        self.silent = silent  # the nodes that do not answer (`gossip.heartbeat`)

    async def current(self, app_id: str) -> Saved:
        """The app's newest saved repository."""
        return _saved(await self.etcd().get(repo_key(app_id)))

    async def acquire(self, app: App, node: str) -> tuple[int, Saved]:
        """(the push lease, the saved repository the push builds on); `Conflict`
        while another push holds the app."""
        etcd = self.etcd()
        lease, _ = await etcd.grant(LEASE_TTL_S)
        value = json.dumps({"node": node, "at": self.now_ms()})
        ok, _ = await etcd.create({push_key(app.id): value}, lease=lease)
        if not ok:
            await etcd.revoke(lease)
            held = await etcd.get(push_key(app.id))
            data = held.json() if held is not None else None
            holder = data.get("node") if isinstance(data, dict) else None
            raise Conflict(in_progress(app.name, str(holder or "another node"), holder in self.silent()))
        return lease, await self.current(app.id)

    async def keepalive(self, lease: int) -> int:
        return await self.etcd().keepalive(lease)

    async def release(self, lease: int) -> None:
        await self.etcd().revoke(lease)

    async def commit(self, app: App, lease: int, seen: int, saved: Saved) -> Saved:
        """Advance the repo counter from `seen` to `saved` (while `lease` still
        holds the push); the generation it got."""
        etcd = self.etcd()
        held = await etcd.get(push_key(app.id))
        if held is None or held.lease != lease:
            raise Conflict(f"the push lock of {app.name} was lost (the push took too long?); push again")
        now = _saved(await etcd.get(repo_key(app.id)))
        if now.generation != seen:
            raise Conflict(
                f"the repository of {app.name} changed meanwhile (generation {now.generation}, "
                f"this push began at {seen}); fetch and push again"
            )
        made = dataclasses.replace(saved, generation=seen + 1)
        value = json.dumps({**made.wire(), "at": self.now_ms()})
        if not await etcd.swap(repo_key(app.id), value, now.mod_revision):
            raise Conflict(f"the repository of {app.name} changed meanwhile; fetch and push again")
        return made


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

    async def acquire(self, app_id: str, node: str) -> tuple[int, Saved]:
        data = await self.call("POST", f"{app_id}/lease", {"node": node})
        return int(data["lease"]), Saved.from_wire(data["saved"])


class BlobPut(Protocol):
    async def put(self, digest: str, chunks: AsyncIterator[bytes]) -> tuple[int, int]: ...


class PreReceive(Protocol):
    """The step that decides whether a push's refs are accepted (the build plugs
    in here). Lines given to `say` reach the pusher as ``remote: …``. It runs while
    the push is saved, and awaits ``source.wait_saved()`` before it releases
    anything."""

    async def __call__(
        self, app: App, updates: Sequence[RefUpdate], say: Say, source: GitSource
    ) -> bool: ...


async def accept_push(app: App, updates: Sequence[RefUpdate], say: Say, source: GitSource) -> bool:
    """A pre-receive step that builds nothing: every ref is stored (tests' default)."""
    for update in updates:
        if update.ref in BUILD_BRANCHES and not update.deleted:
            await say(f"-----> {app.name}: {update.ref[len('refs/heads/'):]} at {update.new[:7]} "
                      "received (no build yet: the ref is stored)")  # fmt: skip
    return True


class _Saving:
    """The push's save, run beside its step: `wait` (for the step: raises if the
    save failed) and `outcome` (for the session: what to record)."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: tuple[Saved, int, str] | None = None
        self._error: FlynnError | None = None

    async def run(
        self, save: Callable[[Mapping[str, str], Mapping[str, str]], Awaitable[tuple[Saved, int, str]]],
        refs: Mapping[str, str], objects: Mapping[str, str],
    ) -> None:  # fmt: skip
        try:
            self._value = await save(refs, objects)
        except FlynnError as exc:
            self._error = FlynnError(f"the push could not be saved ({exc.message})")
        except OSError as exc:  # e.g. a full disk under the scratch repo
            self._error = FlynnError(f"the push could not be saved ({exc.strerror or exc})")
        finally:
            self._done.set()

    async def outcome(self) -> tuple[Saved, int, str]:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    async def wait(self) -> None:
        await self.outcome()


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


def _full(path: Path) -> Path:
    return path.with_name(path.name + ".full")


def refs_after(refs: Mapping[str, str], updates: Sequence[RefUpdate]) -> dict[str, str]:
    """The refs a repo holding `refs` holds once `updates` are applied."""
    out = dict(refs)
    for update in updates:
        if update.deleted:
            out.pop(update.ref, None)
        else:
            out[update.ref] = update.new
    return out


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
        self.base = Saved()
        self.old_refs: dict[str, str] = {}
        self.saved_refs: dict[str, str] | None = None  # recorded by the leader, not yet seen moved

    async def pre_receive(
        self, updates: Sequence[RefUpdate], say: Say, objects: Mapping[str, str]
    ) -> bool:
        try:
            self.lease, self.base = await self.leader.acquire(self.app.id, self.node)
        except Conflict as exc:
            await say(f"flynnp2p: {exc.message}")
            return False
        except ClusterError as exc:
            await say(f"flynnp2p: cannot take the push lock of {self.app.name}: {exc.message}")
            return False
        local = self.repos.generation(self.app.id)
        if local != self.base.generation:
            await say(
                f"flynnp2p: the repository of {self.app.name} changed on another node while this "
                f"push began (generation {self.base.generation} in the cluster, {local} here); "
                "push again"
            )
            return False
        self.old_refs = await self.repos.refs(self.app.id)  # the refs have not moved yet
        refs = refs_after(self.old_refs, updates)
        saving = _Saving()
        # The save runs while the step builds; the step waits for it before it
        # releases anything (`GitSource.wait_saved`), so a push the cluster cannot
        # keep deploys nothing.
        source = GitSource(self.repos.path(self.app.id), objects, saved=saving.wait)
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(saving.run, self._save, refs, objects)
            try:
                ok = await self.step(self.app, updates, say, source)
            except Exception as exc:  # raised here, out of the nursery: an ExceptionGroup
                ok, failure = False, exc
            if not ok:
                nursery.cancel_scope.cancel()  # its bundle, if stored, is collected
        if failure is not None:
            raise failure
        if not ok:
            return False
        try:
            saved, holders, how = await saving.outcome()
        except FlynnError as exc:
            await say(f"flynnp2p: error: {exc.message}; nothing was released or changed: push again")
            return False
        try:
            body = {"lease": self.lease, "seen": self.base.generation, "saved": saved.wire()}
            done = await self.leader.call("POST", f"{self.app.id}/commit", body)
            generation = int(done["generation"])
        except FlynnError as exc:
            await say(f"flynnp2p: error: the push could not be recorded ({exc.message}); it is "
                      "refused and no ref moved: push again (a release it made stays deployed "
                      "until the next push or a rollback)")  # fmt: skip
            return False
        self.saved_refs = refs
        self.repos.set_generation(self.app.id, generation)  # its refs move next
        where = f" on {holders} nodes" if holders else ""
        await say(f"-----> repository saved (generation {generation}{where}, {how})")
        return True

    async def _check_moved(self) -> None:
        """The local repo holds the saved refs, or is marked stale (restored next)."""
        wanted, self.saved_refs = self.saved_refs, None
        if wanted is None:
            return
        try:
            moved = await self.repos.refs(self.app.id) == wanted
            if moved:
                await self.repos.point_head(self.app.id, wanted)
        except FlynnError:
            moved = False
        if not moved:
            log.warning("the refs of %s did not move as saved; its repo is restored next", self.app.name)
            self.repos.set_generation(self.app.id, -1)

    async def _save(self, refs: Mapping[str, str], objects: Mapping[str, str]) -> tuple[Saved, int, str]:
        """The repository with `refs` in the blobstore: an increment on the saved
        chain where that pays, else a full bundle; (what to record, holders, how)."""
        if not refs:
            return Saved(), 0, "no refs"
        self.scratch.mkdir(parents=True, exist_ok=True)
        path = self.scratch / f"{self.app.id}-{uuid.uuid4().hex}.bundle"
        try:
            async with self.repos.staged(self.app.id, objects, refs) as staged:
                return await self._store(staged, path, dict(refs))
        finally:
            for leftover in (path, _full(path)):
                leftover.unlink(missing_ok=True)

    async def _store(self, staged: Path, path: Path, refs: dict[str, str]) -> tuple[Saved, int, str]:
        base = self.base
        chain_ok = (
            base.digest is not None and self.old_refs and len(base.increments) < MAX_INCREMENTS
            and len(refs) <= MAX_MANIFEST_REFS
        )  # fmt: skip
        if chain_ok and not await self.repos.bundle_since(staged, path, set(self.old_refs.values())):
            return dataclasses.replace(base, refs=refs), 0, "refs only"  # moved back or deleted
        if chain_ok:
            digest, size = await trio.to_thread.run_sync(_file_digest, path)
            if size * 2 <= base.size:
                _, holders = await self.blobs.put(digest, _file_chunks(path))
                increments = (*base.increments, digest)
                saved = dataclasses.replace(base, increments=increments, refs=refs)
                return saved, holders, f"increment {len(increments)}"
        full = _full(path)
        await self.repos.bundle(staged, full)
        digest, size = await trio.to_thread.run_sync(_file_digest, full)
        _, holders = await self.blobs.put(digest, _file_chunks(full))
        return Saved(digest=digest, size=size), holders, "full bundle"

    async def renew(self) -> None:
        if self.lease is not None:
            await self.leader.call("POST", f"{self.app.id}/lease/{self.lease}/keepalive")

    async def close(self) -> None:
        """After receive-pack has exited: the refs checked against the save (a push
        recorded whose refs did not move, receive-pack stopped first, leaves the local
        repo stale, restored on the next request); then the lease released (bounded;
        if this fails, it expires by itself)."""
        await self._check_moved()
        lease, self.lease = self.lease, None
        if lease is None:
            return
        with trio.move_on_after(5):
            try:
                await self.leader.call("DELETE", f"{self.app.id}/lease/{lease}")
            except FlynnError as exc:
                log.warning("push lease %s of %s not released (it expires): %s", lease, self.app.name, exc)
