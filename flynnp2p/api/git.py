"""git smart HTTP at ``/git/<app>.git``, on every node, through `git http-backend`.

    GET  /git/<app>.git/info/refs?service=…     the refs (clone, fetch, push)
    POST /git/<app>.git/git-upload-pack          clone and fetch
    POST /git/<app>.git/git-receive-pack         push (see `flynnp2p.build.push`)

Authentication is HTTP basic, any user, the cluster token or its API key as the
password (`flynnp2p.api.app`); which requests pass is `flynnp2p.build.githttp`.

The leader's side of a push (peer credential only, under ``/v1/internal/``)::

    GET    /v1/internal/git/<app id>/current                  the saved repo: {"generation",
                                                              "digest", "size", "increments", "refs"}
    POST   /v1/internal/git/<app id>/lease      {"node"}      201 {"lease", "ttl", "saved"}; 409 busy
    POST   /v1/internal/git/<app id>/lease/<lease>/keepalive  {"ttl"}
    DELETE /v1/internal/git/<app id>/lease/<lease>
    POST   /v1/internal/git/<app id>/commit     {"lease", "seen", "saved"}: {"generation"}

Theory of operation: the CGI bridge
-----------------------------------
Before anything runs, the app's local repo is made the cluster's newest
(`flynnp2p.build.repo`: restored from its bundle when this node's generation
differs from the `Repo` record's; for a push, the generation is first asked of
the leader and the record awaited, bounded, so a push never starts on a repo
this node has not caught up with).

`git http-backend` runs as a child with the CGI environment of `githttp`. The
request body is streamed to its stdin while its stdout is read until the CGI
header block is complete (both in one nursery inside the view); the rest of
its stdout is the response body, streamed as the backend writes it (a build's
``remote:`` lines arrive live). Nothing is held whole in memory; a body is capped
at ``MAX_GIT_BODY``. The response's end (or the client going away) waits for,
or kills, the backend and ends the push (its lease released), shielded and
bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any, Protocol

import trio
from quart import Blueprint, Response, request

from flynnp2p.api import ops
from flynnp2p.api.context import ClusterContext
from flynnp2p.api.edge import answer, json_body, ref
from flynnp2p.build.githttp import (
    CgiError,
    CgiHead,
    GitRequest,
    cgi_environ,
    parse_git_request,
    split_cgi_head,
)
from flynnp2p.build.hooks import HookServer
from flynnp2p.build.push import (
    LEASE_TTL_S,
    BlobPut,
    LeaderLink,
    PreReceive,
    PushLocks,
    PushSession,
    Saved,
    accept_push,
)
from flynnp2p.build.repo import RepoStore
from flynnp2p.errors import ClusterError, NotFound, UserError
from flynnp2p.state.records import NODE, App, Repo
from flynnp2p.state.replica import Subscribable

log = logging.getLogger(__name__)

RECORD_WAIT_S = 5.0
BACKEND_EXIT_S = 10.0
PREFACE_MAX = 8 << 20  # output the backend may write before it has read the whole body
HOP_BY_HOP = frozenset({"connection", "transfer-encoding", "content-length"})


async def wait_for_generation(state: Subscribable, app_id: str, generation: int) -> Repo | None:
    """The app's `Repo` record once it reaches `generation` here (unbounded: the
    caller bounds it); subscribe before the snapshot, so no write slips between."""
    while True:
        async with state.subscribe([Repo.KIND]) as (snapshot, changes):
            found = snapshot.record(Repo, app_id)
            if found is not None and found.generation >= generation:
                return found
            async for batch in changes:
                if any(e.key == app_id for e in batch):
                    found = state.state.record(Repo, app_id)
                    if found is not None and found.generation >= generation:
                        return found


class RepoBlobs(BlobPut, Protocol):
    """What the git endpoints need of `flynnp2p.build.blobs.BlobService`."""

    async def local_path(self, digest: str) -> Path: ...


class GitApi:
    def __init__(
        self, ctx: ClusterContext, *, repos: RepoStore, hooks: HookServer, blobs: RepoBlobs,
        leader: LeaderLink, locks: PushLocks, node_name: str, scratch: Path,
        step: PreReceive = accept_push, prefetch: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.ctx = ctx
        self.repos = repos
        self.hooks = hooks
        self.blobs = blobs
        self.leader = leader
        self.locks = locks
        self.node = node_name
        self.scratch = scratch
        self.step = step
        self.prefetch = prefetch  # a push of app id begins: its build cache, ahead
        self.stats = {"backend_runs": 0, "restores": 0}

    # -- the repository, current --------------------------------------------

    async def make_current(self, app: App, for_push: bool) -> None:
        async with self.repos.lock(app.id):
            record = self.ctx.state.state.record(Repo, app.id)
            if for_push:
                wanted = await self.leader.current(app.id)
                if wanted and (record is None or record.generation < wanted):
                    record = await self._await_record(app, wanted)
            generation = record.generation if record is not None else 0
            if self.repos.generation(app.id) == generation:
                return
            bundles = [await self.blobs.local_path(d) for d in (record.blobs if record else ())]
            log.info("restoring the repo of %s (generation %d)", app.name, generation)
            self.stats["restores"] += 1
            await self.repos.restore(app.id, bundles, generation, record.refs if record else None)

    async def _await_record(self, app: App, generation: int) -> Repo:
        with trio.move_on_after(RECORD_WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.ctx.state.catch_up)
                found = await wait_for_generation(self.ctx.state, app.id, generation)
                nursery.cancel_scope.cancel()
                return found  # type: ignore[return-value]
        raise ClusterError(
            f"the repository of {app.name} (generation {generation}) has not reached this node "
            "yet; retry"
        )

    # -- the CGI bridge -----------------------------------------------------

    async def serve(self, rest: str) -> Response:
        req = parse_git_request(request.method, request.path, request.args.get("service"))
        try:
            app = ops.find_app(self.ctx.state.state, req.app)
        except NotFound:
            raise NotFound(f"no app named {req.app!r} (create it: flynnp2p create {req.app})") from None
        if req.is_push and self.prefetch is not None:  # while git negotiates and sends
            self.prefetch(app.id)
        await self.make_current(app, for_push=req.is_push)
        session: PushSession | None = None
        hook_env: dict[str, str] = {}
        if req.is_push and not req.advertise:
            session = PushSession(
                app, self.node, self.repos, self.leader, self.blobs, self.step, self.scratch
            )
            hook_env = self.hooks.register(session)
        try:
            return await self._run_backend(req, app, hook_env, session)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._end_push(hook_env, session)
            raise

    async def _end_push(self, hook_env: dict[str, str], session: PushSession | None) -> None:
        if session is not None:
            self.hooks.unregister(hook_env)
            await session.close()

    async def _run_backend(
        self, req: GitRequest, app: App, hook_env: dict[str, str], session: PushSession | None
    ) -> Response:
        env = cgi_environ(
            req, project_root=str(self.repos.root), repo_name=self.repos.path(app.id).name,
            method=request.method, query=request.query_string.decode("latin-1"),
            headers=dict(request.headers), remote_addr=request.remote_addr or "",
            base={**self.repos.env, **hook_env},
        )  # fmt: skip
        self.stats["backend_runs"] += 1
        errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _stop, after the response)
        # Its own process group: a stop takes receive-pack and the hooks with it.
        proc = await trio.lowlevel.open_process(
            ["git", "http-backend"], stdin=-1, stdout=-1, stderr=errors.fileno(), env=env,
            start_new_session=True,
        )  # fmt: skip
        try:
            head, preface = await self._start(proc)
        except BaseException:
            with trio.CancelScope(shield=True):
                await _stop(proc, errors, app)
            raise
        finished = _Finish(proc, errors, app, lambda: self._end_push(hook_env, session))
        resp = Response(finished.body(preface), status=head.status)
        for name, value in head.headers:
            if name.lower() not in HOP_BY_HOP:
                resp.headers[name] = value
        resp.timeout = None  # a clone or a build takes longer than quart's RESPONSE_TIMEOUT
        return resp

    async def _start(self, proc: trio.Process) -> tuple[CgiHead, bytes]:
        """Feed the request body to the backend while reading its header block (and
        whatever it writes before the body is all in, up to ``PREFACE_MAX``, so
        that a backend answering early never blocks on a full pipe)."""
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        found: list[tuple[CgiHead, bytes]] = []
        reading = trio.CancelScope()
        fed = trio.Event()
        failed: list[str] = []

        async def feed() -> None:
            try:
                async for chunk in request.body:
                    await stdin.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the backend stopped reading: its answer says why
            finally:
                await stdin.aclose()
                fed.set()
                if found:
                    reading.cancel()

        async def read() -> None:
            buf = b""
            with reading:
                while not found:
                    chunk = await stdout.receive_some(65536)
                    try:
                        if not chunk:
                            raise CgiError("git http-backend ended without an answer")
                        buf += chunk
                        split = split_cgi_head(buf)
                    except CgiError as exc:
                        failed.append(str(exc))
                        nursery.cancel_scope.cancel()
                        return
                    if split is not None:
                        found.append(split)
                while not fed.is_set() and len(found[0][1]) < PREFACE_MAX:
                    chunk = await stdout.receive_some(65536)
                    if not chunk:
                        return
                    found[0] = (found[0][0], found[0][1] + chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            nursery.start_soon(read)
        if failed or not found:
            raise ClusterError(f"git failed on this node: {failed[0] if failed else 'no answer'}")
        return found[0]


class _Finish:
    """The response body: the rest of the backend's output, then its end."""

    def __init__(
        self, proc: trio.Process, errors: IO[bytes], app: App, end: Callable[[], Any]
    ) -> None:
        self.proc = proc
        self.errors = errors
        self.app = app
        self.end = end

    async def body(self, preface: bytes) -> AsyncIterator[bytes]:
        assert self.proc.stdout is not None
        try:
            if preface:
                yield preface
            while chunk := await self.proc.stdout.receive_some(65536):
                yield bytes(chunk)
        finally:
            with trio.CancelScope(shield=True):
                await _stop(self.proc, self.errors, self.app)
                await self.end()


