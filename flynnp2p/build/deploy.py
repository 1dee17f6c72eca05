"""git push → build → release → running: the pre-receive step of a push to main or master.

Theory of operation
-------------------
`BuildStep` is the `flynnp2p.build.push.PreReceive` the agent plugs into git push.
It runs before any ref moves, so a failed build rejects the push (git prints
"pre-receive hook declined") and the running release keeps serving:

1. the pushed commit's tree is exported from git's quarantine (`GitSource.export`);
2. the app's build cache is restored (`flynnp2p.build.cache`: the newest one
   saved on any node; one that cannot be restored makes the build cold);
3. the builder (`flynnp2p.build.builder.build`) compiles it with the app's
   current env, in its sandbox, under the app's limits (``build_memory_mb``,
   ``build_timeout_s`` of its `App` record), every line of output sent to the
   pusher as ``remote:       …``; a slug over the cluster's size limit
   (`flynnp2p.build.slugsize`) fails the build;
4. the slug is stored in the blobstore (replicated to a second node before it is
   acknowledged), and meanwhile the build cache is saved there and the build's
   sandbox is removed (the sandbox's tree, a virtualenv's thousand files, took
   0.05-0.8 s to remove on the push's path), and the slug is made ready for
   this node's jobs (``unpack``: the build's tree is moved into place as the slug
   unpacked, and the release names this node in its meta, ``build.node``: the
   scheduler places the release's first job here when the spread allows, and that
   job starts without fetching or unpacking the slug);
   none of these ever fails the push;
5. once the push's repository is saved in the cluster (`GitSource.wait_saved`:
   the save runs beside steps 1-4, `flynnp2p.build.push`; a save that fails
   refuses the push before anything is released), the release is made through
   this node's own API (``POST /v1/apps/<app>/releases
   {"slug", "process_types"}``, forwarded to the leader, which numbers it and moves
   the formation to it: the first release with a ``web`` type runs ``web=1``), with
   the commit in its meta and the process types the build wrote into the slug's
   Procfile (so the API need not read them out of the slug again);
6. the push waits (``wait_s``) until the new release's web jobs are up and says
   where the app answers, or says why not. It reads the deployment (and, while it
   runs, the formation and the jobs) again as soon as this node's event stream
   (``GET /v1/events?kinds=deployment,job``) says one changed, and every
   ``deployments.POLL_S`` besides (a stream that cannot be opened, or a change it
   missed, costs that long at most). It ends once the deployment is finished, or
   once as many of the new release's web jobs are up as the formation asks for:
   what is left then is the old jobs' drain, and waiting for the deployment to say
   so (the scheduler's stop, the old host's report, the watcher's verdict, back to
   this node) took 0.11 s of every push.

Everything the step says to the pusher is also kept in the app's log with
source ``build`` (`flynnp2p.build.buildlog`). Pushes of other refs are stored only. A step error that is not the build's
(the cluster cannot store the slug or make the release) refuses the push too,
with the reason: nothing is half-made, since a slug no release names is collected.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import trio

from flynnp2p import deployments
from flynnp2p.build.builder import BuildError, BuildLimits, BuildResult, build
from flynnp2p.build.buildlog import BuildLog, LogSink
from flynnp2p.build.cache import BuildCaches
from flynnp2p.build.hooks import GitSource, RefUpdate, Say
from flynnp2p.build.push import BUILD_BRANCHES
from flynnp2p.build.slugsize import DEFAULT_SLUG_MAX_MB, MIB, slug_too_big
from flynnp2p.errors import FlynnError
from flynnp2p.host.space import is_full, no_space
from flynnp2p.state.records import BUILT_ON, App

log = logging.getLogger(__name__)

INDENT = "       "  # Heroku's: buildpack output under the "-----> " headings
WAIT_S = 60.0


def remove_tree(path: Path) -> str | None:
    """Remove `path` and everything under it (blocking); None, or why it could not."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return str(exc) or type(exc).__name__
    return None


class Slugs(Protocol):
    async def put(self, digest: str, chunks: AsyncIterator[bytes]) -> tuple[int, int]: ...


