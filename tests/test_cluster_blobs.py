"""The blobstore across real agents: replicated puts, fetch on read, failures."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from tests.harness import AgentProc, Cluster, wait_for

pytestmark = pytest.mark.slow


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def location_nodes(agent: AgentProc, digest: str) -> set[str]:
    """Nodes that hold `digest` according to `agent`'s replica of the state."""
    async with agent.client() as c:
        r = await c.get(f"/v1/blobs/{digest}/locations")
        assert r.status_code == 200, r.text
        return {loc["node"] for loc in r.json()["locations"]}


async def _has_all(agent: AgentProc, digest: str, nodes: set[str]) -> bool:
    return await location_nodes(agent, digest) == nodes


async def local_blobs(agent: AgentProc) -> set[str]:
    async with agent.client() as c:
        r = await c.get("/v1/blobs")
        assert r.status_code == 200, r.text
        return {b["digest"] for b in r.json()["blobs"]}


async def get_blob(agent: AgentProc, digest: str) -> httpx.Response:
    async with agent.client() as c:
        c.timeout = httpx.Timeout(15.0)
        return await c.get(f"/v1/blobs/{digest}")


async def test_put_replicates_get_fetches_and_survives_a_holder(cluster: Cluster) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    n1 = agents[0]
    data = os.urandom(5 << 20)
    digest = digest_of(data)

    async with n1.client() as c:
        r = await c.put(f"/v1/blobs/{digest}", content=data)
    assert r.status_code == 201, r.text
    assert r.json() == {"digest": digest, "size": len(data), "replicas": 2}

    held = {a.name: digest in await local_blobs(a) for a in agents}
    assert sum(held.values()) == 2 and held["n1"]
    lacking = next(a for a in agents if not held[a.name])

    # The locations are replicated state: every node sees both holders.
    holding = {n for n, h in held.items() if h}
    for agent in agents:
        await wait_for(
            lambda agent=agent: _has_all(agent, digest, holding), 10, f"locations on {agent.name}"
        )

    async with lacking.client() as c:
        head = await c.head(f"/v1/blobs/{digest}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))

    # SIGKILL the other holder before the node that lacks the blob reads it: that
    # node fetches from the survivor (the victim may still look alive to gossip).
    victim = next(a for a in agents if held[a.name] and a is not n1)
    victim.kill()
    for agent in (lacking, n1):
        r = await get_blob(agent, digest)
        assert r.status_code == 200, r.text
        assert r.headers["content-length"] == str(len(data)) and r.content == data
    assert digest in await local_blobs(lacking)  # it kept the copy it fetched
    await wait_for(
        lambda: _has_all(n1, digest, {n1.name, victim.name, lacking.name}), 10, "3 locations"
    )


async def test_wrong_digest_and_unknown_digest(cluster: Cluster) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    data = b"the bytes that were sent" * 1000
    claimed = digest_of(b"some other bytes")

    async with agents[1].client() as c:
        r = await c.put(f"/v1/blobs/{claimed}", content=data)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert claimed in message and digest_of(data) in message
        bad = await c.put("/v1/blobs/md5:abc", content=b"x")
        assert bad.status_code == 400 and "sha256" in bad.json()["error"]["message"]
        unknown = await c.get(f"/v1/blobs/{digest_of(b'nobody has this')}")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
        head = await c.head(f"/v1/blobs/{digest_of(b'nobody has this')}")
        assert head.status_code == 404
    for agent in agents:
        assert await local_blobs(agent) == set()
        assert await location_nodes(agent, claimed) == set()
        assert await location_nodes(agent, digest_of(data)) == set()
        assert list((agent.data_dir / "blobs" / "tmp").iterdir()) == []  # no partial file either

    async with agents[0].client(token="wrong") as c:
        r = await c.put(f"/v1/blobs/{digest_of(b'x')}", content=b"x")
        assert r.status_code == 401
