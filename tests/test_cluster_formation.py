"""An acknowledged scale survives a leader change, on real agents with real etcd
and serf (the formation generation, flynnp2p/coord/generation.py).

The leader acknowledges a scale and is SIGKILLed right after; at once an env
change is sent through another node (retried on a 503 as the CLI does, while
leadership moves). An env change moves the formation to a new release with the
counts the leader building it has: the new leader must build it on the
acknowledged count, never on the one before (tests/test_formation_generation.py
holds the two-leaders case where the new leader has not received the scale).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import trio

from tests.harness import AgentProc, Cluster, wait_for

pytestmark = pytest.mark.slow


async def call(agent: AgentProc, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with agent.client() as c:
        try:
            r = await c.request(method, path, json=body, timeout=15)
        except httpx.HTTPError:  # unreachable or timed out: the caller retries
            return 0, None
    return r.status_code, r.json()


async def leader_of(agents: list[AgentProc]) -> AgentProc | None:
    for a in agents:
        s = await a.status() if a.running else None
        if s and s["node"]["is_leader"]:
            return a
    return None


async def formation_everywhere(count: int, agents: list[AgentProc]) -> bool:
    for a in agents:
        code, body = await call(a, "GET", "/v1/apps/keep/formation")
        if code != 200 or (body["formation"] or {}).get("processes") != {"worker": count}:
            return False
    return True


async def test_an_acknowledged_scale_survives_its_leader_killed_right_after_the_ack(
    cluster: Cluster,
) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    lead = await leader_of(agents)
    assert lead is not None
    others = [a for a in agents if a is not lead]
    assert (await call(lead, "POST", "/v1/apps", {"name": "keep"}))[0] == 201
    worker = {"processes": {"worker": {"command": "sleep 600", "memory_mb": 32}}}
    assert (await call(lead, "POST", "/v1/apps/keep/releases", worker))[0] == 201
    code, body = await call(lead, "PUT", "/v1/apps/keep/formation", {"processes": {"worker": 1}})
    assert code == 200, body
    await wait_for(lambda: formation_everywhere(1, agents), 20, "worker=1 on every node")

    code, body = await call(lead, "PUT", "/v1/apps/keep/formation", {"processes": {"worker": 2}})
    assert code == 200 and body["replicas"] >= 2, body
    lead.kill()
    deadline = time.monotonic() + 60
    while True:  # as the CLI does: a 503 (or no answer: leadership is moving) is retried
        code, body = await call(others[0], "PATCH", "/v1/apps/keep/env", {"set": {"AFTER": "1"}})
        if code not in (503, 0) or time.monotonic() > deadline:
            break
        await trio.sleep(0.3)
    assert code == 200, body
    assert body["formation"]["processes"] == {"worker": 2}, body  # the acknowledged count
    assert body["formation"]["release_id"] == body["release"]["id"]
    await wait_for(lambda: formation_everywhere(2, others), 30, "worker=2 on both survivors")
