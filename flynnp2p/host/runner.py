"""The host side of scheduling: run what the leader placed on this node, report it.

Theory of operation
-------------------
The leader writes `Placement` records; every node runs a `HostRunner` that watches
the placements naming it and converges its backend on them. The runner is the
only writer of this node's `Job` records (LWW stays safe: one writer per key).

`_converge` runs on every change of placements, jobs, releases or artifacts (and
once a second). It never awaits: it decides, per placement for this node, and
spawns or signals per-job tasks:

* a **start** placement with no local run is started when the job has never run
  (no `Job` record), when the leader ordered a restart (``generation`` above the
  record's), or when the record says the job should be running but this agent
  does not run it (the agent restarted: the job comes back). Down or crashed jobs
  of the same generation are left alone (the leader decides what happens next).
* **fencing**: a placement this node has not acted on yet whose ``epoch`` is older
  than the newest epoch seen (in the membership or in any placement) comes from a
  deposed leader; it is reported ``down`` with the reason, never started, and the
  current leader replaces it.
* a **stop** placement stops the local run (SIGTERM, grace, SIGKILL), or marks the
  record down if nothing runs here (a job lost with a previous agent run).
* records of this node whose placement was deleted are deleted; local runs whose
  placement was deleted are stopped (a placement merely missing, as in a replica
  being refilled after a reset, stops nothing).

One task per run (`_run_job`) owns it from start to its last report: wait for the
release and artifact to reach this replica, fetch and unpack the slug (`pending`),
allocate a port and start it (`starting`), wait for the health check to pass
(`up`), then wait for the exit (`crashed` or, when stopped or a one-off that
exited 0, `down`), with the exit status and a reason. A run that fails its health
check within ``boot_timeout_s`` is stopped and reported crashed.

Reports are state writes; a write the cluster cannot acknowledge now is committed
here and spreads later, so a report never fails a job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from flynnp2p.errors import FlynnError
from flynnp2p.host.backend import JobBackend, JobSpec
from flynnp2p.host.health import HealthTimeout, wait_healthy
from flynnp2p.host.ports import PortAllocator
from flynnp2p.host.slug import unpack_slug
from flynnp2p.state.jobs import fenced_reason, is_finished
from flynnp2p.state.merge import Change, Delete
from flynnp2p.state.records import (
    App,
    Artifact,
    HealthCheck,
    Job,
    Placement,
    ProcessSpec,
    Release,
)
from flynnp2p.state.service import StateService

log = logging.getLogger(__name__)

WATCHED_KINDS = (Placement.KIND, Job.KIND, Release.KIND, Artifact.KIND, App.KIND)
RECORD_WAIT_S = 30.0  # how long a run waits for its release/artifact to replicate here


_R = TypeVar("_R", Release, App, Artifact)


class Blobs(Protocol):
    """What the runner needs from `flynnp2p.build.blobs.BlobService`."""

    async def local_path(self, digest: str) -> Path: ...


class StartFailed(Exception):
    """A run could not start; the text is the reason reported on the job."""


@dataclass
class _Run:
    placement: Placement
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    stop_reason: str | None = None
    started: bool = False  # the backend runs it: a stop goes through the backend
    stopping: trio.Event = field(default_factory=trio.Event)


class HostRunner:
    def __init__(
        self,
        node: str,
        addr: str,
        state: StateService,
        backend: JobBackend,
        blobs: Blobs,
        ports: PortAllocator,
        epoch_floor: Callable[[], int],
        now_ms: Callable[[], int],
        work_dir: Path,
        *,
        stop_grace_s: float = 10.0,
        boot_timeout_s: float = 60.0,
    ) -> None:
        self.node = node
        self.addr = addr
        self.state = state
        self.backend = backend
        self.blobs = blobs
        self.ports = ports
        self.epoch_floor = epoch_floor
        self.now_ms = now_ms
        self.work_dir = work_dir
        self.stop_grace_s = stop_grace_s
        self.boot_timeout_s = boot_timeout_s
        self.runs: dict[str, _Run] = {}
        self.adopted: dict[str, JobSpec] = {}
        self._busy: set[str] = set()  # jobs with a bookkeeping task in flight
        self.closing = False
        self.stats = {"started": 0, "stopped": 0, "fenced": 0, "adopted": 0, "crashed": 0}
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for spec in await self.backend.recover():
            self.adopted[spec.job_id] = spec
            if spec.port is not None:
                self.ports.reserve(spec.job_id, spec.port)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch)
            task_status.started()
            while True:
                self._wake = trio.Event()
                self._converge()
                with trio.move_on_after(1.0):
                    await self._wake.wait()

    async def _watch(self) -> None:
        while True:
            async with self.state.subscribe(WATCHED_KINDS) as (_, changes):
                self._wake.set()
                async for _batch in changes:
                    self._wake.set()

    # -- deciding -------------------------------------------------------------

    async def shutdown(self, timeout_s: float) -> None:
        """The node leaves the cluster: stop every job here and report them down."""
        self.closing = True
        reason = f"node {self.node} left the cluster"
        for run in list(self.runs.values()):
            self._stop(run, reason)
        for job_id in list(self.adopted):
            self._spawn(job_id, self._stop_adopted, job_id, reason)
        with trio.move_on_after(timeout_s):
            while self.runs or self._busy:  # noqa: ASYNC110 - their tasks end on their own
                await trio.sleep(0.05)

    def _converge(self) -> None:
        assert self._nursery is not None
        if self.closing:
            return
        state = self.state.state
        placements = state.records(Placement)
        mine = [p for p in placements if p.host == self.node]
        floor = max([self.epoch_floor(), *(p.epoch for p in placements)])
        placed = {p.id for p in mine}
        for p in mine:
            run = self.runs.get(p.id)
            job = state.record(Job, p.id)
            if p.action == "stop":
                reason = p.reason or "stopped by the scheduler"
                if run is not None:
                    self._stop(run, reason)
                elif p.id in self.adopted:
                    self._spawn(p.id, self._stop_adopted, p.id, reason)
                elif job is not None and not is_finished(job.state, job.one_off):
                    record = dataclasses.replace(
                        job, state="down", reason=reason, updated_at=self.now_ms()
                    )
                    self._spawn(p.id, self._write, [record])
                continue
            if run is not None:
                if p.generation > run.placement.generation:
                    self._stop(run, "restarting")  # the next converge starts the new generation
                continue
            if job is None:
                if p.epoch < floor and p.id not in self.adopted:
                    self.stats["fenced"] += 1
                    self._spawn(p.id, self._report, p, "down", None, None, None, fenced_reason(p.epoch, floor))
                    continue
            elif p.generation < job.generation or (
                p.generation == job.generation and job.state in ("down", "crashed")
            ):
                continue
            self._start(p)
        # Only a deleted placement (a tombstone) ends a run or a record: a replica that
        # was reset and is refilling lacks placements without their being deleted.
        def deleted(job_id: str) -> bool:
            entry = state.get(Placement.KIND, job_id)
            return entry is not None and entry.value is None

        for job_id, run in list(self.runs.items()):
            if job_id not in placed and deleted(job_id):
                self._stop(run, "its placement was removed")
        for job_id in list(self.adopted):
            if job_id not in self.runs:  # nothing here wants it any more
                self._spawn(job_id, self._stop_adopted, job_id, "not placed here any more")
        orphans = [
            j for j in state.records(Job)
            if j.host == self.node and j.id not in placed and j.id not in self.runs
            and deleted(j.id)
        ]  # fmt: skip
        for j in orphans:
            self._spawn(j.id, self._write, [Delete(Job.KIND, j.id)])

    def _spawn(self, job_id: str, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start one bookkeeping task per job at a time (converge runs often)."""
        assert self._nursery is not None
        if job_id in self._busy:
            return
        self._busy.add(job_id)

        async def task() -> None:
            try:
                await fn(*args)
            finally:
                self._busy.discard(job_id)
                self._wake.set()

        self._nursery.start_soon(task)

    def _start(self, p: Placement) -> None:
        assert self._nursery is not None
        if p.id in self._busy:
            return
        run = _Run(p)
        self.runs[p.id] = run
        self._nursery.start_soon(self._run_job, run)

    def _stop(self, run: _Run, reason: str) -> None:
        if run.stop_reason is not None:
            return
        run.stop_reason = reason
        run.stopping.set()
        if not run.started:
            run.cancel.cancel()  # still preparing: nothing runs yet

    async def _stop_adopted(self, job_id: str, reason: str) -> None:
        spec = self.adopted.pop(job_id, None)
        if spec is None:
            return
        await self.backend.stop(job_id, self.stop_grace_s)
        self.ports.release(job_id)
        job = self.state.state.record(Job, job_id)
        if job is not None and job.state not in ("down", "crashed"):
            await self._write([dataclasses.replace(job, state="down", reason=reason, updated_at=self.now_ms())])

    # -- one run ----------------------------------------------------------------

    async def _run_job(self, run: _Run) -> None:
        p = run.placement
        try:
            await self._run_job_inner(run)
        except (FlynnError, OSError) as exc:  # the backend could not run it
            log.warning("job %s: the backend failed: %s", p.id, exc)
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self.stop_grace_s + 5),
                contextlib.suppress(FlynnError),
            ):
                await self.backend.stop(p.id, self.stop_grace_s)
            await self._report(p, "crashed", reason=f"the {self.backend.name} backend failed: {exc}")
        finally:
            with contextlib.suppress(FlynnError):
                self.backend.forget(p.id)
            self.ports.release(p.id)
            if self.runs.get(p.id) is run:
                del self.runs[p.id]
            self._wake.set()

    async def _run_job_inner(self, run: _Run) -> None:
        p = run.placement
        spec = self.adopted.pop(p.id, None)
        if spec is not None:
            job = self.state.state.record(Job, p.id)
            if job is not None and job.generation == p.generation:
                self.stats["adopted"] += 1
            else:  # an older generation survived the restart
                await self.backend.stop(p.id, self.stop_grace_s)
                spec = None
        with run.cancel:
            if spec is None:
                await self._report(p, "pending")
                try:
                    spec = await self._prepare(p)
                except StartFailed as exc:
                    self.stats["crashed"] += 1
                    await self._report(p, "crashed", reason=str(exc))
                    return
                with trio.CancelScope(shield=True):
                    await self.backend.start(spec)
                self.stats["started"] += 1
            run.started = True
        if not run.started or spec is None:  # stopped while preparing
            await self._report(p, "down", reason=run.stop_reason)
            return
        address = f"{_host(self.addr)}:{spec.port}" if spec.port is not None else None
        await self._report(p, "starting", address=address)
        failed: str | None = None
        async with trio.open_nursery() as nursery:
            exited = trio.Event()
            status: list[int] = []

            async def wait_exit() -> None:
                status.append(await self.backend.wait(p.id))
                exited.set()

            nursery.start_soon(wait_exit)
            nursery.start_soon(self._stop_when_asked, run, address)
            unhealthy = await self._health(p, spec, exited)
            if not exited.is_set() and run.stop_reason is None:
                if unhealthy is None:
                    await self._report(p, "up", address=address, up_since=self.now_ms())
                else:
                    failed = unhealthy
                    self._stop(run, unhealthy)
            await exited.wait()
            nursery.cancel_scope.cancel()
        code = status[0]
        if failed is not None:
            self.stats["crashed"] += 1
            await self._report(p, "crashed", address, code, reason=failed)
        elif run.stop_reason is not None:
            await self._report(p, "down", address, code, reason=run.stop_reason)
        elif p.one_off:
            await self._report(p, "down" if code == 0 else "crashed", address, code, reason=_exit_reason(code))
        else:
            self.stats["crashed"] += 1
            await self._report(p, "crashed", address, code, reason=_exit_reason(code))

    async def _stop_when_asked(self, run: _Run, address: str | None) -> None:
        await run.stopping.wait()
        self.stats["stopped"] += 1
        await self._report(run.placement, "stopping", address, reason=run.stop_reason)
        await self.backend.stop(run.placement.id, self.stop_grace_s)

    async def _health(self, p: Placement, spec: JobSpec, exited: trio.Event) -> str | None:
        """None once the job is healthy (or has nothing to check); else why not."""
        if spec.port is None or p.one_off:
            return None
        check = self._check_of(p) or HealthCheck()
        try:
            await wait_healthy(
                check, self.addr, spec.port, boot_timeout_s=self.boot_timeout_s,
                is_alive=lambda: not exited.is_set(),
            )  # fmt: skip
        except HealthTimeout as exc:
            return f"health check failed: {exc}"
        return None

    def _check_of(self, p: Placement) -> HealthCheck | None:
        release = self.state.state.record(Release, p.release_id)
        proc = release.processes.get(p.process_type) if release else None
        return proc.health_check if proc else None

    def _generation_reported(self, job_id: str) -> int:
        job = self.state.state.record(Job, job_id)
        return job.generation if job is not None else 0

    async def _prepare(self, p: Placement) -> JobSpec:
        """Everything the backend needs; StartFailed with the reason if it cannot."""
        release = await self._wait_record(Release, p.release_id)
        app = await self._wait_record(App, p.app_id)
        spec_of = release.processes.get(p.process_type)
        if p.one_off:
            command = p.args[0] if len(p.args) == 1 else shlex.join(p.args)
            proc = ProcessSpec(command=command or "true", memory_mb=p.memory_mb or 512)
        elif spec_of is None:
            raise StartFailed(f"release {release.id} has no process type {p.process_type}")
        else:
            proc = spec_of
        slug_dir: Path | None = None
        image: str | None = None
        for artifact_id in release.artifacts[:1]:
            artifact = await self._wait_record(Artifact, artifact_id)
            if artifact.type == "docker":
                if self.backend.name != "docker":
                    raise StartFailed(
                        f"artifact {artifact.id} is a Docker image and node {self.node} "
                        "runs jobs as processes (start it with --backend docker)"
                    )
                image = artifact.uri.removeprefix("docker://")
            else:
                assert artifact.digest is not None
                try:
                    tarball = await self.blobs.local_path(artifact.digest)
                    slug_dir = await unpack_slug(tarball, self.work_dir, artifact.digest)
                except FlynnError as exc:
                    raise StartFailed(f"cannot get slug {artifact.digest}: {exc}") from None
        if slug_dir is None and image is None:
            slug_dir = self.work_dir / "empty" / "app"
            slug_dir.mkdir(parents=True, exist_ok=True)
        port = None
        if proc.ports or (not p.one_off and p.process_type == "web"):
            try:
                port = self.ports.allocate(p.id)
            except FlynnError as exc:
                raise StartFailed(str(exc)) from None
        return JobSpec(
            job_id=p.id,
            app_name=app.name,
            app_id=app.id,
            release_id=release.id,
            process_type=p.process_type,
            command=proc.command,
            env={**release.env, **p.env},
            port=port,
            slug_dir=slug_dir,
            memory_mb=proc.memory_mb,
            image=image,
            host_addr=self.addr,
        )

    async def _wait_record(self, cls: type[_R], key: str) -> _R:
        with trio.move_on_after(RECORD_WAIT_S):
            while True:
                record = self.state.state.record(cls, key)
                if record is not None:
                    return record
                await trio.sleep(0.1)
        raise StartFailed(f"{cls.KIND} {key} has not reached node {self.node}")

    # -- reporting --------------------------------------------------------------

    async def _report(
        self,
        p: Placement,
        state: str,
        address: str | None = None,
        exit_code: int | None = None,
        up_since: int | None = None,
        reason: str | None = None,
    ) -> None:
        previous = self.state.state.record(Job, p.id)
        if up_since is None and state in ("stopping", "crashed", "down") and previous is not None:
            up_since = previous.up_since if previous.generation == p.generation else None
        job = Job(
            id=p.id,
            app_id=p.app_id,
            release_id=p.release_id,
            process_type=p.process_type,
            host=self.node,
            state=state,
            created_at=p.created_at,
            updated_at=self.now_ms(),
            address=address,
            exit_code=None if exit_code is None else max(-255, min(255, exit_code)),
            restarts=p.restarts,
            one_off=p.one_off,
            generation=p.generation,
            up_since=up_since,
            reason=reason[:4096] if reason else None,
        )
        await self._write([job])

    async def _write(self, changes: list[Change]) -> None:
        try:
            await self.state.write(changes)
        except FlynnError as exc:  # committed here; it spreads when peers answer
            log.info("job report not acknowledged by a peer yet: %s", exc)


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with status {code}"


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr
