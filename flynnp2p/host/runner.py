"""The host side of scheduling: run what the leader placed on this node, report it.

Theory of operation
-------------------
The leader writes `Placement` records; every node runs a `HostRunner` that watches
the placements naming it and converges its backend on them. The runner is the
only writer of this node's `Job` records (LWW stays safe: one writer per key).

One task owns the runner's state (`run`). On every change of placements, jobs,
releases or artifacts (and once a second) it takes the pure step
`flynnp2p.host.converge.converge` (which decides, and says why: fencing, the
refilling replica, restarts) over this replica and what runs here, and carries
out its actions: a run task per started job, a bookkeeping task per report,
forget or stop of a re-adopted job. Others send it messages through its inbox:
the state watcher and every task that ends say something changed; `shutdown`
asks it to stop every job (converge's *leaving*), and is answered once none is
left.

One task per run (`_run_job`) owns it from start to its last report: prepare it
(`flynnp2p.host.prepare`: wait for its release and artifact to reach this
replica, fetch and unpack the slug; `pending`, reported meanwhile), start it
(`starting`, once the `pending` write is done, so reports keep their order), wait for
the health check to pass (`up`), then wait for the exit (`crashed` or, when
stopped or a one-off that exited 0, `down`), with the exit status and a reason.
A run that fails its health check within ``boot_timeout_s`` is stopped and
reported crashed. The reports follow `flynnp2p.state.jobs.NEXT`.

Stopping (`_stop_when_asked`): report ``stopping``; when converge said the job
drains (`flynnp2p.state.jobs.drains`), wait ``drain_delay_s`` so that every
router has seen that report (or the leader's stop placement) and stopped
choosing the job, while requests already sent to it go on; then the backend's
stop: SIGTERM, up to ``stop_grace_s`` for the job to finish what it has, SIGKILL.
Each run drains in its own task, so an agent that leaves drains all its jobs at
once: the delay is paid once, not per job, and `shutdown` is bounded by
``drain_delay_s + stop_grace_s`` and a margin for the reports.

Reports are state writes; a write the cluster cannot acknowledge now is committed
here and spreads later, so a report never fails a job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from flynnp2p.errors import ClusterError, FlynnError
from flynnp2p.host.backend import JobBackend, JobSpec
from flynnp2p.host.converge import (
    RESTARTING,
    Action,
    Forget,
    Local,
    LocalRun,
    Report,
    Restart,
    Start,
    Stop,
    converge,
    job_report,
    view_of,
)
from flynnp2p.host.health import FAST_FOR_S, HealthTimeout, wait_healthy
from flynnp2p.host.ports import PortAllocator
from flynnp2p.host.prepare import Blobs, Preparer, StartFailed
from flynnp2p.netaddr import url_host
from flynnp2p.state.errors import RecordError, StoreError
from flynnp2p.state.jobs import CRASHED, DOWN, EXITED, PENDING, STARTING, STOPPING, UP, is_fenced
from flynnp2p.state.merge import Change, Delete
from flynnp2p.state.records import App, Artifact, HealthCheck, Job, Placement, Release
from flynnp2p.state.service import StateService

log = logging.getLogger(__name__)

# What a backend raises when it cannot run or stop a job: its own errors, the OS's,
# and the Docker SDK's closed-stream error.  Anything else is a bug and stops the agent.
BACKEND_ERRORS = (FlynnError, OSError, trio.ClosedResourceError)

WATCHED_KINDS = (Placement.KIND, Job.KIND, Release.KIND, Artifact.KIND, App.KIND)
INBOX = 64  # messages to the owning task; "something changed" is dropped when it is full
SHUTDOWN_MARGIN_S = 5.0  # beyond drain and grace, for the reports a leaving node writes


@dataclass
class _Run:
    placement: Placement
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    stop_reason: str | None = None
    drain: bool = False  # the stop waits the deregistration delay first
    started: bool = False  # the backend runs it: a stop goes through the backend
    stopping: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True)
class _Leave:
    """`shutdown`'s message: stop every job for `reason`; `done` once none is left."""

    reason: str
    done: trio.Event


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
        drain_delay_s: float = 2.0,
        boot_timeout_s: float = 60.0,
    ) -> None:
        self.node = node
        self.addr = addr
        self.state = state
        self.backend = backend
        self.ports = ports
        self.epoch_floor = epoch_floor
        self.now_ms = now_ms
        self.stop_grace_s = stop_grace_s
        self.drain_delay_s = drain_delay_s
        self.boot_timeout_s = boot_timeout_s
        self.prepare = Preparer(node, addr, state, backend.name, blobs, ports, work_dir)
        self.runs: dict[str, _Run] = {}
        self.adopted: dict[str, JobSpec] = {}
        self._busy: set[str] = set()  # jobs with a bookkeeping task in flight
        self._leaving: list[_Leave] = []
        self.stats = {"started": 0, "stopped": 0, "fenced": 0, "adopted": 0, "crashed": 0, "drained": 0}
        self._inbox, self._inbox_recv = trio.open_memory_channel[_Leave | None](INBOX)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for spec in await self.backend.recover():
            self.adopted[spec.job_id] = spec
            if spec.port is not None:
                self.ports.reserve(spec.job_id, spec.port)
        async with trio.open_nursery() as nursery:  # every run and bookkeeping task
            nursery.start_soon(self._watch)
            task_status.started()
            while True:
                self._step(nursery)
                with trio.move_on_after(1.0):
                    self._take(await self._inbox_recv.receive())
                    while True:  # a burst of messages makes one step
                        try:
                            self._take(self._inbox_recv.receive_nowait())
                        except trio.WouldBlock:
                            break

    @property
    def shutdown_bound_s(self) -> float:
        """How long `shutdown` may take: one drain and one grace (jobs stop concurrently)."""
        return self.drain_delay_s + self.stop_grace_s + SHUTDOWN_MARGIN_S

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """The node leaves the cluster: drain and stop every job here, report them
        down; give up after `timeout_s` (default `shutdown_bound_s`)."""
        leave = _Leave(f"node {self.node} left the cluster", trio.Event())
        with trio.move_on_after(self.shutdown_bound_s if timeout_s is None else timeout_s):
            await self._inbox.send(leave)
            await leave.done.wait()

    def _take(self, message: _Leave | None) -> None:
        if message is not None:
            self._leaving.append(message)

    def _changed(self) -> None:
        """Ask the owning task for a step (one already queued will do)."""
        with contextlib.suppress(trio.WouldBlock):
            self._inbox.send_nowait(None)

    async def _watch(self) -> None:
        while True:  # a subscriber that falls behind is dropped: subscribe again
            async with self.state.subscribe(WATCHED_KINDS) as (_, changes):
                self._changed()
                async for _batch in changes:
                    self._changed()

    # -- the owning task's step -------------------------------------------------

    def _step(self, nursery: trio.Nursery) -> None:
        view = view_of(self.state.state, self.node, self.epoch_floor())
        runs = {i: LocalRun(r.placement.generation, r.stop_reason is not None) for i, r in self.runs.items()}
        leaving = self._leaving[0].reason if self._leaving else None
        local = Local(runs, frozenset(self.adopted), frozenset(self._busy), leaving)
        for action in converge(view, local, self.now_ms()):
            self._carry_out(nursery, action)
        if self._leaving and not self.runs and not self._busy:
            for leave in self._leaving:
                leave.done.set()

    def _carry_out(self, nursery: trio.Nursery, action: Action) -> None:
        match action:
            case Start(p):
                run = self.runs[p.id] = _Run(p)
                nursery.start_soon(self._run_job, run)
            case Stop(job_id, reason, drain):
                if job_id in self.runs:
                    self._stop(self.runs[job_id], reason, drain)
                else:  # re-adopted at boot, not taken over by a run
                    self._spawn(nursery, job_id, self._stop_adopted, job_id, reason, drain)
            case Restart(job_id, _, drain):  # the next step starts the new generation
                self._stop(self.runs[job_id], RESTARTING, drain)
            case Report(job):
                self.stats["fenced"] += is_fenced(job)
                self._spawn(nursery, job.id, self._write, [job])
            case Forget(job_id):
                self._spawn(nursery, job_id, self._write, [Delete(Job.KIND, job_id)])

    def _spawn(
        self, nursery: trio.Nursery, job_id: str, fn: Callable[..., Awaitable[object]], *args: object
    ) -> None:
        """Start one bookkeeping task per job at a time."""
        if job_id in self._busy:
            return
        self._busy.add(job_id)

        async def task() -> None:
            try:
                await fn(*args)
            finally:
                self._busy.discard(job_id)
                self._changed()

        nursery.start_soon(task)

    def _stop(self, run: _Run, reason: str, drain: bool = False) -> None:
        if run.stop_reason is not None:  # the first stop's reason and drain stand
            return
        run.stop_reason, run.drain = reason, drain
        run.stopping.set()
        if not run.started:
            run.cancel.cancel()  # still preparing: nothing runs yet

    async def _stop_adopted(self, job_id: str, reason: str, drain: bool) -> None:
        spec = self.adopted.pop(job_id, None)
        if spec is None:
            return
        job = self.state.state.record(Job, job_id)
        if drain and job is not None:
            await self._write([dataclasses.replace(job, state=STOPPING, reason=reason, updated_at=self.now_ms())])
            await self._drain(job_id)
        try:
            await self.backend.stop(job_id, self.stop_grace_s)
        except BACKEND_ERRORS as exc:  # nothing is left to stop, or the engine is gone
            log.warning("job %s: the backend could not stop it: %s", job_id, exc)
        self.ports.release(job_id)
        job = self.state.state.record(Job, job_id)
        if job is not None and job.state not in EXITED:
            await self._write([dataclasses.replace(job, state=DOWN, reason=reason, updated_at=self.now_ms())])

    # -- one run ----------------------------------------------------------------

    async def _run_job(self, run: _Run) -> None:
        p = run.placement
        try:
            await self._run_job_inner(run)
        except* BACKEND_ERRORS as group:  # the backend could not run it (errors from the
            exc = group.exceptions[0]  # run's own nursery arrive grouped)
            log.warning("job %s: the backend failed: %s", p.id, exc)
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self.stop_grace_s + 5),
                contextlib.suppress(FlynnError),
            ):
                await self.backend.stop(p.id, self.stop_grace_s)
            await self._report(p, CRASHED, reason=f"the {self.backend.name} backend failed: {exc}")
        finally:
            with contextlib.suppress(FlynnError):
                self.backend.forget(p.id)
            self.ports.release(p.id)
            if self.runs.get(p.id) is run:
                del self.runs[p.id]
            self._changed()

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
                prepared: JobSpec | StartFailed | None = None
                async with trio.open_nursery() as reporting:
                    # The pending report (a write a peer acknowledges) while the run is
                    # prepared, not before: the next report waits for it (nursery).
                    reporting.start_soon(self._report, p, PENDING)
                    try:
                        prepared = await self.prepare.spec(p)
                    except StartFailed as exc:
                        prepared = exc
                if not isinstance(prepared, JobSpec):
                    self.stats["crashed"] += 1
                    await self._report(p, CRASHED, reason=str(prepared))
                    return
                spec = prepared
                with trio.CancelScope(shield=True):
                    await self.backend.start(spec)
                self.stats["started"] += 1
            run.started = True
        if not run.started or spec is None:  # stopped while preparing
            await self._report(p, DOWN, reason=run.stop_reason)
            return
        address = f"{url_host(self.addr)}:{spec.port}" if spec.port is not None else None
        await self._report(p, STARTING, address=address)
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
                    await self._report(p, UP, address=address, up_since=self.now_ms())
                else:
                    failed = unhealthy
                    self._stop(run, unhealthy)
            await exited.wait()
            nursery.cancel_scope.cancel()
        code = status[0]
        if failed is not None:
            self.stats["crashed"] += 1
            await self._report(p, CRASHED, address, code, reason=failed)
        elif run.stop_reason is not None:
            await self._report(p, DOWN, address, code, reason=run.stop_reason)
        elif p.one_off:
            await self._report(p, DOWN if code == 0 else CRASHED, address, code, reason=self._exit_reason(p.id, code))
        else:
            self.stats["crashed"] += 1
            await self._report(p, CRASHED, address, code, reason=self._exit_reason(p.id, code))

    def _exit_reason(self, job_id: str, code: int) -> str:
        return self.backend.exit_reason(job_id) or _exit_reason(code)

    async def _stop_when_asked(self, run: _Run, address: str | None) -> None:
        await run.stopping.wait()
        self.stats["stopped"] += 1
        await self._report(run.placement, STOPPING, address, reason=run.stop_reason)
        if run.drain:
            await self._drain(run.placement.id)
        await self.backend.stop(run.placement.id, self.stop_grace_s)

    async def _drain(self, job_id: str) -> None:
        """The deregistration delay: routers drop the job, its requests in flight go on."""
        self.stats["drained"] += 1
        log.info("job %s: draining for %.1f s before it stops", job_id, self.drain_delay_s)
        await trio.sleep(self.drain_delay_s)

    async def _health(self, p: Placement, spec: JobSpec, exited: trio.Event) -> str | None:
        """None once the job is healthy (or has nothing to check); else why not."""
        if spec.port is None or p.one_off:
            return None
        check = self._check_of(p) or HealthCheck()
        try:
            await wait_healthy(
                check, self.addr, spec.port, boot_timeout_s=self.boot_timeout_s,
                is_alive=lambda: not exited.is_set(), fast_for_s=FAST_FOR_S,
            )  # fmt: skip
        except HealthTimeout as exc:
            return f"health check failed: {exc}"
        return None

    def _check_of(self, p: Placement) -> HealthCheck | None:
        release = self.state.state.record(Release, p.release_id)
        proc = release.processes.get(p.process_type) if release else None
        return proc.health_check if proc else None

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
        previous, now = self.state.state.record(Job, p.id), self.now_ms()
        await self._write([job_report(p, self.node, state, now, previous, address, exit_code, up_since, reason)])

    async def _write(self, changes: list[Change]) -> None:
        try:
            await self.state.write(changes)
        except ClusterError as exc:  # committed here; it spreads when peers answer
            log.info("job report not acknowledged by a peer yet: %s", exc)
        except RecordError:  # a bug: said loudly, but one bad report must not stop the host
            log.exception("job report refused by the state")
        except StoreError as exc:  # not committed (a full disk); the next report carries it
            log.warning("job report not stored here: %s", exc)


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with status {code}"


