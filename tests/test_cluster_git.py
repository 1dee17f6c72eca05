"""git push to any node of a real 3-node cluster (real agents, serf, etcd, git).

A push to node 1 (built, released and served through the routers), a
fast-forward pushed to node 2 (its repository restored from
the bundle node 1 saved), a non-fast-forward to node 3 refused as git refuses
it, then two pushes to one app at once on two nodes: one is accepted, the other
refused with a clear message, and every node serves the accepted commit, built
and deployed; last, a push whose build fails is refused and the app keeps serving.

Then, on a cluster whose slug limit is 1 MiB: a forced push to another node is
accepted, deployed, and what every node restores; a plain non-fast-forward is
still refused; a push whose slug is over the limit is refused with the size and
the limit; and a deleted app leaves no repository on any node, so a new app of
the same name takes an unrelated history as its first push.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import AgentProc, Cluster, wait_for
from tests.test_git_http import Git, text

pytestmark = pytest.mark.slow

BUSY = (
    "another push to hello is in progress",  # the other push held the lease
    "changed on another node",  # it landed between this push's refs and its lease
    "fetch first",  # it landed before this push read the refs
)


def url_of(agent: AgentProc, app: str = "hello") -> str:
    return agent.url.replace("http://", f"http://x:{agent.token.api_key}@") + f"/git/{app}.git"


async def main_on(git: Git, agent: AgentProc, app: str = "hello") -> str:
    done = await git.run("ls-remote", url_of(agent, app), "refs/heads/main")
    return done.stdout.decode().split("\t")[0].strip()


async def test_push_to_any_node(cluster: Cluster, tmp_path: Path) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    n1, n2, n3 = agents
    async with n1.client() as c:
        c.timeout = 15.0
        r = await c.post("/v1/apps", json={"name": "hello"})
        assert r.status_code == 201, r.text
    git = Git(tmp_path / "client")

    # 1. A first push, to node 1: built (a Procfile app), released, running, routed.
    a = await git.work_tree("a", url_of(n1))
    await git.commit(a, "Procfile", "web: exec python3 -m http.server $PORT\n")
    await git.commit(a, "app.py", "v1")
    pushed = await git.run("push", "origin", "HEAD:main", cwd=a)
    out = text(pushed)
    assert "remote: -----> repository saved (generation 1 on 2 nodes, full bundle)" in out
    assert "remote: -----> Building hello (main at" in out and "process types: web" in out, out
    assert "remote: -----> Released v1" in out and "remote: -----> web is up (1 job(s))" in out, out
    assert await served(n3, "/app.py") == (200, "v1")  # through another node's router
    b = await git.work_tree("b", url_of(n1))  # at the first commit

    # 2. A fast-forward to node 2: it restores the repository node 1 saved.
    await git.run("remote", "add", "n2", url_of(n2), cwd=a)
    second = await git.commit(a, "app.py", "v2")
    pushed = await git.run("push", "n2", "HEAD:main", cwd=a)
    assert "remote: -----> repository saved (generation 2 on 2 nodes" in text(pushed)

    # 3. A non-fast-forward to node 3 is refused by git itself: node 3 knows v2.
    await git.run("remote", "add", "n3", url_of(n3), cwd=b)
    await git.commit(b, "app.py", "diverged")
    refused = await git.run("push", "n3", "HEAD:main", cwd=b, ok=False)
    assert refused.returncode != 0 and "[rejected]" in text(refused) and "fetch first" in text(refused)
    assert await main_on(git, n3) == second

    # 4. Two pushes at once, on two nodes, both fast-forwards of v2.
    await git.run("fetch", "--quiet", "n3", cwd=b)
    await git.run("reset", "--quiet", "--hard", "n3/main", cwd=b)
    shas = {"a": await git.commit(a, "app.py", "from a"), "b": await git.commit(b, "app.py", "from b")}
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def push(name: str, tree: Path, remote: str) -> None:
        results[name] = await git.run("push", remote, "HEAD:main", cwd=tree, ok=False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(push, "a", a, "n2")
        nursery.start_soon(push, "b", b, "n3")
    accepted = [n for n, r in results.items() if r.returncode == 0]
    assert len(accepted) == 1, {n: text(r) for n, r in results.items()}
    loser = "b" if accepted == ["a"] else "a"
    assert any(m in text(results[loser]) for m in BUSY), text(results[loser])

    # Every node serves what was acknowledged, and nothing else.
    winner = shas[accepted[0]]

    async def everywhere() -> bool:
        return [await main_on(git, x) for x in agents] == [winner] * 3

    await wait_for(everywhere, 15, f"every node to serve {winner[:7]}")
    clone = await git.work_tree("final", url_of(n1))
    assert (clone / "app.py").read_text() == f"from {accepted[0]}"
    assert await served(n2, "/app.py") == (200, f"from {accepted[0]}")  # it was deployed too

    # 5. A build that fails rejects the push with the builder's message; the app keeps serving.
    await git.commit(clone, "Procfile", "this is not a Procfile\n")
    refused = await git.run("push", "origin", "HEAD:main", cwd=clone, ok=False)
    assert refused.returncode != 0 and "pre-receive hook declined" in text(refused)
    assert "Push rejected: the build failed" in text(refused), text(refused)
    assert await main_on(git, n1) == winner
    assert await served(n1, "/app.py") == (200, f"from {accepted[0]}")


async def test_forced_push_slug_limit_and_a_deleted_app(cluster: Cluster, tmp_path: Path) -> None:
    cluster.env = {"FLYNNP2P_SLUG_MAX_MB": "1"}
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    n1, n2, n3 = agents
    async with n1.client() as c:
        c.timeout = 15.0
        r = await c.post("/v1/apps", json={"name": "redo"})
        assert r.status_code == 201, r.text
        first_id = r.json()["app"]["id"]
    git = Git(tmp_path / "client")
    a = await git.work_tree("a", url_of(n1, "redo"))
    await git.commit(a, "Procfile", "web: exec python3 -m http.server $PORT\n")
    await git.commit(a, "app.py", "v1")
    await git.run("push", "origin", "HEAD:main", cwd=a)
    await git.commit(a, "app.py", "v2")
    await git.run("push", "origin", "HEAD:main", cwd=a)

    # A forced push to node 2 replaces v2 with a rewritten commit, and deploys it.
    await git.run("remote", "add", "n2", url_of(n2, "redo"), cwd=a)
    await git.run("reset", "--quiet", "--hard", "HEAD~1", cwd=a)
    rewritten = await git.commit(a, "app.py", "rewritten")
    refused = await git.run("push", "n2", "HEAD:main", cwd=a, ok=False)
    assert refused.returncode != 0 and "[rejected]" in text(refused)  # not without --force
    forced = await git.run("push", "--force", "n2", "HEAD:main", cwd=a)
    assert "(forced update)" in text(forced) and "remote: -----> Released v3" in text(forced), text(forced)
    assert await main_on(git, n3, "redo") == rewritten  # node 3 restores the forced history
    assert await served(n3, "/app.py", "redo") == (200, "rewritten")

    # A slug over the cluster's 1 MiB limit is refused; the app keeps serving.
    (a / "big.bin").write_bytes(os.urandom(3 << 20))
    await git.run("add", "big.bin", cwd=a)
    await git.commit(a, "app.py", "big")
    refused = await git.run("push", "n2", "HEAD:main", cwd=a, ok=False)
    out = text(refused)
    assert refused.returncode != 0 and "pre-receive hook declined" in out, out
    assert "MiB compressed, over this cluster's limit of 1 MiB" in out and ".slugignore" in out, out
    assert await main_on(git, n1, "redo") == rewritten
    assert await served(n1, "/app.py", "redo") == (200, "rewritten")

    # Deleted: no node keeps its repository; a new "redo" takes an unrelated history.
    async with n2.client() as c:
        c.timeout = 15.0
        r = await c.delete("/v1/apps/redo")
        assert r.status_code == 200, r.text

    async def no_repo_left() -> bool:
        return not any((x.data_dir / "git" / f"{first_id}.git").exists() for x in agents)

    await wait_for(no_repo_left, 15, "every node to remove the deleted app's repository")
    async with n3.client() as c:
        c.timeout = 15.0
        r = await c.post("/v1/apps", json={"name": "redo"})
        assert r.status_code == 201, r.text
    fresh = Git(tmp_path / "fresh")
    b = await fresh.work_tree("b", url_of(n3, "redo"))
    await fresh.commit(b, "Procfile", "web: exec python3 -m http.server $PORT\n")
    sha = await fresh.commit(b, "app.py", "unrelated")
    pushed = await fresh.run("push", "origin", "HEAD:main", cwd=b)
    assert "remote: -----> repository saved (generation 1 on 2 nodes, full bundle)" in text(pushed)
    assert "remote: -----> Released v1" in text(pushed), text(pushed)
    assert await main_on(fresh, n1, "redo") == sha
    assert await served(n1, "/app.py", "redo") == (200, "unrelated")


async def served(agent: AgentProc, path: str, app: str = "hello") -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"http://{agent.addr}:8080{path}", headers={"Host": f"{app}.flynnp2p.localhost"})
        return r.status_code, r.text
