"""A host that stops answering: its jobs are shown `lost` before serf calls it failed.

Cluster test on real agents (process backend, real serf on loopback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.harness import Cluster, wait_for
from tests.jobs_app import deploy, jobs, make_slug, scale, wait_up

pytestmark = pytest.mark.slow


async def member_status(c: httpx.AsyncClient, name: str) -> str:
    r = await c.get("/v1/members")
    assert r.status_code == 200, r.text
    return next(m["status"] for m in r.json()["members"] if m["name"] == name)


async def test_jobs_of_a_killed_host_are_lost_before_serf_marks_it_failed(
    cluster: Cluster, tmp_path: Path
) -> None:
    agents = await cluster.start(3)
    statuses = await cluster.wait_converged(agents, 3)
    leader = next(iter(statuses.values()))["leader"]["name"]
    slug, digest = make_slug(tmp_path / "app.tgz")
    observer = next(a for a in agents if a.name == leader)
    async with observer.client() as c:
        await deploy(c, "shop", slug, digest)
        await scale(c, "shop", web=3)
        up = await wait_up(c, "shop", 3)
        assert sorted(j["host"] for j in up) == sorted(a.name for a in agents)
        # No false alarm while everyone answers (the agents have beaten for a while).
        hosts = (await c.get("/v1/hosts")).json()["hosts"]
        assert {h["status"] for h in hosts} == {"alive"}, hosts

        victim = next(a for a in agents if a.name != leader)
        victim_jobs = {j["id"] for j in up if j["host"] == victim.name}
        t0 = trio.current_time()
        victim.kill()  # agent, serf and its jobs, at once

        async def lost() -> dict[str, Any] | None:
            rows = {j["id"]: j for j in (await jobs(c, "shop"))["jobs"]}
            if all(rows[i]["state"] == "lost" for i in victim_jobs):
                return rows
            return None

        rows = await wait_for(lost, 10, f"{victim.name}'s jobs to be lost", interval=0.05)
        took = trio.current_time() - t0
        serf_says = await member_status(c, victim.name)
        hosts = {h["name"]: h for h in (await c.get("/v1/hosts")).json()["hosts"]}
        print(f"\njobs of {victim.name} lost {took:.2f}s after SIGKILL; serf still says {serf_says}")
        assert took < 4, f"lost only after {took:.1f}s"
        assert serf_says == "alive"  # serf needs 5-7 s: the heartbeats were first

        # The others are still up; the details of a lost job say why.
        others = {i: r for i, r in rows.items() if i not in victim_jobs and r["process_type"] == "web"}
        assert {r["state"] for r in others.values()} == {"up"}
        job_id = next(iter(victim_jobs))
        r = await c.get(f"/v1/apps/shop/jobs/{job_id}")
        assert r.status_code == 200, r.text
        detail = r.json()["job"]
        assert detail["state"] == "lost" and victim.name in detail["reason"]
        if hosts[victim.name]["gossip_status"] == "alive":  # serf has not flipped meanwhile
            assert hosts[victim.name]["status"] == "unresponsive"
            assert hosts[victim.name]["silent_s"] >= 2.0  # rounded to 0.1 s
        assert {hosts[a.name]["status"] for a in agents if a is not victim} == {"alive"}

        # Once serf gives up on it, serf's word is shown again (and the jobs get replaced).
        async def failed() -> bool:
            return await member_status(c, victim.name) == "failed"

        await wait_for(failed, 20, f"serf to mark {victim.name} failed")
        print(f"serf marked {victim.name} failed {trio.current_time() - t0:.2f}s after SIGKILL")
        hosts = {h["name"]: h for h in (await c.get("/v1/hosts")).json()["hosts"]}
        assert hosts[victim.name]["status"] == "failed" and hosts[victim.name]["silent_s"] is None
        # …and its jobs do not go back to their stale "up": lost until the leader stops them.
        rows = {j["id"]: j for j in (await jobs(c, "shop", all=True))["jobs"]}
        assert {rows[i]["state"] for i in victim_jobs} <= {"lost", "down"}, rows
