"""Leader duties whose term was taken away write nothing, and stop
(flynnp2p/scheduler/duty.py, the fence of flynnp2p/leader.py).

The scheduler and the deploy watcher run over a real state service in virtual
time, fenced by the in-memory etcd's leader key (`Claims.leads`). The term is
taken away in etcd only, as a lease that ran out while this node's election has
not noticed yet: nothing cancels the duty, so only the fence can stop it.
"""

from __future__ import annotations

import httpx
import trio
import trio.testing

from flynnp2p.api.allocate import Allocator
from flynnp2p.coord.claims import Claims
from flynnp2p.coord.election import LEADER_KEY
from flynnp2p.coord.generation import formation_digest
from flynnp2p.scheduler.model import Host
from flynnp2p.scheduler.service import Scheduler
from flynnp2p.scheduler.watcher import DeployWatcher
from flynnp2p.state.records import Deployment, Formation, Placement
from flynnp2p.state.service import StateService
from flynnp2p.state.store import MemoryStore
from flynnp2p.watch import Watched
from tests.fake_etcd import MemoryEtcd
from tests.test_deploy_watcher import APP, DEP, R1, R2, clock, job, placed
from tests.test_scheduler_service import T0_MS, LonePeers, deploy, virtual_ms

__all__ = ["clock"]  # the MockClock fixture, shared


async def leading(etcd: MemoryEtcd) -> int:
    _, epoch = await etcd.create({LEADER_KEY: '{"name": "n1"}'})
    return epoch


async def take_leadership_away(etcd: MemoryEtcd, epoch: int) -> None:
    """n1's lease ran out and n2 won the next term (etcd only: n1 has not noticed)."""
    await etcd.delete(LEADER_KEY)
    _, successor = await etcd.create({LEADER_KEY: '{"name": "n2"}'})
    assert successor > epoch


async def state_service(nursery: trio.Nursery) -> StateService:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    state = StateService(MemoryStore("n1"), LonePeers(), http, virtual_ms)
    await nursery.start(state.run)
    return state


async def test_a_scheduler_whose_term_was_taken_places_nothing_and_stops(
    clock: trio.testing.MockClock,
) -> None:
    etcd = MemoryEtcd()
    epoch = await leading(etcd)
    async with trio.open_nursery() as nursery:
        state = await state_service(nursery)
        membership: Watched[tuple[Host, ...]] = Watched((Host("h1", True, {}, 4096),))
        scheduler = Scheduler(
            state, lambda: membership.value, membership, virtual_ms, lambda e: True,
            period_s=5.0, fence=Claims(etcd).leads,
        )  # fmt: skip
        stopped = trio.Event()

        async def term() -> None:
            await scheduler.duty(epoch)
            stopped.set()

        await deploy(state, "sleep 600", web=1)
        nursery.start_soon(term)
        await trio.sleep(1)
        assert [p.epoch for p in state.state.records(Placement)] == [epoch]  # it leads: it places

        await take_leadership_away(etcd, epoch)
        await state.write([Formation(app_id="a1", release_id="r1", updated_at=T0_MS + 1, processes={"web": 3})])
        with trio.fail_after(1):
            await stopped.wait()  # the duty ended by itself, at its first write
        await trio.sleep(10)
        assert len(state.state.records(Placement)) == 1  # the scale-up was not placed
        nursery.cancel_scope.cancel()


async def watcher_world(
    nursery: trio.Nursery, etcd: MemoryEtcd, *, allocator: bool
) -> tuple[StateService, DeployWatcher]:
    """A running deployment of r2 (from r1) whose new job has crashed: a rollback is due."""
    state = await state_service(nursery)
    await state.write([
        APP, R1, R2, DEP,
        Formation(app_id="a1", release_id="r2", updated_at=T0_MS, processes={"web": 2}),
        placed("old1", "r1"), job("old1", "r1", "up"),
        placed("new1", "r2", restarts=1), job("new1", "r2", "crashed", restarts=1, exit_code=3),
    ])  # fmt: skip
    claims = Claims(etcd)
    formations = Allocator(state, lambda: claims, virtual_ms) if allocator else None
    watcher = DeployWatcher(
        state, virtual_ms, lambda e: True, formations=formations, fence=claims.leads, period_s=5.0
    )
    return state, watcher


async def test_a_deploy_watcher_whose_term_was_taken_rolls_nothing_back(
    clock: trio.testing.MockClock,
) -> None:
    for allocator in (False, True):  # its own fenced write; the allocator's fenced swap
        etcd = MemoryEtcd()
        epoch = await leading(etcd)
        await take_leadership_away(etcd, epoch)
        async with trio.open_nursery() as nursery:
            state, watcher = await watcher_world(nursery, etcd, allocator=allocator)
            with trio.fail_after(1):
                await watcher.duty(epoch)  # returns: it is not cancelled, it stops
            dep = state.state.record(Deployment, "d1")
            formation = state.state.record(Formation, "a1")
            assert dep is not None and dep.status == "running", allocator
            assert formation is not None and formation.release_id == "r2", allocator
            assert watcher.stats["rolled_back"] == 0
            assert (await Claims(etcd).formation_generation("a1")).number == 0  # nor swapped
            nursery.cancel_scope.cancel()


async def test_a_leading_deploy_watcher_rolls_back_through_the_formation_generation(
    clock: trio.testing.MockClock,
) -> None:
    etcd = MemoryEtcd()
    epoch = await leading(etcd)
    async with trio.open_nursery() as nursery:
        state, watcher = await watcher_world(nursery, etcd, allocator=True)
        nursery.start_soon(watcher.duty, epoch)
        await trio.sleep(1)
        dep = state.state.record(Deployment, "d1")
        formation = state.state.record(Formation, "a1")
        assert dep is not None and dep.status == "rolled-back"
        assert formation is not None and (formation.release_id, dict(formation.processes)) == (
            "r1",
            {"web": 2},
        )
        generation = await Claims(etcd).formation_generation("a1")
        assert (generation.number, generation.digest) == (1, formation_digest(formation))
        nursery.cancel_scope.cancel()
