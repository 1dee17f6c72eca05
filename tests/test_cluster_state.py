"""Replicated state across real agents: propagation, catch-up, durability,
partitions, uniqueness through the leader, hostile input."""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import pytest
import trio

from flynnp2p.state.hlc import Hlc
from flynnp2p.state.merge import Delta, Entry
from flynnp2p.state.records import App
from flynnp2p.state.wire import envelope
from tests.harness import AgentProc, Cluster, wait_for

pytestmark = pytest.mark.slow


async def state_of(agent: AgentProc) -> tuple[dict[str, int], int] | None:
    s = await agent.status()
    if s is None:
        return None
    st = s["components"]["state"]
    return st["vv"], st["records"]


async def converged(agents: list[AgentProc], timeout: float = 20) -> tuple[dict[str, int], int]:
    """Every agent holds the same version vector and record count."""

    async def same() -> tuple[dict[str, int], int] | None:
        states = [await state_of(a) for a in agents]
        if any(s is None for s in states):
            return None
        first = states[0]
        return first if all(s == first for s in states) else None

    return await wait_for(same, timeout, "the replicas to converge")


async def get_app(agent: AgentProc, name: str) -> dict[str, Any] | None:
    async with agent.client() as c:
        r = await c.get(f"/v1/apps/{name}")
        return r.json()["app"] if r.status_code == 200 else None


async def patch_meta(agent: AgentProc, name: str, meta: dict[str, str]) -> dict[str, Any]:
    async with agent.client() as c:
        r = await c.patch(f"/v1/apps/{name}", json={"meta": meta})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


async def create(agent: AgentProc, name: str) -> dict[str, Any]:
    async with agent.client() as c:
        r = await c.post("/v1/apps", json={"name": name})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]


async def test_writes_spread_and_concurrent_writes_converge(cluster: Cluster) -> None:
    a, b, c = await cluster.start(3)
    await cluster.wait_converged([a, b, c], alive=3)
    created = await create(b, "web")  # b forwards to the leader if it is not the leader
    assert created["replicas"] >= 2
    for agent in (a, b, c):
        app = await wait_for(lambda agent=agent: get_app(agent, "web"), 10, f"app on {agent.name}")
        assert app["id"] == created["app"]["id"]
    # Concurrent writes of one key on different nodes converge to one value everywhere.
    async with trio.open_nursery() as nursery:
        for i, agent in enumerate((a, b, c)):
            nursery.start_soon(patch_meta, agent, "web", {"owner": f"writer-{i}"})
    await converged([a, b, c])
    owners = {(await get_app(x, "web") or {})["meta"]["owner"] for x in (a, b, c)}
    assert len(owners) == 1 and owners.pop().startswith("writer-")


