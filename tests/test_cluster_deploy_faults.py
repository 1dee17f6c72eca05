"""Deploys under the faults users meet, with real agents, real jobs and real load.

Each test runs a 3-node cluster, one app at web=2 (so a redeploy is one-by-one),
and a one-by-one redeploy (an env change: a new release whose jobs boot for
``BOOT_S`` seconds, so the deploy lasts long enough to be hit) through a node
that is not the leader; then, while the deployment runs:

1. the leader is SIGKILLed, with the jobs it hosts (a host failure): a new
   leader must pick the deployment up and finish it; requests through a
   surviving node's router keep succeeding;
2. the leader is cut off from the two others (iptables, `tests.partition`), then
   healed: one outcome, on every node the same. Requests through a majority
   node's router that were in flight to the cut-off node's job are given up
   once the new leader stops that job because its host is not alive (the
   router's `lost`: a GET is retried elsewhere, a POST answered 504); one in
   flight to a job that was already draining when the cut came still waits for
   it until the client gives up. Counted and printed (those that hung until the
   client's timeout apart); none that began once the front's router stopped
   listing the cut-off node's jobs (and `LOST_S` after the cut) fails.

The checker counts what was asked and what came of it: every request sent
through the router (its start, end and result); the deployment's status as
every node sees it (exactly one record per release, never left "running"); the
live web jobs (as many as the formation says, all of its release: no duplicate
left running once it converged); the formation, the same on every node.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from flynnp2p.router.proxy import POOL_SWEEP_S
from tests.harness import AgentProc, Cluster, wait_for
from tests.jobs_app import deploy, jobs, scale, wait_up
from tests.partition import Partition
from tests.test_cluster_deploy import make_slug
from tests.test_cluster_drain import HOST

pytestmark = pytest.mark.slow

CLIENTS = 12
BOOT_S = "3"  # how long a new job boots before it listens: the deploy lasts ~2 x that
DEPLOY_S = 90.0  # the deployment's outcome is expected well before this
LOST_S = 4.0  # a killed host's jobs are `lost` within this (routers drop them when the leader stops them)


@dataclass
class Request:
    kind: str  # "GET" | "POST"
    start: float
    end: float = 0.0
    failure: str | None = None


@dataclass
class Load:
    """Every request sent through one router, with when it began and ended."""

    requests: list[Request] = field(default_factory=list)

    @property
    def failures(self) -> list[Request]:
        return [r for r in self.requests if r.failure is not None]

    def summary(self, t0: float = 0.0) -> str:
        """Counts, and the first failures with their times relative to `t0` (the fault)."""
        failed = self.failures
        lines = [f"sent {len(self.requests)}, answered {len(self.requests) - len(failed)}, "
                 f"failed {len(failed)}"]  # fmt: skip
        lines += [
            f"  {r.kind} {r.start - t0:+.2f}s..{r.end - t0:+.2f}s: {r.failure}" for r in failed[:10]
        ]
        return "\n".join(lines)


async def _client(url: str, load: Load, stop: trio.Event) -> None:
    """Keep-alive requests one after the other, a GET and a POST (0.2 s at the job) in turn."""
    async with httpx.AsyncClient(timeout=10) as c:
        post = False
        while not stop.is_set():
            post = not post
            req = Request("POST" if post else "GET", trio.current_time())
            load.requests.append(req)
            try:
                if post:
                    r = await c.post(url + "work", headers={"Host": HOST}, content=b"x" * 100)
                else:
                    r = await c.get(url, headers={"Host": HOST})
            except httpx.TransportError as exc:
                req.failure = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code != 200:
                    req.failure = f"{r.status_code}: {r.text[:100]}"
            req.end = trio.current_time()
            await trio.sleep(0.005)


async def under_load(url: str, body: Callable[[Load], Awaitable[None]]) -> Load:
    load, stop = Load(), trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(CLIENTS):
            nursery.start_soon(_client, url, load, stop)
        await body(load)
        stop.set()
    return load


async def leader_of(agents: list[AgentProc]) -> AgentProc:
    async def one() -> AgentProc | None:
        for a in agents:
            s = await a.status()
            if s and s["node"]["is_leader"]:
                return a
        return None

    return await wait_for(one, 30, "a leader")


async def deployments_of(agent: AgentProc) -> list[dict[str, Any]]:
    async with agent.client() as c:
        r = await c.get("/v1/apps/shop/deployments")
        assert r.status_code == 200, r.text
        return r.json()["deployments"]  # type: ignore[no-any-return]


async def finished(agent: AgentProc, release_id: str, timeout: float = DEPLOY_S) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        try:
            deps = [d for d in await deployments_of(agent) if d["new_release_id"] == release_id]
        except httpx.TransportError:
            return None
        return deps[0] if len(deps) == 1 and deps[0]["status"] != "running" else None

    return await wait_for(done, timeout, f"the deployment of {release_id} to finish", interval=0.2)


async def setup(
    cluster: Cluster, tmp_path: Path, own_gids: bool = False
) -> tuple[list[AgentProc], AgentProc]:
    """Three agents, shop at web=2 and served; (agents, the leader)."""
    agents = await cluster.start(3, own_gids=own_gids)
    await cluster.wait_converged(agents, alive=3)
    leader = await leader_of(agents)
    front = next(a for a in agents if a is not leader)
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with front.client() as c:
        c.timeout = 15.0
        v1 = (await deploy(c, "shop", slug, digest))["release"]
        await scale(c, "shop", web=2)
        await wait_up(c, "shop", 2, timeout=60)
    assert (await finished(front, v1["id"]))["status"] == "complete"
    for a in agents:
        url = f"http://{a.addr}:8080/"

        async def serves(url: str = url) -> bool:
            async with httpx.AsyncClient(timeout=5) as h:
                return (await h.get(url, headers={"Host": HOST})).status_code == 200

        await wait_for(serves, 15, f"{a.name}'s router to serve shop")
    return agents, leader


async def start_redeploy(front: AgentProc) -> str:
    """A one-by-one redeploy (an env change), through `front`; waits until its
    first new job is placed. The new release's id."""
    async with front.client() as c:
        c.timeout = 15.0
        r = await c.patch("/v1/apps/shop/env", json={"set": {"BOOT_S": BOOT_S}})
        assert r.status_code == 200, r.text
        release = str(r.json()["release"]["id"])

        async def placed() -> bool:
            return any(j["release_id"] == release for j in (await jobs(c, "shop"))["jobs"])

        await wait_for(placed, 15, "a job of the new release to be placed", interval=0.05)
    [dep] = [d for d in await deployments_of(front) if d["new_release_id"] == release]
    assert (dep["status"], dep["strategy"]) == ("running", "one-by-one"), dep
    return release


