"""The host runner over a real state service and a fake backend, in virtual time.

The fake backend runs nothing: a job "exits" when the test says so or when it is
stopped. Worker jobs (no port) have no health check, so nothing touches the
network; a web job's port is a real loopback socket that listens (and never
accepts: the kernel completes the health check's connect), so its TCP check
passes. tests/test_cluster_jobs.py runs real processes.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from flynnp2p.errors import NotFound
from flynnp2p.host import prepare
from flynnp2p.host.backend import JobSpec, RunningJob
from flynnp2p.host.converge import PLACEMENT_REMOVED
from flynnp2p.host.ports import PortAllocator
from flynnp2p.host.runner import HostRunner
from flynnp2p.state.jobs import is_fenced, may_follow
from flynnp2p.state.merge import Delete
from flynnp2p.state.records import App, Job, Placement, ProcessSpec, Release
from flynnp2p.state.service import StateService
from flynnp2p.state.store import MemoryStore
from tests.test_scheduler_service import T0_MS, LonePeers, virtual_ms


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # The state store works in a worker thread: a zero threshold would race it.
    return trio.testing.MockClock(autojump_threshold=0.01)


class FakeBackend:
    """Runs nothing; `exit` ends a job, `stop` ends it with SIGTERM's status."""

    name = "process"
    memory_enforced = False

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.stopped_at: dict[str, float] = {}  # trio time of the last stop of each job
        self._exits: dict[str, tuple[trio.Event, list[int]]] = {}
        self._listeners: dict[str, socket.socket] = {}

    async def recover(self) -> list[JobSpec]:
        return []

    async def start(self, spec: JobSpec) -> RunningJob:
        self.started.append(spec.job_id)
        self._exits[spec.job_id] = (trio.Event(), [])
        if spec.port is not None:
            listener = socket.socket()
            listener.bind(("127.0.0.1", spec.port))
            listener.listen(16)
            self._listeners[spec.job_id] = listener
        return RunningJob(spec.job_id, 1, None, 0)

    async def stop(self, job_id: str, grace_s: float = 10.0) -> None:
        self.stopped.append(job_id)
        self.stopped_at[job_id] = trio.current_time()
        self.exit(job_id, -15)

    def exit(self, job_id: str, code: int) -> None:
        if (listener := self._listeners.pop(job_id, None)) is not None:
            listener.close()
        event, codes = self._exits[job_id]
        if not event.is_set():
            codes.append(code)
            event.set()

    async def wait(self, job_id: str) -> int:
        event, codes = self._exits[job_id]
        await event.wait()
        return codes[0]

    def forget(self, job_id: str) -> None:
        pass

    def exit_reason(self, job_id: str) -> str | None:
        return None


class NoBlobs:
    async def local_path(self, digest: str) -> Path:
        raise AssertionError("these releases have no slug")


APP = App(id="a1", name="shop", created_at=T0_MS)
RELEASE = Release(id="r1", app_id="a1", created_at=T0_MS,
                  processes={"worker": ProcessSpec("sleep 1d"), "web": ProcessSpec("serve")})  # fmt: skip
DRAIN_S = 2.0


def placement(job_id: str = "worker-1", action: str = "start", epoch: int = 1, **kw: object) -> Placement:
    kw.setdefault("process_type", "worker")
    return Placement(id=job_id, app_id="a1", release_id="r1", host="n1",
                     action=action, epoch=epoch, created_at=T0_MS, **kw)  # type: ignore[arg-type]  # fmt: skip


def web(job_id: str = "web-1", **kw: object) -> Placement:
    return placement(job_id, process_type="web", **kw)


