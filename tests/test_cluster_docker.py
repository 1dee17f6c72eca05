"""The jobs cluster tests again, with the docker backend against a real dockerd.

Node names carry this session's pid so that containers of other clusters on the
same engine (a quickstart, another test run) are never touched; the fixture
removes this cluster's containers even when a test fails.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import Cluster, wait_for
from tests.jobs_app import answers, deploy, jobs, live, make_slug, scale, wait_up
from tests.test_host_docker import docker_client, remove_containers

pytestmark = pytest.mark.slow
__all__ = ["docker_client"]  # a fixture, used by name

PREFIX = f"dk{os.getpid()}"


@pytest.fixture
def engine(docker_client: Any) -> Iterator[Any]:
    yield docker_client


@pytest.fixture
async def docker_cluster(tmp_path: Path, engine: Any) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    c.backend = "docker"
    try:
        yield c
    finally:
        c.kill_all()
        for agent in c.agents:
            await trio.to_thread.run_sync(remove_containers, engine, agent.name)


def containers_of(engine: Any, node: str) -> dict[str, str]:
    """job id -> container id of the containers labelled with `node`."""
    found = engine.containers.list(all=True, filters={"label": f"flynnp2p.node={node}"})
    return {c.labels["flynnp2p.job"]: c.id for c in found}


async def start(c: Cluster, n: int) -> list[Any]:
    for _ in range(n):
        c.add(name=f"{PREFIX}-{len(c.agents) + 1}")
    seed, rest = c.agents[0], c.agents[1:]
    seed.start()
    await seed.wait_ready(30)
    for a in rest:
        a.start(peers=[seed.gossip])
    for a in rest:
        await a.wait_ready(30)
    await c.wait_converged(c.agents, n)
    return c.agents


async def test_docker_scale_spread_and_agent_restart(
    docker_cluster: Cluster, engine: Any, tmp_path: Path
) -> None:
    agents = await start(docker_cluster, 3)
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with agents[0].client() as c:
        await deploy(c, "shop", slug, digest)
        await scale(c, "shop", web=3)
        up = await wait_up(c, "shop", 3, timeout=60)
        assert sorted(j["host"] for j in up) == sorted(a.name for a in agents)
        for j in up:
            assert (await answers(j["address"])).split()[0] == j["id"]
        status = await agents[0].status()
        assert status is not None and status["components"]["jobs"]["backend"] == "docker"

        await scale(c, "shop", web=5)
        five = await wait_up(c, "shop", 5, timeout=60)
        oldest = min(five, key=lambda j: (j["created_at"], j["id"]))
        await scale(c, "shop", web=1)
        (left,) = await wait_up(c, "shop", 1, timeout=60)
        assert left["id"] == oldest["id"]

        async def stopped_containers_removed() -> bool:
            running = {}
            for a in agents:
                running.update(await trio.to_thread.run_sync(containers_of, engine, a.name))
            return set(running) == {left["id"]}

        await wait_for(stopped_containers_removed, 20, "only the remaining job's container")

        # agent restart: the container keeps running and is re-adopted
        node = next(a for a in agents if a.name == left["host"])
        before = await trio.to_thread.run_sync(containers_of, engine, node.name)
        node.kill(jobs=False)
        node.start()
        await node.wait_ready(30)

        async def adopted() -> bool:
            status = await node.status()
            return status is not None and status["components"]["jobs"]["adopted"] == 1

        await wait_for(adopted, 30, "the restarted agent to re-adopt the container")
        (again,) = await wait_up(c, "shop", 1, timeout=30)
        assert again["id"] == left["id"]
        after = await trio.to_thread.run_sync(containers_of, engine, node.name)
        assert after == before  # the same container, not a new one
        await answers(again["address"])
        assert len(live(await jobs(c, "shop"))) == 1
