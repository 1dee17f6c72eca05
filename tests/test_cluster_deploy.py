"""Deploys with real agents, real jobs and steady load through a third node's router.

One 3-node cluster, one app at web=2 ("auto": one-by-one), deployed through node
A's API while 20 keep-alive clients load node C's router (a GET and a POST
that works 0.2 s, in turn, as in tests/test_cluster_drain.py: a POST in flight
is what a stop without draining loses):

(b) a redeploy (an env change: a new release) under load loses no request, with
    at least 1,000 sent while it runs;
(a) a release whose web process exits at once is rolled back automatically, the
    app serving throughout; ``flynnp2p deployment`` shows it rolled back, and why;
(c) ``flynnp2p rollback -y`` goes back to the release before the current one
    and waits for that deploy.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from flynnp2p import deployments
from tests.harness import AgentProc, Cluster, wait_for
from tests.jobs_app import deploy, scale, wait_up
from tests.test_cluster_drain import CLIENTS, HOST, Load, _client
from tests.test_cluster_drain import SERVER as DRAIN_SERVER

pytestmark = pytest.mark.slow

# The drain test's server, booting BOOT_S seconds before it listens (as real apps
# take a while): so a deploy lasts long enough to measure the load it runs under.
SERVER = b"import os, time\ntime.sleep(float(os.environ.get('BOOT_S', '0')))\n" + DRAIN_SERVER
PROCFILE = b"web: python3 server.py\n"
CRASHER = b"web: echo 'starting and giving up'; exit 3\n"


def make_slug(path: Path, procfile: bytes = PROCFILE) -> tuple[Path, str]:
    """A slug (Heroku's layout): the Procfile and `SERVER`; (path, digest)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("./app/Procfile", procfile), ("./app/server.py", SERVER)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path, "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()


async def cli(agent: AgentProc, *argv: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "FLYNNP2P_URL": agent.url, "FLYNNP2P_TOKEN": agent.token.encode()}
    return await trio.run_process(
        [sys.executable, "-m", "flynnp2p", *argv], env=env, capture_stdout=True,
        capture_stderr=True, check=False,
    )  # fmt: skip


async def deployment_of(c: httpx.AsyncClient, release_id: str) -> dict[str, Any] | None:
    r = await c.get("/v1/apps/shop/deployments")
    assert r.status_code == 200, r.text
    return next((d for d in r.json()["deployments"] if d["new_release_id"] == release_id), None)


async def finished(c: httpx.AsyncClient, release_id: str, timeout: float = 60) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        dep = await deployment_of(c, release_id)
        return dep if dep is not None and dep["status"] != "running" else None

    return await wait_for(done, timeout, f"the deployment of {release_id} to finish", interval=0.1)


async def under_load(url: str, body: Callable[[Load], Awaitable[None]]) -> Load:
    """Run ``body(load)`` while CLIENTS clients load `url`; the load of that time."""
    load, stop = Load(), trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(CLIENTS):
            nursery.start_soon(_client, url, load, stop)
        await body(load)
        stop.set()
    return load


def no_failures(load: Load, what: str) -> None:
    print(f"\n{what}: sent {load.sent}, answered {load.answered}, failed {len(load.failures)}")
    for failure in sorted(set(load.failures))[:10]:
        print("  failed:", failure.strip())
    assert not load.failures, (what, len(load.failures), load.failures[:10])
    assert load.answered == load.sent


async def test_redeploy_crash_rollback_and_rollback_lose_no_request(
    cluster: Cluster, tmp_path: Path
) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    front, third = agents[0], agents[2]
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with front.client() as c:
        v1 = (await deploy(c, "shop", slug, digest))["release"]
        await scale(c, "shop", web=2)
        await wait_up(c, "shop", 2, timeout=60)
        assert (await finished(c, v1["id"]))["status"] == "complete"
    url = f"http://{third.addr}:8080/"

    async def serves() -> bool:
        async with httpx.AsyncClient(timeout=5) as h:
            return (await h.get(url, headers={"Host": HOST})).status_code == 200

    await wait_for(serves, 10, "node C's router to serve shop")

    # (b) a redeploy, one by one, under load through node C's router
    during: list[int] = []
    releases: list[str] = []

    async def redeploy(load: Load) -> None:
        await trio.sleep(0.5)
        async with front.client() as c:
            sent = load.sent
            r = await c.patch("/v1/apps/shop/env", json={"set": {"BOOT_S": "5"}})
            assert r.status_code == 200, r.text
            releases.append(r.json()["release"]["id"])
            dep = await finished(c, releases[0])
            during.append(load.sent - sent)
            assert (dep["status"], dep["strategy"]) == ("complete", "one-by-one"), dep
        await trio.sleep(0.5)

    load_b = await under_load(url, redeploy)
    no_failures(load_b, f"redeploy one-by-one, web=2 (sent during the deploy: {during})")
    assert during[0] >= 1000, during

    # (a) a release that crashes at once: rolled back, serving throughout
    bad, bad_digest = make_slug(tmp_path / "crash.tgz", CRASHER)
    outcome: list[dict[str, Any]] = []

    async def crash(load: Load) -> None:
        await trio.sleep(0.5)
        async with front.client() as c:
            v3 = (await deploy(c, "shop", bad, bad_digest))["release"]
            dep = await finished(c, v3["id"])
            outcome.append(dep)
            # the formation is back on v2, and both its jobs serve again
            await wait_up(
                c,
                "shop",
                2,
                timeout=30,
                check=lambda js: {j["release_id"] for j in js} == {releases[0]},
            )
        await trio.sleep(0.5)

    load_a = await under_load(url, crash)
    no_failures(load_a, "a release that crashes on start")
    [dep] = outcome
    assert dep["status"] == "rolled-back" and "exited" in dep["reason"], dep
    async with front.client() as c:  # what the push and `rollback` show: the job's last lines
        r = await c.get("/v1/apps/shop/log", params=deployments.log_params(dep), timeout=30)
        assert r.status_code == 200 and "starting and giving up" in deployments.log_tail(r.text), (
            r.text
        )
    shown = await cli(front, "deployment", "-a", "shop")
    out = shown.stdout.decode()
    assert shown.returncode == 0, shown.stderr
    assert "rolled-back" in out and "v2 → v3" in out and "exited" in out, out

    # (c) rollback to the release before the current one (v2 → v1), waited for
    done = await cli(front, "rollback", "-y", "-a", "shop")
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr)
    assert "rolling back shop to v1" in out and "deployed v1" in out, out
    async with front.client() as c:
        formation = (await c.get("/v1/apps/shop/formation")).json()["formation"]
        assert formation["release_id"] == v1["id"]
        await wait_up(
            c, "shop", 2, timeout=30, check=lambda js: {j["release_id"] for j in js} == {v1["id"]}
        )