async def converged_outcome(agents: list[AgentProc], release_id: str) -> dict[str, Any]:
    """Every agent has one final record of the deployment, the same status, the
    same formation; that many live web jobs of the formation's release, no other
    (duplicates, or old ones, left running). The deployment."""

    async def same() -> dict[str, Any] | None:
        seen = []
        for a in agents:
            async with a.client() as c:
                deps = [d for d in await deployments_of(a) if d["new_release_id"] == release_id]
                formation = (await c.get("/v1/apps/shop/formation")).json()["formation"]
                live = [j for j in (await jobs(c, "shop"))["jobs"]
                        if j["process_type"] == "web" and j["state"] not in ("down", "crashed")]  # fmt: skip
            if len(deps) != 1 or deps[0]["status"] == "running":
                return None
            seen.append((deps[0]["status"], formation["release_id"], formation["processes"],
                         sorted((j["id"], j["release_id"], j["state"]) for j in live)))  # fmt: skip
        status, release, processes, live_jobs = seen[0]
        if any(s != seen[0] for s in seen):
            return None
        if len(live_jobs) != processes.get("web", 0) or {(r, s) for _, r, s in live_jobs} != {
            (release, "up")
        }:
            return None
        return {"status": status, "release_id": release, "jobs": live_jobs}

    return await wait_for(
        same, 60, "every node to agree on the deploy's outcome and jobs", interval=0.5
    )


