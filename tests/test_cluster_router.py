"""The router on every node, with real agents and real jobs: any node routes an
app's domain to its jobs wherever they run, spreads over them, answers 404 for
an unknown host and 503 with no backend (a router line with code H10 in the app's
log of every node), follows scaling within a second, and
loses no request when a backend's node is SIGKILLed or cut off by a partition, and
serves again after its own node restarts."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from flynnp2p.coord.ca import ClusterCA
from tests.harness import AgentProc, Cluster, wait_for
from tests.jobs_app import deploy, make_slug, scale, wait_up

pytestmark = pytest.mark.slow

HOST = "shop.flynnp2p.localhost"


async def via(agent: AgentProc, host: str = HOST, timeout: float = 5.0) -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=timeout) as c:
        r = await c.get(f"http://{agent.addr}:8080/", headers={"Host": host})
        return r.status_code, r.text


async def test_any_node_routes_to_jobs_anywhere(cluster: Cluster, tmp_path: Path) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with agents[0].client() as c:
        await deploy(c, "shop", slug, digest)
        await scale(c, "shop", web=2)
        up = await wait_up(c, "shop", 2, timeout=60)
    job_ids = {j["id"] for j in up}

    async def codes() -> list[int]:
        return [(await via(a))[0] for a in agents]

    async def routed_everywhere() -> bool:
        return await codes() == [200] * len(agents)

    await wait_for(routed_everywhere, 10, "every node's router to serve shop")
    for a in agents:
        seen = set()
        for _ in range(30):
            code, body = await via(a)
            assert code == 200, body
            seen.add(body.split()[0])
        assert seen == job_ids, (a.name, seen, job_ids)  # both backends, from every node

    code, body = await via(agents[1], host="nope.flynnp2p.localhost")
    assert code == 404 and "nope.flynnp2p.localhost" in body

    # HTTPS on every node with the cluster CA's *.<domain> certificate (pinned from the
    # token), and the API itself through the router at api.<domain>.
    ca = ClusterCA(cluster.token.cluster_id, cluster.token.admin_secret)
    verify = ssl.create_default_context(cadata=ca.cert_pem.decode())
    headers = {"Authorization": f"Bearer {cluster.token.api_key}"}
    async with httpx.AsyncClient(verify=verify, timeout=10) as c:
        for a in agents:
            r = await c.get(
                f"https://{a.addr}:8443/", headers={"Host": HOST}, extensions={"sni_hostname": HOST}
            )
            assert r.status_code == 200 and r.text.split()[0] in job_ids
            api = "api.flynnp2p.localhost"
            r = await c.get(
                f"https://{a.addr}:8443/v1/status", headers={"Host": api, **headers},
                extensions={"sni_hostname": api},
            )  # fmt: skip
            assert r.status_code == 200 and r.json()["node"]["name"] == a.name
    # The CLI over the router's HTTPS at a node's own address: the CA pinned from the full
    # token, or fetched and checked against its fingerprint when given only the API key.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cli")}
    env.pop("FLYNNP2P_URL", None)
    env.pop("FLYNNP2P_TOKEN", None)
    url = f"https://{agents[2].addr}:8443"

    async def flynnp2p(*argv: str) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-m", "flynnp2p", *argv]
        return await trio.run_process(cmd, env=env, capture_stdout=True, capture_stderr=True, check=False)

    done = await flynnp2p("cluster", "add", "full", "--url", url, "--token", cluster.token.encode())
    assert done.returncode == 0, done.stderr
    done = await flynnp2p("-c", "full", "apps")
    assert done.returncode == 0 and "shop" in done.stdout.decode(), done.stderr
    done = await flynnp2p("cluster", "add", "keyonly", "--url", url, "--token", cluster.token.api_key)
    assert done.returncode != 0 and b"--ca-fingerprint" in done.stderr
    done = await flynnp2p(
        "cluster", "add", "keyonly", "--url", url, "--token", cluster.token.api_key,
        "--ca-fingerprint", "sha256:" + "0" * 64,
    )  # fmt: skip
    assert done.returncode != 0 and b"not trusted" in done.stderr
    done = await flynnp2p(
        "cluster", "add", "keyonly", "--url", url, "--token", cluster.token.api_key,
        "--ca-fingerprint", ca.fingerprint,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    async with agents[0].client() as c:
        await scale(c, "shop", web=0)

    async def unavailable_everywhere() -> bool:
        return await codes() == [503] * len(agents)

    await wait_for(unavailable_everywhere, 20, "503 from every node with web=0")
    # Each node's router put its 503s in the app's log, and any node's API merges them.
    h10: list[dict[str, str]] = []

    async def h10_from_every_node() -> bool:
        async with agents[1].client() as c:
            r = await c.get("/v1/apps/shop/log", params={"n": "1000"})
        assert r.status_code == 200
        lines = [ln for ln in map(json.loads, r.text.splitlines()) if ln.get("job_id") == "router"]
        h10[:] = [ln for ln in lines if "code=H10 " in ln["text"]]
        return {ln["node"] for ln in h10} == {a.name for a in agents}

    await wait_for(h10_from_every_node, 10, "a router line with code H10 from every node")
    assert all(ln["type"] == "router" and "status=503" in ln["text"] for ln in h10)
    async with agents[0].client() as c:
        await scale(c, "shop", web=1)
        await wait_up(c, "shop", 1, timeout=60)
    seen_up = time.monotonic()

    await wait_for(routed_everywhere, 5, "every node to serve again", interval=0.05)
    assert time.monotonic() - seen_up < 1.5  # the job's "up" reaches every router within ~1 s


async def test_no_request_fails_when_a_backends_node_is_killed(cluster: Cluster, tmp_path: Path) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with agents[0].client() as c:
        await deploy(c, "shop", slug, digest)
        await scale(c, "shop", web=3)
        up = await wait_up(c, "shop", 3, timeout=60)
    front = agents[0]
    victim = next(a for a in agents if a is not front and any(j["host"] == a.name for j in up))
    await wait_for(lambda: _ok(front), 10, "the router to serve shop")
    results: list[int] = []

    async def loop(deadline: float) -> None:
        async with httpx.AsyncClient(timeout=10) as c:
            while trio.current_time() < deadline:
                r = await c.get(f"http://{front.addr}:8080/", headers={"Host": HOST})
                results.append(r.status_code)
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop, trio.current_time() + 8)
        await trio.sleep(1.5)
        victim.kill()  # agent, serf, etcd and its jobs
    failed = [code for code in results if code != 200]
    assert len(results) > 100 and not failed, (len(results), failed[:10])


async def _ok(agent: AgentProc) -> bool:
    return (await via(agent))[0] == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="cutting links with iptables needs root")
async def test_a_backend_behind_a_partition_is_skipped_and_a_restarted_router_serves_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    from tests.partition import Partition

    agents = await cluster.start(3, own_gids=True)
    await cluster.wait_converged(agents, alive=3)
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with agents[0].client() as c:
        await deploy(c, "shop", slug, digest)
        await scale(c, "shop", web=3)
        await wait_up(c, "shop", 3, timeout=60)
    front, cut = agents[0], agents[2]
    await wait_for(lambda: _ok(front), 10, "the router to serve shop")
    with Partition([front], [cut]):  # the front's router cannot reach cut's job any more
        codes = [(await via(front, timeout=20))[0] for _ in range(20)]
        assert codes == [200] * 20, codes  # a connect timeout is retried on another backend
    front.kill()
    front.start(token=False)
    await front.wait_ready(30)
    await wait_for(lambda: _ok(front), 10, "the restarted node's router to serve shop")