@asynccontextmanager
async def open_world(
    tmp_path: Path, floor: Callable[[], int] = lambda: 1
) -> AsyncIterator[tuple[StateService, HostRunner, FakeBackend, dict[str, list[Job]]]]:
    """A state service, a runner on node n1, and every report it writes, per job."""
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    reports: dict[str, list[Job]] = {}
    async with trio.open_nursery() as nursery:
        state = StateService(MemoryStore("n1"), LonePeers(), http, virtual_ms)
        await nursery.start(state.run)

        async def record() -> None:
            async with state.subscribe([Job.KIND]) as (_, changes):
                async for batch in changes:
                    for e in batch:
                        if isinstance(e.value, Job):
                            reports.setdefault(e.key, []).append(e.value)

        nursery.start_soon(record)
        backend = FakeBackend()
        runner = HostRunner(
            "n1", "127.0.0.1", state, backend, NoBlobs(), PortAllocator(20000, 20010, ("127.0.0.1",)),
            floor, virtual_ms, tmp_path, stop_grace_s=1.0, drain_delay_s=DRAIN_S,
        )  # fmt: skip
        await nursery.start(runner.run)
        yield state, runner, backend, reports
        nursery.cancel_scope.cancel()


async def until(state: StateService, what: Callable[[], object], timeout: float = 60.0) -> None:
    """Wait, on state changes, until `what()` holds (AssertionError after `timeout`)."""
    with trio.move_on_after(timeout):
        async with state.subscribe() as (_, changes):
            while not what():
                await changes.receive()
            await trio.testing.wait_all_tasks_blocked()  # (so `record` has seen it too)
            return
    raise AssertionError(f"still not true after {timeout}s")


def job(state: StateService, job_id: str = "worker-1") -> Job | None:
    return state.state.record(Job, job_id)


def states(reports: dict[str, list[Job]], job_id: str = "worker-1") -> list[str]:
    return [j.state for j in reports.get(job_id, [])]


def assert_lifecycle(reports: dict[str, list[Job]]) -> None:
    for history in reports.values():
        for before, after in zip([None, *history], history, strict=False):
            assert may_follow(before, after), (before, after)