async def cli(agent: AgentProc, *argv: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "FLYNNP2P_URL": agent.url, "FLYNNP2P_TOKEN": agent.token.encode()}
    return await trio.run_process(
        [sys.executable, "-m", "flynnp2p", *argv], env=env, capture_stdout=True,
        capture_stderr=True, check=False,
    )  # fmt: skip


async def redeploy_soon(
    front: AgentProc, leader: AgentProc, seen: dict[str, Any]
) -> list[dict[str, Any]]:
    """0.5 s into the load, start the redeploy through `front`; note its release and
    the leader's live jobs in `seen`; the app's jobs as they were then."""
    await trio.sleep(0.5)
    seen["release"] = await start_redeploy(front)
    async with front.client() as c:
        before: list[dict[str, Any]] = (await jobs(c, "shop"))["jobs"]
    seen["on_leader"] = [
        j["id"] for j in before if j["host"] == leader.name and j["state"] != "down"
    ]
    return before


async def test_leader_sigkill_mid_deploy_is_picked_up_by_the_next_leader(
    cluster: Cluster, tmp_path: Path
) -> None:
    agents, leader = await setup(cluster, tmp_path)
    survivors = [a for a in agents if a is not leader]
    front = survivors[0]
    url = f"http://{front.addr}:8080/"
    seen: dict[str, Any] = {}

    async def kill_mid_deploy(load: Load) -> None:
        await redeploy_soon(front, leader, seen)
        release = seen["release"]
        leader.kill()  # the agent, its serf and etcd, then the jobs it hosts
        seen["killed_at"] = trio.current_time()  # every job of the leader is dead by now
        dep = await finished(front, release)
        seen["dep"] = dep
        seen["took"] = trio.current_time() - seen["killed_at"]
        if dep["status"] == "complete":
            async with front.client() as c:
                await wait_up(
                    c,
                    "shop",
                    2,
                    timeout=30,
                    check=lambda js: {j["release_id"] for j in js} == {release},
                )
        await trio.sleep(1.0)

    load = await under_load(url, kill_mid_deploy)
    killed_at, dep = seen["killed_at"], seen["dep"]
    t0 = killed_at
    print(f"\nleader {leader.name} SIGKILLed mid-deploy (its jobs then: {seen['on_leader']}); "
          f"deployment {dep['status']} {seen['took']:.1f}s later ({dep.get('reason')}); "
          f"through {front.name}'s router: {load.summary(t0)}")  # fmt: skip
    # Requests through a surviving router: the only failures are POSTs that were
    # in flight at a job on the killed node when it died (the router answers 502
    # naming that backend; it cannot retry a request it already sent, while a GET
    # whose connection resets is retried on another backend, and a connect
    # refused is retried for either). None began after the kill, none ended
    # later than LOST_S after it, and each client had at most one in flight.
    assert len(load.requests) > 200
    if not seen["on_leader"]:
        assert not load.failures, load.summary(t0)
    for r in load.failures:
        assert r.kind == "POST" and r.failure is not None, load.summary(t0)
        assert r.failure.startswith("502") and f"{leader.addr}:" in r.failure, load.summary(t0)
        # (the router's pool sweeps for connections closed by their backends every
        # POOL_SWEEP_S: one sent on such a connection before the sweep fails too)
        assert r.start <= killed_at + POOL_SWEEP_S, load.summary(t0)
        assert r.end <= killed_at + LOST_S, load.summary(t0)
    assert len(load.failures) <= CLIENTS, load.summary(t0)
    # One final status, the same everywhere, and the jobs it left.
    assert dep["status"] in ("complete", "rolled-back"), dep
    outcome = await converged_outcome(survivors, seen["release"])
    assert outcome["status"] == dep["status"], (outcome, dep)
    if dep["status"] == "complete":
        assert outcome["release_id"] == seen["release"], outcome
    shown = await cli(front, "deployment", "-a", "shop")
    assert shown.returncode == 0, shown.stderr
    assert "running" not in shown.stdout.decode(), shown.stdout.decode()
    assert not [d for d in await deployments_of(front) if d["status"] == "running"]


