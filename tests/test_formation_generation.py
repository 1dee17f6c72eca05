"""The formation generation: no formation write is built on counts older than the
last acknowledged one (flynnp2p/coord/generation.py, coord/claims.py, api/allocate.py).

The pure rules first, then the etcd transactions over the in-memory etcd, then
two leaders over one etcd as a leader change leaves them: the new one has not
yet received the old one's last acknowledged scale.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import trio

from flynnp2p.coord.claims import Claims, release_key
from flynnp2p.coord.election import LEADER_KEY
from flynnp2p.coord.generation import (
    NO_GENERATION,
    ORPHAN_MS,
    Base,
    FormationGeneration,
    base_verdict,
    decode_generation,
    formation_digest,
    formation_key,
    next_generation,
)
from flynnp2p.state.records import Formation
from tests.fake_etcd import MemoryEtcd
from tests.test_api_apps import Api, Clock, Ctx, make_app, seed, start_service

F1 = Formation(app_id="a1", release_id="r1", updated_at=1000, processes={"web": 1})
F3 = dataclasses.replace(F1, processes={"web": 3})

# -- the pure rules -----------------------------------------------------------------


def test_the_digest_names_one_formation_as_every_replica_encodes_it() -> None:
    assert formation_digest(F1) == formation_digest(Formation.from_wire(F1.to_wire()))
    assert formation_digest(F1) != formation_digest(F3)
    assert formation_digest(F1) != formation_digest(dataclasses.replace(F1, updated_at=1001))
    assert formation_digest(None) == ""


def test_a_generation_round_trips_through_its_etcd_value() -> None:
    seen = FormationGeneration(4, "d", mod_revision=9)
    raw = next_generation(seen, F3, now_ms=77).encode()
    assert decode_generation(raw, 12) == FormationGeneration(5, formation_digest(F3), 12, 77)
    for bad in (b"not json", b"[]", b'{"g": "1"}', b'{"g": 0}', b'{"g": true}'):
        assert decode_generation(bad, 1) is None, bad


@pytest.mark.parametrize(
    ("seen", "local", "now", "verdict"),
    [
        (NO_GENERATION, None, 0, Base.CURRENT),  # the app's first formation write
        (NO_GENERATION, F1, 0, Base.CURRENT),  # written before generations (or after recover)
        (FormationGeneration(2, formation_digest(F3), 5, 1000), F3, 1000, Base.CURRENT),
        (FormationGeneration(2, formation_digest(F3), 5, 1000), F1, 1000, Base.BEHIND),
        (FormationGeneration(2, formation_digest(F3), 5, 1000), None, 1000, Base.BEHIND),
        (FormationGeneration(2, formation_digest(F3), 5, 1000), F1, 1000 + ORPHAN_MS, Base.BEHIND),
        (FormationGeneration(2, formation_digest(F3), 5, 1000), F1, 1001 + ORPHAN_MS, Base.ORPHANED),
    ],
)
def test_a_write_builds_only_on_the_formation_the_last_write_made(
    seen: FormationGeneration, local: Formation | None, now: int, verdict: Base
) -> None:
    assert base_verdict(seen, local, now) is verdict


# -- the etcd transactions -------------------------------------------------------------


async def test_two_writers_on_one_generation_cannot_both_win() -> None:
    claims = Claims(MemoryEtcd())
    seen = await claims.formation_generation("a1")
    assert seen == NO_GENERATION
    assert await claims.advance("a1", formation=(seen, F1))
    assert not await claims.advance("a1", formation=(seen, F3))  # built on what it saw: refused
    now = await claims.formation_generation("a1")
    assert (now.number, now.digest) == (1, formation_digest(F1))
    assert await claims.advance("a1", formation=(now, F3))
    assert (await claims.formation_generation("a1")).number == 2


async def test_a_release_and_the_formation_moved_to_it_advance_together_or_not_at_all() -> None:
    claims = Claims(MemoryEtcd())
    stale = await claims.formation_generation("a1")
    assert await claims.advance("a1", formation=(stale, F1))
    counter = await claims.release_counter("a1")
    assert not await claims.advance("a1", release=(counter, "r2"), formation=(stale, F3))
    assert await claims.release_counter("a1") == counter  # the release number did not move
    fresh = await claims.formation_generation("a1")
    assert await claims.advance("a1", release=(counter, "r2"), formation=(fresh, F3))
    assert (await claims.release_counter("a1")).release_id == "r2"
    assert (await claims.formation_generation("a1")).digest == formation_digest(F3)


async def test_a_fenced_swap_commits_only_while_the_term_holds_the_leader_key() -> None:
    etcd = MemoryEtcd()
    claims = Claims(etcd)
    _, epoch = await etcd.create({LEADER_KEY: "n1"})
    assert await claims.leads(epoch)
    seen = await claims.formation_generation("a1")
    assert await claims.advance("a1", formation=(seen, F1), epoch=epoch)
    await etcd.delete(LEADER_KEY)  # the lease ran out; another node won the next term
    _, successor = await etcd.create({LEADER_KEY: "n2"})
    assert successor > epoch
    assert not await claims.leads(epoch) and await claims.leads(successor)
    seen = await claims.formation_generation("a1")
    assert not await claims.advance("a1", formation=(seen, F3), epoch=epoch)
    assert await claims.formation_generation("a1") == seen


async def test_forgetting_an_app_drops_its_generation_too() -> None:
    etcd = MemoryEtcd()
    claims = Claims(etcd)
    await claims.advance("a1", formation=(NO_GENERATION, F1))
    await claims.forget_app("a1")
    assert await claims.formation_generation("a1") == NO_GENERATION


# -- through the API: two leaders over one etcd ------------------------------------------


async def leaders(nursery: trio.Nursery) -> tuple[Ctx, Api, Ctx, Api, dict[str, Any]]:
    """The old leader with an app scaled web=1, and the new one holding what the old
    one had written until then (as if replicated), sharing one etcd."""
    old = Ctx(await start_service(nursery, name="n1"), Clock())
    new = Ctx(await start_service(nursery, name="n2"), Clock(), etcd=old.etcd)
    old_api, new_api = Api(make_app(old)), Api(make_app(new))
    seeded = await seed(old_api, "shop")
    status, body = await old_api.call("PUT", "/v1/apps/shop/formation", {"processes": {"web": 1}})
    assert status == 200, body
    await new.state.write([e.value for e in old.state.state.entries() if e.value is not None])
    return old, old_api, new, new_api, seeded


def formation_of(ctx: Ctx, app_id: str) -> Formation:
    found = ctx.state.state.record(Formation, app_id)
    assert found is not None
    return found


async def test_a_new_leader_refuses_to_move_a_formation_it_has_not_caught_up_with(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flynnp2p.api import allocate

    monkeypatch.setattr(allocate, "RECORD_WAIT_S", 0.2)
    _, old_api, new, new_api, seeded = await leaders(nursery)
    app_id = seeded["app"]["id"]
    status, body = await old_api.call("PUT", "/v1/apps/shop/formation", {"processes": {"web": 3}})
    assert status == 200, body  # acknowledged by the old leader, which then dies
    before = formation_of(new, app_id)
    status, body = await new_api.call("PATCH", "/v1/apps/shop/env", {"set": {"B": "2"}})
    assert status == 503 and "retry" in body["error"]["message"], body
    assert new_api.untouched  # nothing done: the CLI may send even this PATCH again
    assert formation_of(new, app_id) == before  # nothing written over the count it lacks
    counter = json.loads(new.etcd.kvs[release_key(app_id)].value)
    assert counter["id"] == seeded["release"]["id"]  # no release number spent either
    status, body = await new_api.call("PUT", "/v1/apps/shop/formation", {"processes": {"web": 2}})
    assert status == 503, body  # a scale too: it could build on stale constraints


async def test_a_new_leader_builds_on_the_acknowledged_scale_once_it_arrives(
    nursery: trio.Nursery,
) -> None:
    old, old_api, new, new_api, seeded = await leaders(nursery)
    app_id = seeded["app"]["id"]
    status, body = await old_api.call("PUT", "/v1/apps/shop/formation", {"processes": {"web": 3}})
    assert status == 200, body
    answer: list[tuple[int, Any]] = []

    async def env_change() -> None:
        answer.append(await new_api.call("PATCH", "/v1/apps/shop/env", {"set": {"B": "2"}}))

    async with trio.open_nursery() as inner:
        inner.start_soon(env_change)
        await trio.sleep(0.3)
        assert not answer  # waiting for the formation the generation names
        await new.state.write([formation_of(old, app_id)])  # it reaches the new leader
    ((status, body),) = answer
    assert status == 200, body
    assert body["formation"]["processes"] == {"web": 3}  # the acknowledged count survives
    assert body["formation"]["release_id"] == body["release"]["id"]
    generation = await new.claims().formation_generation(app_id)
    assert generation.number == 3 and generation.digest == formation_digest(formation_of(new, app_id))


async def test_a_generation_whose_formation_never_committed_is_built_over_after_a_while(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flynnp2p.api import allocate

    monkeypatch.setattr(allocate, "RECORD_WAIT_S", 0.2)
    old, old_api, _, _, seeded = await leaders(nursery)
    app_id = seeded["app"]["id"]
    seen = await old.claims().formation_generation(app_id)
    # A leader swapped the generation and died before writing its formation anywhere.
    ghost = {"g": seen.number + 1, "digest": "ghost", "at": old.clock.ms}
    old.etcd._put(formation_key(app_id), json.dumps(ghost))
    status, body = await old_api.call("PUT", "/v1/apps/shop/formation", {"processes": {"web": 2}})
    assert status == 503 and old_api.untouched, body  # it may still arrive: refuse, retry
    old.etcd._put(formation_key(app_id), json.dumps({**ghost, "at": old.clock.ms - 2 * ORPHAN_MS}))
    status, body = await old_api.call("PUT", "/v1/apps/shop/formation", {"processes": {"web": 2}})
    assert status == 200 and body["formation"]["processes"] == {"web": 2}, body
    assert (await old.claims().formation_generation(app_id)).number == seen.number + 2


async def test_every_formation_write_of_the_api_advances_the_generation(
    nursery: trio.Nursery,
) -> None:
    old, api, _, _, seeded = await leaders(nursery)
    app_id = seeded["app"]["id"]

    async def generation() -> int:
        found = await old.claims().formation_generation(app_id)
        assert found.digest == formation_digest(formation_of(old, app_id))
        return found.number

    first = await generation()
    steps: list[tuple[str, str, Any]] = [
        ("PUT", "/v1/apps/shop/formation", {"processes": {"web": 2}}),
        ("PATCH", "/v1/apps/shop/env", {"set": {"C": "3"}}),
        ("POST", "/v1/apps/shop/rollback", {}),
    ]
    for i, (method, path, body) in enumerate(steps, 1):
        status, answer = await api.call(method, path, body)
        assert status in (200, 201), (path, answer)
        assert await generation() == first + i, path
    status, answer = await api.call("POST", "/v1/apps/shop/releases", {"env": {"D": "4"}})
    assert status == 201, answer
    assert await generation() == first + len(steps)  # a release alone moves no formation