async def test_stopped_node_catches_up_and_new_node_gets_a_full_copy(cluster: Cluster) -> None:
    a, b, c = await cluster.start(3)
    await cluster.wait_converged([a, b, c], alive=3)
    await create(a, "app1")
    await converged([a, b, c])
    c.kill()
    for i in range(100):
        await patch_meta((a, b)[i % 2], "app1", {f"k{i % 10}": str(i)})
    c.start(token=False)
    await c.wait_ready()
    vv, _ = await converged([a, b, c], timeout=30)
    app = await get_app(c, "app1")
    assert app is not None and app["meta"]["k9"] == "99"

    # 10,000 more records (written as a peer's delta, fast), then a brand-new node.
    now = int(time.time() * 1000)
    entries = tuple(
        Entry("app", f"bulk{i}", App(id=f"bulk{i}", name=f"bulk-{i}", created_at=now),
              Hlc(now, i), "bulk/test", i + 1)
        for i in range(10_000)
    )
    async with a.client(token=a.token.peer_key) as client:
        r = await client.post(
            "/v1/internal/state/push",
            content=msgpack.packb(envelope(Delta(entries, {}, {}, False))),
            headers={"Content-Type": "application/x-msgpack"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    (d,) = await cluster.start(1)
    vv, records = await converged([a, b, c, d], timeout=60)
    assert records >= 10_001 and vv["bulk/test"] == 10_000


async def test_acknowledged_write_survives_sigkill_of_its_node(cluster: Cluster) -> None:
    a, b, c = await cluster.start(3)
    await cluster.wait_converged([a, b, c], alive=3)
    await create(a, "durable")
    await converged([a, b, c])
    result = await patch_meta(c, "durable", {"v": "acked"})
    assert result["replicas"] >= 2
    c.kill()  # SIGKILL right after the acknowledgement
    for agent in (a, b):
        app = await wait_for(lambda agent=agent: get_app(agent, "durable"), 10, "app")
        assert app["meta"]["v"] == "acked"


async def test_deleted_app_tombstones_are_collected_everywhere(cluster: Cluster) -> None:
    cluster.env["FLYNNP2P_STATE_GC_S"] = "0.5"
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    await create(agents[0], "doomed")
    await converged(agents)
    async with agents[1].client() as c:
        r = await c.delete("/v1/apps/doomed")
        assert r.status_code == 200, r.text
    for agent in agents:
        assert await wait_for(lambda agent=agent: _gone(agent, "doomed"), 10, "delete everywhere")

    async def collected() -> bool:
        sts = [await a.status() for a in agents]
        return all(s and s["components"]["state"]["tombstones"] == 0 for s in sts)

    await wait_for(collected, 30, "tombstones collected on every node")
    _, records = await converged(agents)
    assert records == 1  # only the cluster config: the app, its route and their tombstones are gone
    for agent in agents:  # and nothing resurrects the app afterwards
        assert await get_app(agent, "doomed") is None


async def _gone(agent: AgentProc, name: str) -> bool:
    async with agent.client() as c:
        return (await c.get(f"/v1/apps/{name}")).status_code == 404


async def test_two_creates_of_one_name_exactly_one_wins(cluster: Cluster) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    codes: list[int] = []

    async def attempt(agent: AgentProc) -> None:
        async with agent.client() as c:
            r = await c.post("/v1/apps", json={"name": "myapp"})
            codes.append(r.status_code)
            if r.status_code == 409:
                assert "myapp" in r.json()["error"]["message"]

    async with trio.open_nursery() as nursery:
        for agent in agents:
            nursery.start_soon(attempt, agent)
    assert sorted(codes) == [201, 409, 409]


@pytest.mark.skipif(os.geteuid() != 0, reason="cutting links with iptables needs root")
async def test_partition_only_the_majority_acknowledges_and_nothing_acknowledged_is_lost(cluster: Cluster) -> None:
    from tests.partition import Partition

    a, b, c = await cluster.start(3, own_gids=True)
    await cluster.wait_converged([a, b, c], alive=3)
    await create(a, "split")
    await converged([a, b, c])
    with Partition([a], [b, c]):

        async def split() -> bool:
            sa, sb, sc = await a.status(), await b.status(), await c.status()
            return bool(sa and sb and sc and sa["leader"]["name"] is None and sb["leader"]["quorum"]
                        and sb["leader"]["alive"] == 2
                        and sb["leader"]["name"] in (b.name, c.name)
                        and sc["leader"]["name"] == sb["leader"]["name"])

        await wait_for(split, 60, "the partition to be seen")
        # Changes to an app go through the leader: the lone node has none, so its
        # change is refused (503), never acknowledged and then lost.
        async with a.client() as client:
            r = await client.patch("/v1/apps/split", json={"meta": {"side": "a", "only-a": "1"}})
            assert r.status_code == 503, r.text
            r = await client.post("/v1/apps", json={"name": "minority"})
            assert r.status_code == 503
        await patch_meta(b, "split", {"side": "bc", "only-bc": "1"})
        await patch_meta(c, "split", {"also-bc": "1"})  # per key: both stay
    await cluster.wait_converged([a, b, c], alive=3, timeout=60)
    await converged([a, b, c], timeout=30)
    apps = [await get_app(x, "split") for x in (a, b, c)]
    assert apps[0] == apps[1] == apps[2]
    meta = apps[0]["meta"] if apps[0] else {}
    assert meta == {"side": "bc", "only-bc": "1", "also-bc": "1"}


HOSTILE: list[tuple[str, str, Any]] = [
    ("POST", "/v1/apps", b"{not json"),
    ("POST", "/v1/apps", [1, 2]),
    ("POST", "/v1/apps", {"name": 5}),
    ("POST", "/v1/apps", {"name": "../etc/passwd"}),
    ("POST", "/v1/apps", {"name": "UPPER"}),
    ("POST", "/v1/apps", {"name": "x" * 100}),
    ("POST", "/v1/apps", {"name": "ok", "unknown": 1}),
    ("POST", "/v1/apps", b"{" + b'"a":"' + b"x" * (2 << 20) + b'"}'),
    ("PATCH", "/v1/apps/..%2F..%2Fetc", {"meta": {}}),
    ("PUT", "/v1/apps/base/formation", {"processes": {"web": -1}}),
    ("PUT", "/v1/apps/base/formation", {"processes": "web=1"}),
    ("PATCH", "/v1/apps/base/env", {"set": {"1BAD": "x"}}),
    ("PATCH", "/v1/apps/base/env", {"set": {"OK": 5}}),
    ("POST", "/v1/apps/base/releases", {"processes": {"web": {"command": ""}}}),
    ("POST", "/v1/apps/base/routes", {"type": "tcp", "port": 70000}),
    ("POST", "/v1/apps/base/routes", {"type": "http", "domain": "Bad Domain"}),
    ("GET", "/v1/apps/nope", None),
    ("POST", "/v1/internal/state/push", b"\xc1garbage"),
    ("POST", "/v1/internal/state/push", msgpack.packb({"v": 1, "delta": {"entries": [{"kind": "app"}], "vv": {}, "horizon": {}, "complete": False}})),
    ("POST", "/v1/internal/state/push", msgpack.packb({"v": 99, "delta": {}})),
    ("POST", "/v1/internal/state/sync", msgpack.packb({"vv": {}})),
]


async def test_hostile_input_is_4xx_and_changes_nothing(cluster: Cluster) -> None:
    (a,) = await cluster.start(1)
    await create(a, "base")
    before = await state_of(a)
    async with a.client() as c:
        for method, path, body in HOSTILE:
            kwargs: dict[str, Any] = {}
            if isinstance(body, bytes):
                kwargs["content"] = body
                kwargs["headers"] = {"Content-Type": "application/json"}
            elif body is not None:
                kwargs["json"] = body
            r = await c.request(method, path, **kwargs)
            assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
            assert "error" in r.json(), (method, path, r.text)
    assert await state_of(a) == before


async def test_cluster_domain_is_the_creators_on_every_node(cluster: Cluster) -> None:
    seed = cluster.add()
    seed.start(extra=["--domain", "apps.example.test"])
    await seed.wait_ready()
    other = cluster.add()
    other.start(peers=[seed.gossip])  # its own default domain is ignored
    await other.wait_ready()
    await cluster.wait_converged([seed, other], alive=2)
    created = await create(other, "shop")
    assert [r["domain"] for r in created["routes"]] == ["shop.apps.example.test"]
