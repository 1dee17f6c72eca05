"""Real agents, each with its router in a worker process (the default): a route
updated through one node takes effect through another node's router, and a
killed router worker is replaced by its agent while that node keeps answering."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.harness import AgentProc, Cluster, wait_for
from tests.jobs_app import deploy, make_slug, scale, wait_up

pytestmark = pytest.mark.slow

HOST = "upd.example.com"


async def get(agent: AgentProc, path: str = "/", host: str = HOST) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as c:
        return await c.get(f"http://{agent.addr}:8080{path}", headers={"Host": host})


async def router_status(agent: AgentProc) -> dict:  # type: ignore[type-arg]
    async with agent.client() as c:
        r = await c.get("/v1/router/status")
        assert r.status_code == 200, r.text
        body: dict = r.json()  # type: ignore[type-arg]
        return body


async def test_an_update_takes_effect_through_another_nodes_router_and_a_killed_worker_is_replaced(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b = await cluster.start(2)
    await cluster.wait_converged([a, b], alive=2)
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with a.client() as c:
        await deploy(c, "upd", slug, digest)
        await scale(c, "upd", web=1)
        await wait_up(c, "upd", 1, timeout=60)
        r = await c.post("/v1/apps/upd/routes", json={"type": "http", "domain": HOST})
        assert r.status_code == 201, r.text
        rid = r.json()["route"]["id"]

        async def answers(path: str, code: int) -> bool:
            return (await get(b, path)).status_code == code

        await wait_for(lambda: answers("/", 200), 10, "b's router to serve the new route")
        # https_only, set through a: b's router answers plain HTTP with a 308.
        r = await c.patch(f"/v1/apps/upd/routes/{rid}", json={"https_only": True})
        assert r.status_code == 200, r.text
        await wait_for(lambda: answers("/", 308), 5, "b's router to redirect to https")
        assert (await get(b)).headers["location"].startswith(f"https://{HOST}:")
        # A new path: / is no longer routed there, /v2 is.
        r = await c.patch(f"/v1/apps/upd/routes/{rid}", json={"https_only": False, "path": "/v2"})
        assert r.status_code == 200, r.text
        await wait_for(lambda: answers("/v2/x", 200), 5, "b's router to serve the new path")
        assert (await get(b, "/")).status_code == 404
        # What cannot change is refused, saying what can.
        r = await c.patch(f"/v1/apps/upd/routes/{rid}", json={"domain": "other.example.com"})
        assert r.status_code == 400 and "what can: sticky" in r.json()["error"]["message"]

    # b's router runs in a worker; SIGKILL it: b's agent starts another, b keeps answering.
    status = await router_status(b)
    (worker,) = status["workers"]
    victim = worker["pid"]
    assert victim and victim != b.proc.pid  # type: ignore[union-attr]
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        w = (await router_status(b))["workers"][0]
        return bool(w["answered"] and w["pid"] not in (None, victim) and w["restarts"] == 1)

    await wait_for(replaced, 15, "b's agent to replace its router worker")
    assert (await get(b, "/v2")).status_code == 200
    # The agent itself was never disturbed.
    assert b.running and (await b.status()) is not None