class _Wakeups:
    """Level-triggered: `sleep` returns at once when a change came since it last
    returned, else at the next change or after `seconds`."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def set(self) -> None:
        self._changed.set()

    async def sleep(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._changed.wait()
        self._changed = trio.Event()


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    f = await trio.open_file(path, "rb")
    async with f:
        while chunk := await f.read(1 << 20):
            yield chunk


def limits_of(app: App) -> BuildLimits:
    """The app's build limits (its `App` record's settings)."""
    return BuildLimits(memory_mb=app.build_memory_mb, timeout_s=float(app.build_timeout_s))


# Makes slug (tarball, digest) ready for this node's jobs; the build's tree of it when
# there is one (`flynnp2p.host.prepare.Preparer.unpacked_slug`).
Unpack = Callable[[Path, str, Path | None], Awaitable[object]]


class BuildStep:
    """`api`: a client of this node's own API carrying the peer credential;
    `work_root`: where builds run (and each app's cache is kept when there is
    no `caches`); `logs`: where the ``build`` lines of an app's log go."""

    def __init__(
        self, *, api: httpx.AsyncClient, api_url: str, slugs: Slugs, work_root: Path,
        wait_s: float = WAIT_S, caches: BuildCaches | None = None, logs: LogSink | None = None,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        remove: Callable[[Path], str | None] = remove_tree,
        unpack: Unpack | None = None,
        slug_max_bytes: int = DEFAULT_SLUG_MAX_MB * MIB,
        node: str | None = None,
    ) -> None:  # fmt: skip
        self.api = api
        self.api_url = api_url.rstrip("/")
        self.slugs = slugs
        self.work_root = work_root
        self.wait_s = wait_s
        self.caches = caches
        self.logs = logs
        self.now_ms = now_ms
        self.remove = remove
        self.unpack = unpack
        self.slug_max_bytes = slug_max_bytes
        self.node = node
        self.stats = {"builds": 0, "builds_failed": 0, "releases": 0}
        # What failed of the work done while the release deploys (it never fails the push).
        self.meanwhile_failed = {"teardown": 0, "unpack": 0}

    async def __call__(
        self, app: App, updates: Sequence[RefUpdate], say: Say, source: GitSource
    ) -> bool:
        wanted = [u for u in updates if u.ref in BUILD_BRANCHES and not u.deleted]
        if not wanted:
            return True
        if len(wanted) > 1:
            await say(" !     push main or master, not both at once: each would deploy")
            return False
        update = wanted[0]
        branch = update.ref[len("refs/heads/"):]
        if self.logs is None:
            return await self._step(app, update, branch, say, source)
        log = BuildLog(self.logs, app.name, self.now_ms)

        async def tell(text: str) -> None:
            await say(text)
            await log.line(text)

        try:
            return await self._step(app, update, branch, tell, source)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await log.flush()

    async def _step(
        self, app: App, update: RefUpdate, branch: str, say: Say, source: GitSource
    ) -> bool:
        await say(f"-----> Building {app.name} ({branch} at {update.new[:7]})")
        self.stats["builds"] += 1
        await trio.to_thread.run_sync(lambda: self.work_root.mkdir(parents=True, exist_ok=True))
        tmp = Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(dir=self.work_root)))
        try:
            return await self._build_and_release(app, update, say, source, tmp)
        except BuildError as exc:
            self.stats["builds_failed"] += 1
            await say(f" !     {exc.message}")
            await say(" !     Push rejected: the build failed; the running release keeps serving.")
            return False
        except FlynnError as exc:
            self.stats["builds_failed"] += 1
            await say(f" !     {exc.message}")
            await say(" !     Push rejected; the running release keeps serving. Push again.")
            return False
        except OSError as exc:  # the disk filled outside the builder (the source's export):
            if not is_full(exc):  # refused, as the builder's own (it would end the agent)
                raise
            self.stats["builds_failed"] += 1
            node = self.caches.node if self.caches is not None else "this node"
            await say(f" !     {no_space(node, 'the push could not be built', exc.strerror or str(exc))}")
            await say(" !     Push rejected; the running release keeps serving. Push again once "
                      "space is freed.")  # fmt: skip
            return False
        finally:
            with trio.CancelScope(shield=True):  # a push cut off mid-build leaves nothing
                await trio.to_thread.run_sync(shutil.rmtree, tmp, True)

    async def _build_and_release(
        self, app: App, update: RefUpdate, say: Say, source: GitSource, tmp: Path
    ) -> bool:
        src = tmp / "src"
        await source.export(update.new, src)
        env = (await self._get(f"/v1/apps/{quote(app.id)}/env"))["env"]

        async def line(text: str) -> None:
            await say(INDENT + text)

        if self.caches is not None:
            cache_dir = await self.caches.restore(app.id, say)
        else:
            cache_dir = self.work_root / "cache" / app.id
        started = time.monotonic()
        result = await build(
            src, app_id=app.id, work_dir=tmp / "out", cache_dir=cache_dir, env=env, on_line=line,
            limits=limits_of(app), remove_sandbox=False,
            node=self.caches.node if self.caches is not None else "this node",
        )  # fmt: skip
        too_big = slug_too_big(result.size, self.slug_max_bytes)  # before anything is stored
        if too_big is not None:
            raise BuildError(too_big)
        kinds = ", ".join(sorted(result.process_types)) or "none"
        await say(f"-----> Built in {time.monotonic() - started:.1f} s with "
                  f"{', '.join(result.buildpacks) or 'a buildpack'}; process types: {kinds}")  # fmt: skip
        failed: FlynnError | None = None
        async with trio.open_nursery() as nursery:
            # Meanwhile, and none of these ever fails the push: the build's tree and source
            # go (a virtualenv's thousand files), the slug is unpacked for this node's
            # jobs, the cache is saved.
            nursery.start_soon(self._slug_here_then_tear_down, result, src)
            if self.caches is not None:
                nursery.start_soon(self.caches.save, app.id, tmp, say)
            try:  # (caught in here: out of the nursery it would be an ExceptionGroup)
                await source.wait_saved()  # the push's save ran beside the build
                release_id = await self._release(app, update, result, say)
                if "web" in result.process_types:
                    await self._wait_web(app, release_id, say)
            except FlynnError as exc:
                failed = exc
        if failed is not None:
            raise failed
        return True

    async def _tear_down(self, paths: Sequence[Path]) -> None:
        """Remove what the build left but the release does not need, while the release
        is made and deployed. What cannot be removed is logged and counted; the step's
        scratch, removed as the step ends, takes whatever is left. Each build has its
        own scratch (``mkdtemp``), so the next build on this node cannot meet it."""
        for path in paths:
            why = await trio.to_thread.run_sync(self.remove, path)
            if why is not None:
                self.meanwhile_failed["teardown"] += 1
                log.warning("build scratch %s not removed (the step's end tries again): %s", path, why)

    async def _slug_here_then_tear_down(self, result: BuildResult, src: Path) -> None:
        """The slug made ready for this node's jobs (the build's tree moved into place
        as it), then the rest of the build's scratch removed."""
        if self.unpack is not None:
            await self._unpack_here(self.unpack, result)
        await self._tear_down([p for p in (result.sandbox, src) if p is not None])

    async def _unpack_here(self, unpack: Unpack, result: BuildResult) -> None:
        """The slug unpacked for this node's jobs while the release is made (the
        build's own tree moved into place as it, where it can be): the scheduler
        places the release's first job on the node that built its slug when it can,
        and that job then starts without unpacking it. Never fails the push."""
        try:
            await unpack(result.slug_path, result.digest, result.app_dir)
        except (FlynnError, OSError) as exc:
            self.meanwhile_failed["unpack"] += 1
            log.warning("slug %s not unpacked ahead (a job here unpacks it): %s", result.digest, exc)

    async def _release(self, app: App, update: RefUpdate, result: BuildResult, say: Say) -> str:
        """Store the slug, make the release; its id. The release is given the slug's
        process types as the build read them (they are its Procfile), so the API
        need not decompress the slug again, here and on the leader, to read them."""
        _, holders = await self.slugs.put(result.digest, _chunks(result.slug_path))
        meta = {"git.commit": update.new, "git.ref": update.ref}
        if self.node is not None and self.unpack is not None:  # unpacked here meanwhile
            meta[BUILT_ON] = self.node
        body = {"slug": result.digest, "meta": meta, "process_types": result.process_types}
        made = await self._post(f"/v1/apps/{quote(app.id)}/releases", body)
        release = made["release"]
        self.stats["releases"] += 1
        await say(f"-----> Released v{release.get('version', '?')} (slug on {holders} node(s))")
        return str(release["id"])

    async def _wait_web(self, app: App, release_id: str, say: Say) -> None:
        """Wait for the deployment of `release_id` (`flynnp2p.deployments`) and say how
        it ended: where the app answers, or why it failed, with the failing job's last
        log lines, and that the previous release still serves."""
        base = f"/v1/apps/{quote(app.id)}"
        timeout = max(self.wait_s, app.deploy_timeout_s + 10.0)  # the watcher ends it by then
        web_up = False

        async def settled(dep: Any) -> bool:
            nonlocal web_up
            web_up = await self._web_up(base, release_id)
            return web_up

        async with trio.open_nursery() as nursery:
            wakeups = await nursery.start(self._deployment_changes)
            dep = await deployments.wait_for(
                self._get, app.id, release_id, timeout_s=timeout, sleep=wakeups.sleep,
                monotonic=time.monotonic, settled=settled,
            )  # fmt: skip
            nursery.cancel_scope.cancel()
        if web_up and dep is not None and not deployments.finished(dep):
            # The old jobs drain; a new job that crashes from here on is the watcher's to
            # roll back, as one that crashes once the deploy is complete.
            dep = {**dep, "status": "complete"}
        if not deployments.finished(dep) or dep is None:
            await say(f" !     the deploy is not finished after {timeout:.0f} s: see 'flynnp2p "
                      "deployment' and 'flynnp2p ps' (the release is made; it keeps deploying)")  # fmt: skip
            return
        if dep["status"] == "complete":
            formation = (await self._get(f"{base}/formation"))["formation"] or {}
            want = int(formation.get("processes", {}).get("web", 0))
            if want == 0:
                await say("-----> web is scaled to 0: 'flynnp2p scale web=1' runs it")
                return
            routes = (await self._get(f"{base}/routes"))["routes"]
            where = next((r["domain"] for r in routes if r["type"] == "http"), app.name)
            await say(f"-----> web is up ({want} job(s)): http://{where}:8080/")
            return
        releases = (await self._get(f"{base}/releases"))["releases"]
        versions = {r["id"]: int(r.get("version", 0)) for r in releases}
        tail: list[str] = []
        params = deployments.log_params(dep)
        if params is not None:
            try:
                resp = await self.api.get(self.api_url + f"{base}/log", params=params, timeout=15)
                tail = deployments.log_tail(resp.text) if resp.status_code == 200 else []
            except httpx.HTTPError:
                tail = []  # best effort: the reason is said anyway
        for line in deployments.report(dep, versions, tail):
            await say(f" !     {line}")

    async def _web_up(self, base: str, release_id: str) -> bool:
        """As many web jobs of `release_id` are up as the formation (on it) asks for."""
        formation = (await self._get(f"{base}/formation"))["formation"] or {}
        want = int(formation.get("processes", {}).get("web", 0))
        if formation.get("release_id") != release_id or want == 0:
            return False
        jobs = (await self._get(f"{base}/jobs"))["jobs"]
        up = [j for j in jobs if j.get("release_id") == release_id and j.get("process_type") == "web"
              and j.get("state") == "up"]  # fmt: skip
        return len(up) >= want

    async def _deployment_changes(
        self, *, task_status: trio.TaskStatus[_Wakeups] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Wake the wait on every deployment change this node's event stream reports;
        started once the stream answered (subscribed before the wait's first read),
        or at once when it cannot be opened (the wait then only polls)."""
        wakeups = _Wakeups()
        url = self.api_url + "/v1/events"
        started = False
        try:
            async with self.api.stream(
                "GET", url, params={"kinds": "deployment,job"}, timeout=httpx.Timeout(10, read=None)
            ) as resp:
                if resp.status_code == 200:
                    async for line in resp.aiter_lines():
                        if not started:  # the stream's first line: it is subscribed
                            started = True
                            task_status.started(wakeups)
                        if line.startswith("data:"):
                            wakeups.set()
        except httpx.HTTPError:
            pass  # the wait polls
        if not started:
            task_status.started(wakeups)
        await trio.sleep_forever()

    async def _get(self, path: str) -> Any:
        return await self._call("GET", path, None)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        try:
            resp = await self.api.request(method, self.api_url + path, json=body, timeout=30)
        except httpx.HTTPError as exc:
            raise FlynnError(f"this node's API did not answer {method} {path}: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200]
            raise FlynnError(f"{method} {path}: {resp.status_code} {message}")
        return resp.json()
