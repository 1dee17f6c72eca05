"""Jobs on real agents: placements, process jobs, health checks, logs, one-offs, healing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import AgentProc, Cluster, gone_or_zombie, wait_for
from tests.jobs_app import answers, deploy, jobs, live, log_lines, make_slug, scale, wait_up

pytestmark = pytest.mark.slow


async def cli(agent: AgentProc, *argv: str) -> subprocess.CompletedProcess[bytes]:
    """The real CLI in its own process, against `agent`."""
    env = {**os.environ, "FLYNNP2P_URL": agent.url, "FLYNNP2P_TOKEN": agent.token.encode()}
    return await trio.run_process(
        [sys.executable, "-m", "flynnp2p", *argv], env=env, capture_stdout=True,
        capture_stderr=True, check=False,
    )  # fmt: skip


async def follow_log(c: httpx.AsyncClient, app: str, into: list[dict[str, object]]) -> None:
    async with c.stream("GET", f"/v1/apps/{app}/log", params={"follow": "1", "n": "1000"},
                        timeout=httpx.Timeout(5, read=60)) as r:  # fmt: skip
        assert r.status_code == 200
        async for raw in r.aiter_lines():
            if raw.strip():
                into.append(json.loads(raw))


async def test_scale_spread_logs_and_one_offs(cluster: Cluster, tmp_path: Path) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, 3)
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with agents[1].client() as c:
        released = await deploy(c, "shop", slug, digest)
        assert released["formation"]["processes"] == {"web": 1}
        assert sorted(released["release"]["processes"]) == ["crash", "web", "worker"]
        await wait_up(c, "shop", 1)

        # web=3 on 3 nodes: one per node, each answering on its host port; a
        # follower of the log sees the new jobs' lines from every node
        followed: list[dict[str, object]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_log, c, "shop", followed)
            await wait_for(lambda: followed, 10, "the follower's history (web=1's lines)")
            await scale(c, "shop", web=3)
            up = await wait_up(c, "shop", 3)

            async def from_every_node() -> bool:
                lines = [ln for ln in followed if str(ln.get("text", "")).startswith("listening")]
                return {ln["node"] for ln in lines} == {a.name for a in agents}

            await wait_for(from_every_node, 10, "followed lines from every node")
            nursery.cancel_scope.cancel()
        assert sorted(j["host"] for j in up) == sorted(a.name for a in agents)
        for j in up:
            assert (await answers(j["address"])).split()[0] == j["id"]
            assert j["address"].startswith(next(a.addr for a in agents if a.name == j["host"]))

        # scale to 5, then to 1: the oldest job is the one left
        await scale(c, "shop", web=5)
        five = await wait_up(c, "shop", 5)
        oldest = min(five, key=lambda j: (j["created_at"], j["id"]))
        await scale(c, "shop", web=1)
        (left,) = await wait_up(c, "shop", 1)
        assert left["id"] == oldest["id"]
        stopped = [j for j in (await jobs(c, "shop", all=True))["jobs"] if j["state"] == "down"]
        assert len(stopped) == 4 and all("scaled down" in (j["reason"] or "") for j in stopped)

        # logs merged across nodes, in time order, surviving the jobs' exit
        lines = await log_lines(c, "shop", n="1000")
        listening = {ln["job_id"] for ln in lines if ln["text"].startswith("listening ")}
        missing = {j["id"]: j["host"] for j in five if j["id"] not in listening}
        assert not missing, (missing, len(lines), {ln["node"] for ln in lines})
        assert {ln["node"] for ln in lines} == {a.name for a in agents}
        assert [ln["ts_ms"] for ln in lines] == sorted(ln["ts_ms"] for ln in lines)
        assert any(ln["stream"] == "stderr" and ln["text"].startswith("stderr of") for ln in lines)
        assert all(ln["type"] == "web" for ln in lines)
        only = await log_lines(c, "shop", n="1000", job=left["id"])
        assert {ln["job_id"] for ln in only} == {left["id"]}

        # kill: the job stops and the scheduler replaces it
        r = await c.delete(f"/v1/apps/shop/jobs/{left['id']}")
        assert r.status_code == 200, r.text
        (replacement,) = await wait_up(c, "shop", 1, check=lambda js: js[0]["id"] != left["id"])
        killed = [j for j in (await jobs(c, "shop", all=True))["jobs"] if j["id"] == left["id"]]
        assert killed[0]["state"] == "down" and killed[0]["reason"] == "killed by a user"
        left = replacement

        # one-offs: output streamed back, exit code propagated
        r = await c.post("/v1/apps/shop/jobs", json={"args": ["python3", "-c", "print(42)"]})
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        out = await log_lines(c, "shop", job=job_id, until_exit="1")
        assert [ln["text"] for ln in out if "text" in ln] == ["42"]
        assert out[-1] == {"event": "exit", "job_id": job_id, "state": "down", "exit_code": 0,
                           "reason": "exited with status 0"}  # fmt: skip
        r = await c.post("/v1/apps/shop/jobs", json={"args": ["echo oops >&2; exit 7"]})
        job_id = r.json()["job_id"]
        out = await log_lines(c, "shop", job=job_id, until_exit="1")
        assert [(ln["stream"], ln["text"]) for ln in out if "text" in ln] == [("stderr", "oops")]
        assert out[-1]["state"] == "crashed" and out[-1]["exit_code"] == 7
        # the same through the CLI, as a user runs it
        done = await cli(agents[2], "run", "-a", "shop", "--", "python3", "-c", "print(6 * 7)")
        assert (done.returncode, done.stdout, done.stderr) == (0, b"42\n", b"")
        done = await cli(agents[2], "run", "-a", "shop", "--", "echo bye; exit 7")
        assert (done.returncode, done.stdout) == (7, b"bye\n")
        done = await cli(agents[0], "scale", "-a", "shop", "web=2")
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().splitlines()[-1].startswith("scale completed in ")
        done = await cli(agents[0], "ps", "-a", "shop")
        assert done.stdout.decode().count(" up ") == 2
        # a crashing type is restarted in place (0 s, then 10 s backoff); scaled to
        # 0 while it waits for its restart, it is down, not stuck
        await scale(c, "shop", web=2, crash=1)

        async def crashed_twice() -> dict[str, object] | None:
            crash = [j for j in (await jobs(c, "shop"))["jobs"] if j["process_type"] == "crash"]
            ok = len(crash) == 1 and crash[0]["state"] == "crashed" and crash[0]["restarts"] >= 1
            return crash[0] if ok else None

        crashed = await wait_for(crashed_twice, 15, "the crash type to crash twice")
        assert crashed["exit_code"] == 3 and crashed["reason"] == "exited with status 3"
        await scale(c, "shop", web=2, crash=0)

        async def crash_down() -> bool:
            everything = (await jobs(c, "shop", all=True))["jobs"]
            return [j["state"] for j in everything if j["id"] == crashed["id"]] == ["down"]

        await wait_for(crash_down, 10, "the stopped crashed job to be down")
        # a finished one-off is not restarted
        await trio.sleep(1.0)
        one_offs = [j for j in (await jobs(c, "shop", all=True))["jobs"] if j["one_off"]]
        assert sorted(j["state"] for j in one_offs) == ["crashed", "crashed", "down", "down"]
        assert all(j["restarts"] == 0 for j in one_offs)


async def test_sigkill_of_a_node_replaces_its_jobs(cluster: Cluster, tmp_path: Path) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, 3)
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with agents[0].client() as c:
        await deploy(c, "shop", slug, digest)
        await scale(c, "shop", web=3)
        up = await wait_up(c, "shop", 3)
    victim = next(a for a in agents if a.name == up[0]["host"])
    survivors = [a for a in agents if a is not victim]
    victim.kill()
    t0 = trio.current_time()
    async with survivors[0].client() as c:
        replaced = await wait_up(
            c, "shop", 3, timeout=30, check=lambda js: all(j["host"] != victim.name for j in js)
        )
        for j in replaced:
            await answers(j["address"])
    took = trio.current_time() - t0
    assert took < 15, f"replacements answered after {took:.1f}s"
    assert {j["host"] for j in replaced} == {a.name for a in survivors}


async def test_leader_killed_mid_scale_new_leader_finishes(cluster: Cluster, tmp_path: Path) -> None:
    agents = await cluster.start(3)
    statuses = await cluster.wait_converged(agents, 3)
    leader_name = next(iter(statuses.values()))["leader"]["name"]
    leader = next(a for a in agents if a.name == leader_name)
    others = [a for a in agents if a is not leader]
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with others[0].client() as c:
        await deploy(c, "shop", slug, digest)
        await wait_up(c, "shop", 1)
        await scale(c, "shop", web=8)
        leader.kill()  # at once: the scale is half done at most
        up = await wait_up(c, "shop", 8, timeout=45)
        assert {j["host"] for j in up} == {a.name for a in others}
        await trio.sleep(2.0)  # no surplus appears later either
        assert len(live(await jobs(c, "shop"))) == 8


async def test_omni_types_and_tag_constraints(cluster: Cluster, tmp_path: Path) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, 3)
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with agents[0].client() as c:
        first = (await deploy(c, "shop", slug, digest))["release"]
        r = await c.post("/v1/apps/shop/releases", json={
            "artifacts": first["artifacts"],
            "processes": {
                "web": {"command": "python3 server.py", "ports": [0], "memory_mb": 64},
                "agent": {"command": "python3 -u -c 'import time; print(1); time.sleep(10**6)'",
                          "omni": True, "memory_mb": 32},
            },
        })  # fmt: skip
        assert r.status_code == 201, r.text
        release = r.json()["release"]["id"]
        r = await c.put("/v1/apps/shop/formation", json={
            "release_id": release, "processes": {"agent": 1, "web": 1},
            "constraints": {"web": {"disk": "ssd"}},
        })  # fmt: skip
        assert r.status_code == 200, r.text

        # omni: one per node
        omni = await wait_up(c, "shop", 3, ptype="agent")
        assert sorted(j["host"] for j in omni) == sorted(a.name for a in agents)
        # unsatisfiable tag: blocked, with the reason
        async def blocked() -> list[dict[str, object]] | None:
            return (await jobs(c, "shop"))["blocked"] or None

        (b,) = await wait_for(blocked, 10, "web to be reported blocked")
        assert b["process_type"] == "web" and b["count"] == 1
        assert b["reasons"][0] == "no host with tag disk=ssd"
        r = await c.get(f"/v1/apps/shop/jobs/{b['app_id']}")  # not a job id: 404, not 500
        assert r.status_code == 404

        # tag a host (through another node): the job goes there
        r = await c.put(f"/v1/hosts/{agents[2].name}/tags", json={"tags": {"disk": "ssd"}})
        assert r.status_code == 200, r.text
        assert r.json()["tags"] == {"disk": "ssd"}
        (web,) = await wait_up(c, "shop", 1)
        assert web["host"] == agents[2].name
        assert (await jobs(c, "shop"))["blocked"] == []
        hosts = (await c.get("/v1/hosts")).json()["hosts"]
        assert next(h for h in hosts if h["name"] == agents[2].name)["tags"] == {"disk": "ssd"}
        r = await c.put(f"/v1/hosts/{agents[2].name}/tags", json={"tags": {"Disk": "x"}})
        assert r.status_code == 400 and "lowercase" in r.json()["error"]["message"]

        # a node joining gets the omni job; a follower of the log hears from it
        followed: list[dict[str, object]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_log, c, "shop", followed)
            (extra,) = await cluster.start(1)
            omni = await wait_up(c, "shop", 4, ptype="agent", timeout=30)
            assert extra.name in {j["host"] for j in omni}

            async def heard_from_new_node() -> bool:
                return any(ln.get("node") == extra.name for ln in followed)

            await wait_for(heard_from_new_node, 10, "a followed line from the new node")
            nursery.cancel_scope.cancel()


async def test_agent_restart_brings_its_jobs_back_without_orphans(
    cluster: Cluster, tmp_path: Path
) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, 3)
    slug, digest = make_slug(tmp_path / "app.tgz")
    node = agents[2]
    async with agents[0].client() as c:
        await deploy(c, "shop", slug, digest)
        await scale(c, "shop", web=3)
        up = await wait_up(c, "shop", 3)
        (mine,) = [j for j in up if j["host"] == node.name]
        before = node.job_groups()
        assert set(before) == {mine["id"]}

        node.kill(jobs=False)  # the agent and its serf die; its job dies with it

        async def job_died() -> bool:
            return all(gone_or_zombie(pgid) for pgid in before.values())

        await wait_for(job_died, 5, "the job to die with its agent")
        node.start()
        await node.wait_ready()
        again = await wait_up(
            c, "shop", 3, timeout=30,
            check=lambda js: any(j["host"] == node.name and j["updated_at"] > mine["updated_at"]
                                 for j in js),
        )  # fmt: skip
        after = node.job_groups()
        assert len(after) == 1 and set(before.values()).isdisjoint(after.values())
        for j in again:
            await answers(j["address"])



async def test_a_relative_data_dir_runs_web_jobs(cluster: Cluster, tmp_path: Path) -> None:
    """`join --data-dir rel/n1` from another directory: the node resolves the path
    once, at start, so its jobs (whose processes run elsewhere) find their files."""
    agent = cluster.add()
    agent.data_dir = tmp_path / "rel" / agent.name
    agent.cwd = tmp_path
    agent.start()
    await agent.wait_ready()
    await cluster.wait_coord()
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with agent.client() as c:
        await deploy(c, "shop", slug, digest)
        (web,) = await wait_up(c, "shop", 1)
        assert (await answers(web["address"])).split()[0] == web["id"]
    stored = json.loads((agent.data_dir / "node.json").read_text())
    assert stored["data_dir"] == str(agent.data_dir)  # what a restart from elsewhere reads