async def _stop(proc: trio.Process, errors: IO[bytes], app: App) -> None:
    """Wait (bounded) for the backend to exit, else kill its process group; log
    its complaints."""
    with trio.move_on_after(BACKEND_EXIT_S):
        await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    try:
        if proc.returncode:
            errors.seek(0)
            text = errors.read(4000).decode(errors="replace").strip()
            log.warning("git http-backend for %s exited %s: %s", app.name, proc.returncode, text)
    finally:
        errors.close()


# -- the leader's side ------------------------------------------------------


class GitLeaderApi:
    def __init__(self, ctx: ClusterContext, locks: PushLocks) -> None:
        self.ctx = ctx
        self.locks = locks

    async def _app(self, app_id: str) -> App:
        if not await self.ctx.acting_leader():
            raise ClusterError("this node is not the leader (leadership moved); retry")
        found = self.ctx.state.state.record(App, ref("app", app_id))
        if found is None:
            raise NotFound(f"no app {app_id!r}")
        return found

    async def _record(self, app: App, saved: Saved) -> None:
        """Write the `Repo` record of what etcd holds, if the state is behind it."""
        have = self.ctx.state.state.record(Repo, app.id)
        if saved.generation and (have is None or have.generation < saved.generation):
            await self.ctx.state.write([
                Repo(app_id=app.id, generation=saved.generation, updated_at=self.ctx.now_ms(),
                     digest=saved.digest, size=saved.size, increments=saved.increments,
                     refs=saved.refs)
            ])  # fmt: skip

    async def current(self, app_id: str) -> Response:
        app = await self._app(app_id)
        saved = await self.locks.current(app.id)
        await self._record(app, saved)
        return answer(saved.wire())

    async def acquire(self, app_id: str) -> Response:
        body = await json_body({"node"}, required={"node"})
        app = await self._app(app_id)
        node = NODE.decode("node", body["node"])
        lease, saved = await self.locks.acquire(app, node)
        await self._record(app, saved)
        return answer({"lease": lease, "ttl": LEASE_TTL_S, "saved": saved.wire()}, 201)

    async def keepalive(self, app_id: str, lease: int) -> Response:
        await self._app(app_id)
        ttl = await self.locks.keepalive(lease)
        if ttl <= 0:
            raise NotFound(f"push lease {lease} has expired")
        return answer({"ttl": ttl})

    async def release(self, app_id: str, lease: int) -> Response:
        await self._app(app_id)
        await self.locks.release(lease)
        return answer({"released": lease})

    async def commit(self, app_id: str) -> Response:
        body = await json_body({"lease", "seen", "saved"}, required={"lease", "seen", "saved"})
        app = await self._app(app_id)
        lease, seen, wire = body["lease"], body["seen"], body["saved"]
        if not all(type(v) is int and v >= 0 for v in (lease, seen)) or not isinstance(wire, dict):
            raise UserError("body: lease and seen are non-negative integers, saved an object")
        saved = Saved.from_wire({**wire, "generation": seen + 1})
        # The record's own checks, before etcd is touched.
        Repo(app_id=app.id, generation=seen + 1, updated_at=0, digest=saved.digest,
             size=saved.size, increments=saved.increments, refs=saved.refs)  # fmt: skip
        made = await self.locks.commit(app, lease, seen, saved)
        await self._record(app, made)
        return answer({"generation": made.generation})


def git_blueprint(ctx: ClusterContext, git: GitApi, leader: GitLeaderApi) -> Blueprint:
    bp = Blueprint("git", __name__)
    bp.add_url_rule("/git/<path:rest>", "git", git.serve, methods=["GET", "POST"])
    base = "/v1/internal/git/<app_id>"
    bp.add_url_rule(f"{base}/current", "git_current", leader.current, methods=["GET"])
    bp.add_url_rule(f"{base}/lease", "git_lease", leader.acquire, methods=["POST"])
    bp.add_url_rule(f"{base}/lease/<int:lease>/keepalive", "git_keepalive", leader.keepalive,
                    methods=["POST"])  # fmt: skip
    bp.add_url_rule(f"{base}/lease/<int:lease>", "git_release", leader.release, methods=["DELETE"])
    bp.add_url_rule(f"{base}/commit", "git_commit", leader.commit, methods=["POST"])
    return bp


def git_scratch(data_dir: Path) -> Path:
    return data_dir / "git" / ".scratch"