@pytest.mark.skipif(os.geteuid() != 0, reason="partitions need root (iptables)")
async def test_leader_cut_off_mid_deploy_then_healed_has_one_outcome(
    cluster: Cluster, tmp_path: Path
) -> None:
    agents, leader = await setup(cluster, tmp_path, own_gids=True)
    others = [a for a in agents if a is not leader]
    front = others[0]
    seen: dict[str, Any] = {}

    async def cut_off_mid_deploy(load: Load) -> None:
        before = await redeploy_soon(front, leader, seen)
        release = seen["release"]
        addresses = {j["address"] for j in before if j["host"] == leader.name and j.get("address")}

        dropped = trio.Event()

        async def watch_dropped() -> None:
            """When the front's router stops listing the cut-off node's jobs."""
            async with front.client() as c:
                while True:
                    r = await c.get("/v1/router/status")
                    if r.status_code == 200:
                        listed = {a for bs in r.json()["backends"].values() for a in bs}
                        if not listed & addresses:
                            seen["dropped_at"] = trio.current_time()
                            dropped.set()
                            return
                    await trio.sleep(0.05)

        with Partition([leader], others):
            seen["cut_at"] = trio.current_time()
            # The majority elects a new leader, which picks the deployment up; the
            # old one stops acting once it cannot renew its lease.
            seen["new"] = await wait_for(
                lambda: _leader_among(others, leader.name), 30, "a new leader on the majority side"
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_dropped)
                seen["during"] = await finished(front, release)
                with trio.move_on_after(10):
                    await dropped.wait()
                nursery.cancel_scope.cancel()
            await trio.sleep(2.0)  # the old leader, alone, has had time to do whatever it would
        seen["healed_at"] = trio.current_time()
        await trio.sleep(1.0)

    load = await under_load(f"http://{front.addr}:8080/", cut_off_mid_deploy)
    release, during = seen["release"], seen["during"]
    cut_at = t0 = seen["cut_at"]
    # the front's router learns the cut-off node's jobs are gone when the new leader
    # stops them (the router's `lost`): a request sent to them before that may fail
    dropped_at = seen.get("dropped_at", cut_at + LOST_S)
    late = [r for r in load.failures if r.start > max(cut_at + LOST_S, dropped_at)]
    hung = [r for r in load.failures if r.failure is not None and "Timeout" in r.failure]
    print(f"\nleader {leader.name} cut off mid-deploy (its jobs then: {seen['on_leader']}); new "
          f"leader {seen['new']}; the majority finished the deploy: {during['status']} "
          f"{seen['healed_at'] - cut_at - 2:.1f}s after the cut; through {front.name}'s router: "
          f"{load.summary(t0)}; the router dropped its jobs {dropped_at - cut_at:.1f}s after the cut; "
          f"failures that began after that (and {LOST_S}s after the cut): {len(late)}; "
          f"hung until the client's timeout: {len(hung)}")  # fmt: skip
    # Requests through a majority router: those that failed were in flight at (or
    # sent to) the cut-off node's jobs before its heartbeats were missed.
    assert len(load.requests) > 200
    if not seen["on_leader"]:
        assert not load.failures, load.summary(t0)
    assert not late, load.summary(t0)
    await cluster.wait_converged(agents, alive=3, timeout=60)
    outcome = await converged_outcome(agents, release)
    print(f"healed: {outcome}")
    assert outcome["status"] == during["status"], (outcome, during)
    assert outcome["status"] in ("complete", "rolled-back"), outcome
    if outcome["status"] == "complete":
        assert outcome["release_id"] == release, outcome


async def _leader_among(agents: list[AgentProc], not_named: str) -> str | None:
    for a in agents:
        s = await a.status()
        if s is None or not s["leader"]["name"] or s["leader"]["name"] == not_named:
            return None
    s = await agents[0].status()
    return None if s is None else str(s["leader"]["name"])
