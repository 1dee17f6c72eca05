"""The leader's scheduling loop over a real state service, in virtual time (MockClock).

A scripted host stands in for the host runner here (the runner itself is exercised
against real processes in tests/test_cluster_jobs.py): every run it is asked for
crashes at once, so the loop's restart times can be checked exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import httpx
import pytest
import trio
import trio.testing

from flynnp2p.scheduler.model import Host
from flynnp2p.scheduler.service import Scheduler, collect_finished
from flynnp2p.state.errors import RecordError
from flynnp2p.state.merge import Delete
from flynnp2p.state.records import App, Formation, Job, Placement, ProcessSpec, Release
from flynnp2p.state.service import StateService
from flynnp2p.state.store import MemoryStore
from flynnp2p.watch import Watched
from tests.test_api_apps import Peers

T0_MS = 1_700_000_000_000


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps only once every task has been idle 10 ms of real time:
    the state store works in a worker thread, which a zero threshold would race."""
    return trio.testing.MockClock(autojump_threshold=0.01)


class LonePeers(Peers):
    def electorate(self) -> list[str]:
        return []


def virtual_ms() -> int:
    return T0_MS + int(trio.current_time() * 1000)


async def start_world(
    nursery: trio.Nursery, hosts: list[Host]
) -> tuple[StateService, Scheduler, Watched[tuple[Host, ...]]]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    state = StateService(MemoryStore("n1"), LonePeers(), http, virtual_ms)
    await nursery.start(state.run)
    membership: Watched[tuple[Host, ...]] = Watched(tuple(hosts))
    scheduler = Scheduler(
        state, lambda: membership.value, membership, virtual_ms, lambda epoch: True, period_s=5.0
    )
    return state, scheduler, membership


async def deploy(state: StateService, command: str = "exit 3", **counts: int) -> None:
    await state.write([
        App(id="a1", name="shop", created_at=T0_MS),
        Release(id="r1", app_id="a1", created_at=T0_MS,
                processes={t: ProcessSpec(command=command, memory_mb=64) for t in counts}),
        Formation(app_id="a1", release_id="r1", updated_at=T0_MS, processes=counts),
    ])  # fmt: skip


async def scripted_host(
    state: StateService, name: str, outcome: Callable[[Placement], str], log: list[tuple[float, Placement]]
) -> None:
    """Act on placements for `name` like a host whose runs end as `outcome` says."""
    acted: dict[str, int] = {}
    async with state.subscribe([Placement.KIND]) as (_, changes):
        while True:
            for p in state.state.records(Placement):
                if p.host != name or acted.get(p.id) == p.generation * 2 + (p.action == "stop"):
                    continue
                acted[p.id] = p.generation * 2 + (p.action == "stop")
                log.append((trio.current_time(), p))
                now = virtual_ms()
                status = "down" if p.action == "stop" else outcome(p)
                await state.write([Job(
                    id=p.id, app_id=p.app_id, release_id=p.release_id, process_type=p.process_type,
                    host=name, state=status, created_at=p.created_at, updated_at=now,
                    exit_code=3 if status == "crashed" else None, restarts=p.restarts,
                    generation=p.generation, up_since=now if status == "up" else None,
                )])  # fmt: skip
            await changes.receive()


