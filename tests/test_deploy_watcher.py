"""The deploy watcher over a real state service, in virtual time (MockClock).

Jobs are written as a host would report them; the watcher's verdicts, their
exact virtual times, and the formation it restores are checked. The pure judge
is covered case by case below too.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import trio
import trio.testing

from flynnp2p.scheduler.rollout import Verdict, expired, judge, outcome
from flynnp2p.scheduler.watcher import DeployWatcher
from flynnp2p.state.jobs import restart_reason
from flynnp2p.state.merge import State
from flynnp2p.state.records import App, Deployment, Formation, Job, Placement, ProcessSpec, Release
from flynnp2p.state.service import StateService
from flynnp2p.state.store import MemoryStore
from tests.test_scheduler_model import state_of
from tests.test_scheduler_service import T0_MS, LonePeers, virtual_ms

WEB = {"web": ProcessSpec(command="python app.py", ports=(0,))}
# A pass runs this long after the change that woke it (the watcher's default debounce).
DEBOUNCE_MS = 20
APP = App(id="a1", name="shop", created_at=T0_MS, deploy_timeout_s=30)
R1 = Release(id="r1", app_id="a1", created_at=T0_MS, processes=WEB, version=1)
R2 = Release(id="r2", app_id="a1", created_at=T0_MS, processes=WEB, version=2)
DEP = Deployment(
    id="d1", app_id="a1", new_release_id="r2", strategy="one-by-one", status="running",
    created_at=T0_MS, old_release_id="r1",
)  # fmt: skip


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.01)


def job(
    id: str, release: str, state: str, *, restarts: int = 0, exit_code: int | None = None
) -> Job:
    return Job(
        id=id, app_id="a1", release_id=release, process_type="web", host="h1", state=state,
        created_at=T0_MS, updated_at=T0_MS, restarts=restarts, exit_code=exit_code,
    )  # fmt: skip


def placed(id: str, release: str, action: str = "start", *, restarts: int = 0) -> Placement:
    return Placement(
        id=id, app_id="a1", release_id=release, process_type="web", host="h1", action=action,
        epoch=1, created_at=T0_MS, restarts=restarts,
    )  # fmt: skip


async def start(nursery: trio.Nursery, web: int = 2) -> tuple[StateService, DeployWatcher]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    state = StateService(MemoryStore("n1"), LonePeers(), http, virtual_ms)
    await nursery.start(state.run)
    await state.write([
        APP, R1, R2, DEP,
        Formation(app_id="a1", release_id="r2", updated_at=T0_MS, processes={"web": web}),
        placed("old1", "r1"), job("old1", "r1", "up"), placed("old2", "r1"), job("old2", "r1", "up"),
    ])  # fmt: skip
    watcher = DeployWatcher(state, virtual_ms, lambda epoch: True, period_s=5.0)
    return state, watcher


async def finished(state: StateService) -> Deployment:
    while True:
        dep = state.state.record(Deployment, "d1")
        assert dep is not None
        if dep.status != "running":
            return dep
        await trio.sleep(0.5)  # (virtual; the watcher's own times are what is checked)


async def test_complete_once_the_new_jobs_are_up_and_the_old_ones_told_to_stop(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    state, watcher = await start(nursery)
    nursery.start_soon(watcher.duty, 1)
    await trio.sleep(1)
    await state.write([placed("new1", "r2"), job("new1", "r2", "up"), placed("old1", "r1", "stop")])
    await trio.sleep(1)
    assert state.state.record(Deployment, "d1").status == "running"  # type: ignore[union-attr]
    await trio.sleep(1)
    await state.write([placed("new2", "r2"), job("new2", "r2", "up"), placed("old2", "r1", "stop")])
    dep = await finished(state)
    assert (dep.status, dep.finished_at, dep.reason) == ("complete", T0_MS + 3000 + DEBOUNCE_MS, None)
    assert state.state.record(Formation, "a1").release_id == "r2"  # type: ignore[union-attr]


async def test_a_crash_of_a_new_job_rolls_back_at_once(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    state, watcher = await start(nursery)
    nursery.start_soon(watcher.duty, 1)
    await state.write([placed("new1", "r2"), job("new1", "r2", "starting")])
    await trio.sleep(2)
    # crashed, and restarted by the scheduler before the watcher saw the report
    await state.write([placed("new1", "r2", restarts=1), job("new1", "r2", "pending", restarts=1)])
    dep = await finished(state)
    assert (dep.status, dep.finished_at, dep.failed_job_id) == ("rolled-back", T0_MS + 2000 + DEBOUNCE_MS, "new1")
    assert dep.reason == "job new1 (web) exited by itself (restarted 1 time(s))"
    formation = state.state.record(Formation, "a1")
    assert formation is not None and (formation.release_id, dict(formation.processes)) == (
        "r1",
        {"web": 2},
    )


async def test_not_healthy_in_time_fails_at_the_deadline_and_a_new_leader_keeps_it(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    state, watcher = await start(nursery)
    with trio.CancelScope() as term:  # the first leader's term: 10 s, then it is demoted
        nursery.start_soon(watcher.duty, 1)
        await state.write([placed("new1", "r2"), job("new1", "r2", "starting")])
        await trio.sleep(10)
        term.cancel()
    second = DeployWatcher(state, virtual_ms, lambda epoch: True, period_s=5.0)
    nursery.start_soon(second.duty, 2)
    dep = await finished(state)
    assert (dep.status, dep.finished_at) == ("rolled-back", T0_MS + 30_000 + DEBOUNCE_MS)
    assert dep.reason == "not healthy within 30 s (web: 0/2 up); job new1 is starting"
    assert dep.failed_job_id == "new1" and second.stats["rolled_back"] == 1


async def test_crash_with_exit_code_and_no_old_release_fails_without_a_restore(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    state, watcher = await start(nursery)
    first = dataclasses.replace(DEP, old_release_id=None)
    await state.write([first, placed("new1", "r2"), job("new1", "r2", "crashed", exit_code=3)])
    nursery.start_soon(watcher.duty, 1)
    dep = await finished(state)
    assert (dep.status, dep.reason) == ("failed", "job new1 (web) exited with code 3")
    assert state.state.record(Formation, "a1").release_id == "r2"  # type: ignore[union-attr]


# -- the pure judge ------------------------------------------------------------


def world(*records: object, web: int = 1) -> State:
    formation = Formation(app_id="a1", release_id="r2", updated_at=T0_MS, processes={"web": web})
    return state_of(APP, R1, R2, DEP, formation, *records)  # type: ignore[arg-type]


def test_judge_cases() -> None:
    now = T0_MS + 1000
    assert judge(world(placed("n", "r2"), job("n", "r2", "starting")), DEP, now) is None
    assert judge(world(placed("n", "r2"), job("n", "r2", "up")), DEP, now) == Verdict("complete")
    # an old job not yet told to stop keeps it running; one draining does not
    up_new = (placed("n", "r2"), job("n", "r2", "up"))
    assert judge(world(*up_new, placed("o", "r1"), job("o", "r1", "up")), DEP, now) is None
    draining = world(*up_new, placed("o", "r1", "stop"), job("o", "r1", "up"))
    assert judge(draining, DEP, now) == Verdict("complete")
    # a new job the scheduler stopped (a scale down) is no crash
    stopped = world(*up_new, placed("x", "r2", "stop"), job("x", "r2", "crashed"))
    assert judge(stopped, DEP, now) == Verdict("complete")
    # the formation moved on: failed, nothing to restore
    moved = state_of(APP, R1, R2, DEP, Formation(app_id="a1", release_id="r1", updated_at=T0_MS))
    verdict = judge(moved, DEP, now)
    assert verdict == Verdict("failed", "the formation moved to release r1")
    assert [c.status for c in outcome(moved, DEP, verdict, now) if isinstance(c, Deployment)] == [
        "failed"
    ]
    # web=0: nothing to wait for
    assert judge(world(web=0), DEP, now) == Verdict("complete")


def test_a_restarted_job_is_judged_by_how_its_run_before_ended() -> None:
    """The scheduler restarts a crashed job at once: its host may report the next
    run before the watcher sees the crash. The restart placement keeps how it ended."""
    now = T0_MS + 1000
    for crashed, how in [
        (job("n", "r2", "crashed", exit_code=3), "exited with code 3"),
        (dataclasses.replace(job("n", "r2", "crashed"), reason="no space left on h1"),
         "could not start: no space left on h1"),
        (job("n", "r2", "crashed"), "exited by itself"),
    ]:  # fmt: skip
        restart = dataclasses.replace(
            placed("n", "r2", restarts=1), generation=1, reason=restart_reason(crashed)
        )
        pending = dataclasses.replace(job("n", "r2", "pending", restarts=1), generation=1)
        for report in (crashed, pending):  # before and after its host acted on the restart
            verdict = judge(world(restart, report), DEP, now)
            assert verdict == Verdict("failed", f"job n (web) {how} (restarted 1 time(s))", "n")


def test_only_the_newest_finished_deployments_are_kept() -> None:
    done = [
        dataclasses.replace(
            DEP, id=f"d{i}", status="complete", created_at=T0_MS + i, finished_at=T0_MS + i
        )
        for i in range(5)
    ]
    state = state_of(DEP, *done, dataclasses.replace(done[0], id="other", app_id="a2"))
    assert [c.key for c in expired(state, keep=2)] == ["d2", "d1", "d0"]  # never a running one
