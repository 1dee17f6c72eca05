"""A push's node SIGKILLed once it has made the release (real agents, serf, etcd, git).

The release's first job is placed on the node that built its slug (`scheduler.rank`),
so that node dying right after the release takes the deploy's only new job with it.
The deploy must still finish: the job is replaced on a live node, which fetches
the slug from its other holder, and the new release serves through the routers of
the nodes left. The push itself fails (its node is gone); a push of the same commit
to a live node is refused while the dead node's push lock lasts, saying that node
is not answering, then goes through.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from tests.harness import Cluster, wait_for
from tests.test_cluster_git import main_on, served, url_of
from tests.test_git_http import Git

pytestmark = pytest.mark.slow


async def test_the_building_node_killed_once_it_released_the_deploy_finishes_elsewhere(
    cluster: Cluster, tmp_path: Path
) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    n1, n2, n3 = agents
    async with n1.client() as c:
        r = await c.post("/v1/apps", json={"name": "hello"}, timeout=15)
        assert r.status_code == 201, r.text
    git = Git(tmp_path / "client")
    tree = await git.work_tree("a", url_of(n1))
    await git.commit(tree, "Procfile", "web: exec python3 -m http.server $PORT\n")
    await git.commit(tree, "app.py", "v1")
    await git.run("push", "origin", "HEAD:main", cwd=tree)
    assert await served(n3, "/app.py") == (200, "v1")

    # v2 pushed to n2; n2 is SIGKILLed (its jobs too) the moment it says the release is made.
    await git.commit(tree, "app.py", "v2")
    await git.run("remote", "add", "n2", url_of(n2), cwd=tree)
    proc = await trio.lowlevel.open_process(
        ["git", "push", "n2", "HEAD:main"], cwd=tree, env=git.env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    said = b""
    killed = False
    with trio.fail_after(120):
        async for chunk in proc.stderr:
            said += chunk
            if not killed and b"-----> Released v2" in said:
                n2.kill()
                killed = True
        await proc.wait()
    assert killed, said.decode(errors="replace")
    assert proc.returncode != 0  # its node died before the push was recorded

    # The deploy goes on without n2: v2 answers through the routers of n1 and n3.
    async def v2_everywhere() -> bool:
        return all([await served(x, "/app.py") == (200, "v2") for x in (n1, n3)])

    await wait_for(v2_everywhere, 90, "v2 to serve through n1's and n3's routers")
    async with n1.client() as c:
        deps = (await c.get("/v1/apps/hello/deployments", timeout=15)).json()["deployments"]
        jobs = (await c.get("/v1/apps/hello/jobs", timeout=15)).json()["jobs"]
    newest = max(deps, key=lambda d: d["created_at"])
    assert newest["status"] in ("running", "complete"), newest  # not rolled back
    assert [j["host"] for j in jobs if j["process_type"] == "web" and j["state"] == "up"] != ["n2"]

    # The push was not recorded, so the same commit pushed to a live node goes through,
    # once the dead node's push lock has run out (until then: refused, saying why).
    await git.run("remote", "add", "n3", url_of(n3), cwd=tree)
    refusals: list[str] = []

    async def pushed_again() -> bool:
        again = await git.run("push", "n3", "HEAD:main", cwd=tree, ok=False)
        if again.returncode != 0:
            refusals.append(again.stderr.decode(errors="replace"))
        return again.returncode == 0

    await wait_for(pushed_again, 60, "a push to n3 once n2's push lock ran out", interval=2)
    for refused in refusals:
        assert "holds its lock on node n2, which is not answering" in refused, refused
    assert await main_on(git, n1) == await main_on(git, n3)
    assert await served(n1, "/app.py") == (200, "v2")