async def test_crash_restarts_back_off_0_10_30_30(clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        state, scheduler, _ = await start_world(nursery, [Host("h1", True, {}, 4096)])
        acted: list[tuple[float, Placement]] = []
        nursery.start_soon(scripted_host, state, "h1", lambda p: "crashed", acted)
        await deploy(state, crash=1)
        nursery.start_soon(scheduler.duty, 1)
        await trio.sleep(75)
        starts = [(t, p) for t, p in acted if p.action == "start"]
        assert [p.generation for _, p in starts[:5]] == [0, 1, 2, 3, 4]
        assert len({p.id for _, p in starts}) == 1  # restarted in place, never replaced
        gaps = [round(b - a, 1) for (a, _), (b, _) in itertools.pairwise(starts)]
        assert gaps[:4] == [0.0, 10.0, 30.0, 30.0]
        assert [p.restarts for _, p in starts[:5]] == [0, 1, 2, 3, 4]
        # each restart keeps how the run before it ended, for the deploy watcher
        assert {p.reason for _, p in starts[1:5]} == {"restarted; it exited with code 3"}
        nursery.cancel_scope.cancel()


async def test_backoff_starts_over_after_five_minutes_up(clock: trio.testing.MockClock) -> None:
    runs = iter(["crashed", "crashed", "crashed", "up"])

    def outcome(p: Placement) -> str:
        return next(runs, "crashed")

    async with trio.open_nursery() as nursery:
        state, scheduler, _ = await start_world(nursery, [Host("h1", True, {}, 4096)])
        acted: list[tuple[float, Placement]] = []
        nursery.start_soon(scripted_host, state, "h1", outcome, acted)
        await deploy(state, crash=1)
        nursery.start_soon(scheduler.duty, 1)
        await trio.sleep(50)  # 0 s, 10 s, 30 s: the fourth run stays up
        (_, p), = [(t, p) for t, p in acted if p.generation == 3]
        job = state.state.record(Job, p.id)
        assert job is not None and job.state == "up"
        await trio.sleep(6 * 60)  # up for 6 minutes, then it crashes
        crash_at = virtual_ms()
        await state.write([Job(
            id=p.id, app_id="a1", release_id="r1", process_type="crash", host="h1",
            state="crashed", created_at=p.created_at, updated_at=crash_at, exit_code=1,
            restarts=p.restarts, generation=3, up_since=job.up_since,
        )])  # fmt: skip
        await trio.sleep(1)
        restarted = [(t, q) for t, q in acted if q.generation == 4]
        assert restarted, "restarted at once: the backoff started over"
        assert restarted[0][1].restarts == 1
        nursery.cancel_scope.cancel()


async def test_failed_host_jobs_are_replaced_at_once(clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        hosts = [Host("h1", True, {}, 4096), Host("h2", True, {}, 4096)]
        state, scheduler, membership = await start_world(nursery, hosts)
        acted: list[tuple[float, Placement]] = []
        for h in ("h1", "h2"):
            nursery.start_soon(scripted_host, state, h, lambda p: "up", acted)
        await deploy(state, command="serve", web=2)
        nursery.start_soon(scheduler.duty, 1)
        await trio.sleep(1)
        assert sorted(p.host for _, p in acted) == ["h1", "h2"]
        failed_at = trio.current_time()
        membership.set((Host("h1", True, {}, 4096), Host("h2", False, {}, 4096)))
        await trio.sleep(1)
        later = [(t, p) for t, p in acted if t >= failed_at and p.action == "start"]
        assert [p.host for _, p in later] == ["h1"]
        assert later[0][0] - failed_at < 0.1  # at once, not at the next periodic evaluation
        stops = [p for p in state.state.records(Placement) if p.action == "stop"]
        assert [(p.host, p.reason) for p in stops] == [("h2", "host h2 is not alive")]
        assert stops[0].epoch == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("count", [0, 3])
async def test_second_evaluation_writes_nothing(clock: trio.testing.MockClock, count: int) -> None:
    async with trio.open_nursery() as nursery:
        state, scheduler, _ = await start_world(nursery, [Host("h1", True, {}, 4096)])
        await deploy(state, command="serve", web=count)
        await scheduler.evaluate(1)
        version = state.state.vv.copy() if hasattr(state.state.vv, "copy") else dict(state.state.vv)
        await scheduler.evaluate(1)
        assert dict(state.state.vv) == dict(version)
        assert len(state.state.records(Placement)) == count
        nursery.cancel_scope.cancel()


def test_collect_finished_keeps_recent_and_drops_old_and_lost() -> None:
    store = MemoryStore("n1")
    base = dict(app_id="a1", release_id="r1", process_type="web", epoch=1, created_at=0)
    job = dict(app_id="a1", release_id="r1", process_type="web", created_at=0)
    store.write([
        Placement(id="done-old", host="h1", action="stop", **base),
        Job(id="done-old", host="h1", state="down", updated_at=1_000, **job),
        Placement(id="done-new", host="h1", action="stop", **base),
        Job(id="done-new", host="h1", state="down", updated_at=590_000, **job),
        Placement(id="lost", host="h2", action="stop", **base),
        Job(id="lost", host="h2", state="up", updated_at=5_000, **job),
        Placement(id="running", host="h1", action="start", **base),
        Job(id="running", host="h1", state="up", updated_at=5_000, **job),
        Placement(id="oneoff", host="h1", action="start", one_off=True, **base),
        Job(id="oneoff", host="h1", state="crashed", one_off=True, updated_at=2_000, **job),
    ], physical_ms=1)  # fmt: skip
    changes = collect_finished(store.state, 600_000, 300_000, alive={"h1"})
    assert sorted((c.kind, c.key) for c in changes if isinstance(c, Delete)) == [
        ("job", "lost"), ("placement", "done-old"), ("placement", "lost"),
        ("placement", "oneoff"), ("run", "oneoff"),
    ]  # fmt: skip


def _store_with(*records: object) -> MemoryStore:
    store = MemoryStore("n1")
    store.write([*records], physical_ms=1)  # type: ignore[list-item]
    return store


BASE = dict(app_id="a1", release_id="r1", epoch=1, created_at=0)


def test_a_stopped_crashed_job_is_down_for_the_planner_and_collected() -> None:
    from flynnp2p.scheduler.model import inputs_from_state

    store = _store_with(
        Placement(id="c1", host="h1", action="stop", process_type="crash", **BASE),
        Job(id="c1", app_id="a1", release_id="r1", process_type="crash", host="h1",
            state="crashed", created_at=0, updated_at=1_000),
    )  # fmt: skip
    (info,) = inputs_from_state(store.state, [Host("h1", True, {}, 1024)], 2_000).jobs
    assert info.state == "down" and not info.holds_memory
    changes = collect_finished(store.state, 1_000 + 300_000, 300_000, alive={"h1"})
    assert [(c.kind, c.key) for c in changes if isinstance(c, Delete)] == [("placement", "c1")]


def test_a_one_off_is_placed_once_even_when_killed_before_its_host_reported() -> None:
    from flynnp2p.scheduler.model import inputs_from_state
    from flynnp2p.scheduler.plan import plan
    from flynnp2p.state.records import RunRequest

    store = _store_with(
        App(id="a1", name="shop", created_at=0),
        Release(id="r1", app_id="a1", created_at=0),
        RunRequest(id="run-1", app_id="a1", release_id="r1", args=("true",), created_at=0,
                   memory_mb=2048),
        Placement(id="run-1", host="h1", action="stop", process_type="run", one_off=True,
                  reason="killed by a user", **BASE),
    )  # fmt: skip
    inputs = inputs_from_state(store.state, [Host("h1", True, {}, 4096)], 10)
    assert inputs.one_offs == ()
    assert plan(inputs, 10, 1).starts == ()


async def test_a_one_off_placement_carries_its_memory(clock: trio.testing.MockClock) -> None:
    from flynnp2p.state.records import RunRequest

    async with trio.open_nursery() as nursery:
        state, scheduler, _ = await start_world(nursery, [Host("h1", True, {}, 4096)])
        await deploy(state, command="serve", web=0)
        await state.write([RunRequest(id="run-9", app_id="a1", release_id="r1",
                                      args=("make", "all"), created_at=T0_MS, memory_mb=2048)])  # fmt: skip
        await scheduler.evaluate(1)
        p = state.state.record(Placement, "run-9")
        assert p is not None and p.one_off and p.memory_mb == 2048 and p.args == ("make", "all")
        # it counts 2048 MB on its host: another 2048 MB one-off fits, a third does not
        await state.write([RunRequest(id=f"run-{i}", app_id="a1", release_id="r1", args=("x",),
                                      created_at=T0_MS, memory_mb=2048) for i in (10, 11)])  # fmt: skip
        await scheduler.evaluate(1)
        placed = {p.id for p in state.state.records(Placement)}
        assert len(placed & {"run-10", "run-11"}) == 1
        nursery.cancel_scope.cancel()


async def test_a_bug_in_an_evaluation_does_not_end_the_leader_loop(
    clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flynnp2p.scheduler.service as svc

    async with trio.open_nursery() as nursery:
        _, scheduler, _ = await start_world(nursery, [Host("h1", True, {}, 4096)])
        calls = []

        def broken(*args: object) -> None:
            calls.append(1)
            raise RecordError("blocked.reasons[0]", "a string of up to 4096 characters")

        monkeypatch.setattr(svc, "plan", broken)
        nursery.start_soon(scheduler.duty, 1)
        await trio.sleep(12)
        assert len(calls) >= 2 and scheduler.stats["errors"] == len(calls)
        nursery.cancel_scope.cancel()


def test_a_one_off_its_host_refused_as_fenced_is_placed_again_as_a_new_generation() -> None:
    from flynnp2p.scheduler.model import inputs_from_state
    from flynnp2p.scheduler.plan import plan
    from flynnp2p.scheduler.service import changes_for
    from flynnp2p.state.records import RunRequest

    store = _store_with(
        App(id="a1", name="shop", created_at=0),
        Release(id="r1", app_id="a1", created_at=0),
        RunRequest(id="run-1", app_id="a1", release_id="r1", args=("true",), created_at=0),
        Placement(id="run-1", host="h1", action="start", process_type="run", one_off=True, **BASE),
        Job(id="run-1", app_id="a1", release_id="r1", process_type="run", host="h1", state="down",
            created_at=0, updated_at=5, one_off=True,
            reason="fenced: placed at epoch 1, the newest epoch is 2"),
    )  # fmt: skip
    inputs = inputs_from_state(store.state, [Host("h1", True, {}, 4096)], 10)
    assert [o.id for o in inputs.one_offs] == ["run-1"] and inputs.jobs == ()
    result = plan(inputs, 10, 1)
    (p,) = changes_for(store.state, result, 2, 10)
    assert isinstance(p, Placement) and p.id == "run-1" and p.epoch == 2 and p.generation == 1