async def test_a_placement_runs_and_a_stop_stops_it(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_world(tmp_path) as (state, _runner, backend, reports):
        await state.write([APP, RELEASE, placement()])
        await until(state, lambda: (j := job(state)) is not None and j.state == "up")
        await state.write([placement(action="stop", reason="scaled down to 0")])
        await until(state, lambda: (j := job(state)) is not None and j.state == "down")
        assert backend.started == backend.stopped == ["worker-1"]
        assert states(reports) == ["pending", "starting", "up", "stopping", "down"]
        assert reports["worker-1"][-1].reason == "scaled down to 0"
        assert_lifecycle(reports)


async def test_a_crash_waits_for_the_leader_then_a_new_generation_starts(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_world(tmp_path) as (state, _runner, backend, reports):
        await state.write([APP, RELEASE, placement()])
        await until(state, lambda: (j := job(state)) is not None and j.state == "up")
        backend.exit("worker-1", 3)
        await until(state, lambda: (j := job(state)) is not None and j.state == "crashed")
        await trio.sleep(5)  # converge steps pass; nothing restarts it by itself
        assert backend.started == ["worker-1"] and job(state).exit_code == 3  # type: ignore[union-attr]
        await state.write([placement(generation=1, restarts=1)])
        await until(state, lambda: (j := job(state)) is not None and j.state == "up" and j.generation == 1)
        assert backend.started == ["worker-1", "worker-1"]
        assert states(reports) == ["pending", "starting", "up", "crashed", "pending", "starting", "up"]
        assert_lifecycle(reports)


async def test_a_run_waits_for_its_release_to_replicate(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_world(tmp_path) as (state, _runner, backend, reports):
        await state.write([APP, placement()])
        await until(state, lambda: (j := job(state)) is not None and j.state == "pending")
        await trio.sleep(prepare.RECORD_WAIT_S - 5)
        assert states(reports) == ["pending"] and not backend.started
        await state.write([RELEASE])
        await until(state, lambda: (j := job(state)) is not None and j.state == "up")


async def test_a_release_that_never_comes_crashes_the_run_with_the_reason(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_world(tmp_path) as (state, _runner, backend, _reports):
        await state.write([APP, placement()])
        started = trio.current_time()
        await until(state, lambda: (j := job(state)) is not None and j.state == "crashed")
        assert trio.current_time() - started >= prepare.RECORD_WAIT_S
        assert job(state).reason == "release r1 has not reached node n1"  # type: ignore[union-attr]
        assert not backend.started


async def test_a_placement_from_a_deposed_leader_is_fenced(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_world(tmp_path, floor=lambda: 2) as (state, runner, backend, reports):
        await state.write([APP, RELEASE, placement(epoch=1)])
        await until(state, lambda: job(state) is not None)
        assert is_fenced(job(state))  # type: ignore[arg-type]
        assert states(reports) == ["down"] and not backend.started and runner.stats["fenced"] == 1


async def test_a_deleted_placement_stops_its_run_and_its_record_goes(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_world(tmp_path) as (state, _runner, backend, reports):
        await state.write([APP, RELEASE, placement()])
        await until(state, lambda: (j := job(state)) is not None and j.state == "up")
        await state.write([Delete(Placement.KIND, "worker-1")])
        await until(state, lambda: job(state) is None)
        assert backend.stopped == ["worker-1"]
        assert states(reports)[-2:] == ["stopping", "down"]
        assert reports["worker-1"][-1].reason == PLACEMENT_REMOVED


async def test_shutdown_stops_every_job_and_answers_once_they_are_down(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_world(tmp_path) as (state, runner, backend, reports):
        await state.write([APP, RELEASE, placement("worker-1"), placement("worker-2")])
        await until(state, lambda: all((j := job(state, i)) and j.state == "up" for i in ("worker-1", "worker-2")))
        began = trio.current_time()
        await runner.shutdown(60.0)
        assert trio.current_time() - began < 60.0  # answered, not timed out
        assert not runner.runs and sorted(backend.stopped) == ["worker-1", "worker-2"]
        for i in ("worker-1", "worker-2"):
            j = job(state, i)
            assert j is not None and j.state == "down" and j.reason == "node n1 left the cluster"
        await state.write([placement("worker-3")])
        await trio.sleep(5)
        assert job(state, "worker-3") is None  # a node that left starts nothing
        assert_lifecycle(reports)


async def test_a_backend_failing_inside_a_run_crashes_that_job_not_the_runner(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as (state, _runner, backend, _reports):

        async def lost(job_id: str) -> int:
            raise NotFound(f"the backend has no job {job_id}")  # e.g. a container removed by hand

        await state.write([APP, RELEASE, placement()])
        await until(state, lambda: (j := job(state)) is not None and j.state == "up")
        backend.wait = lost  # type: ignore[method-assign]
        await state.write([placement("worker-2")])
        await until(state, lambda: (j := job(state, "worker-2")) is not None and j.state == "crashed")
        assert "backend failed" in (job(state, "worker-2").reason or "")  # type: ignore[union-attr]
        # the runner lives on: the first job is still up and can still be stopped
        assert job(state).state == "up"  # type: ignore[union-attr]
        await state.write([placement(action="stop", reason="scaled down")])
        await until(state, lambda: (j := job(state)) is not None and j.state in ("down", "crashed"))


# -- draining ----------------------------------------------------------------------


def is_up(state: StateService, job_id: str = "web-1") -> bool:
    return (j := job(state, job_id)) is not None and j.state == "up"


def stopping_since(state: StateService, job_id: str = "web-1") -> float | None:
    """The trio time of the job's stopping report (None: not stopping)."""
    j = job(state, job_id)
    return (j.updated_at - T0_MS) / 1000 if j is not None and j.state == "stopping" else None


def stopping_at(reports: dict[str, list[Job]], job_id: str) -> float:
    """The trio time of the job's last stopping report."""
    [*_, last] = (j for j in reports[job_id] if j.state == "stopping")
    return (last.updated_at - T0_MS) / 1000


async def test_a_stopped_web_job_is_reported_stopping_and_drains_before_the_backend_stops_it(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as (state, runner, backend, reports):
        await state.write([APP, RELEASE, web()])
        await until(state, lambda: is_up(state))
        assert job(state, "web-1").address is not None  # type: ignore[union-attr]
        await state.write([web(action="stop", reason="scaled down")])
        await until(state, lambda: stopping_since(state) is not None)
        since = stopping_since(state)
        assert since is not None
        await trio.sleep(DRAIN_S - 0.1)
        assert backend.stopped == []  # still draining: routers have dropped it, it still serves
        await until(state, lambda: (j := job(state, "web-1")) is not None and j.state == "down")
        assert backend.stopped_at["web-1"] - since == pytest.approx(DRAIN_S, abs=0.05)
        assert states(reports, "web-1") == ["pending", "starting", "up", "stopping", "down"]
        assert runner.stats["drained"] == 1
        assert_lifecycle(reports)


async def test_a_worker_stops_without_a_drain(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_world(tmp_path) as (state, runner, backend, reports):
        await state.write([APP, RELEASE, placement()])
        await until(state, lambda: is_up(state, "worker-1"))
        await state.write([placement(action="stop", reason="scaled down")])
        await until(state, lambda: (j := job(state)) is not None and j.state == "down")
        assert backend.stopped_at["worker-1"] - stopping_at(reports, "worker-1") < 0.05
        assert runner.stats["drained"] == 0


async def test_a_second_stop_during_a_drain_does_not_restart_the_delay(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as (state, runner, backend, reports):
        await state.write([APP, RELEASE, web()])
        await until(state, lambda: is_up(state))
        await state.write([web(action="stop", reason="scaled down")])
        await until(state, lambda: stopping_since(state) is not None)
        since = stopping_since(state)
        assert since is not None
        await trio.sleep(DRAIN_S / 2)
        await state.write([Delete(Placement.KIND, "web-1")])  # a second reason to stop
        await runner.shutdown()  # and a third: the node leaves
        assert backend.stopped_at["web-1"] - since == pytest.approx(DRAIN_S, abs=0.05)
        assert backend.stopped == ["web-1"] and runner.stats["drained"] == 1
        assert reports["web-1"][-1].reason == "scaled down"  # the first stop's reason stands


async def test_a_restart_of_an_up_web_job_drains_the_old_generation(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as (state, _runner, backend, reports):
        await state.write([APP, RELEASE, web()])
        await until(state, lambda: is_up(state))
        await state.write([web(generation=1)])
        await until(state, lambda: stopping_since(state) is not None)
        since = stopping_since(state)
        assert since is not None
        await until(state, lambda: is_up(state) and job(state, "web-1").generation == 1)  # type: ignore[union-attr]
        assert backend.stopped_at["web-1"] - since == pytest.approx(DRAIN_S, abs=0.05)
        assert states(reports, "web-1") == ["pending", "starting", "up", "stopping", "down",
                                            "pending", "starting", "up"]  # fmt: skip


async def test_a_leaving_node_drains_its_web_jobs_at_once_within_its_bound(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as (state, runner, backend, reports):
        ids = ("web-1", "web-2", "web-3")
        await state.write([APP, RELEASE, *(web(i) for i in ids), placement("worker-1")])
        await until(state, lambda: all(is_up(state, i) for i in (*ids, "worker-1")))
        began = trio.current_time()
        await runner.shutdown()
        took = trio.current_time() - began
        assert DRAIN_S - 0.01 <= took < DRAIN_S + 1  # one delay for all three, not one each
        assert took < runner.shutdown_bound_s
        for i in ids:  # each reported stopping, then stopped once the delay was over
            assert states(reports, i)[-2:] == ["stopping", "down"]
            assert backend.stopped_at[i] - began == pytest.approx(DRAIN_S, abs=0.1)
        assert backend.stopped_at["worker-1"] - began < 0.1  # a worker does not drain
        assert not runner.runs and runner.stats["drained"] == 3
        assert_lifecycle(reports)
