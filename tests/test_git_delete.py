"""A deleted app leaves nothing behind for git: its saved repository (record and
etcd keys), its release counter and claims, and the repo on disk (removed by
each node's `RepoSweeper` when its state loses the app); and a new app of the
same name takes an unrelated history as a first push, not a non-fast-forward.

One real node (`tests.test_git_http.start_node`), the real git client; the
sweeper's pure core (`stale_repos`) is tested on its own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import trio

from flynnp2p.build.cache import BuildCaches
from flynnp2p.build.reposweep import RepoSweeper, stale_repos
from flynnp2p.state.records import BuildCache, Repo
from tests.harness import wait_for
from tests.test_api_apps import TOKEN
from tests.test_git_http import Git, create, start_node, text, with_token


def test_stale_repos_are_those_of_apps_the_state_lacks() -> None:
    assert stale_repos(["b", "a", "c"], ["c", "d"]) == ["a", "b"]
    assert stale_repos([], ["a"]) == []
    assert stale_repos(["a"], ["a"]) == []


async def test_scratch_repos_a_killed_agent_left_are_removed_at_start(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    node = await start_node(nursery, tmp_path / "node")
    await create(node, "kept")
    repos = node.git.repos
    repos.root.mkdir(parents=True, exist_ok=True)
    old = [repos.root / ".staged-0a.git", repos.root / ".gone-0b.git"]
    for path in old:
        (path / "objects").mkdir(parents=True)
        os.utime(path, (time.time() - 60, time.time() - 60))
    kept = [repos.root / ".staged-0c.git", repos.path(node.app("kept").id)]  # made after start
    sweeper = RepoSweeper(node.ctx.state, repos)
    for path in kept:
        (path / "objects").mkdir(parents=True)
    await nursery.start(sweeper.run)
    assert [p.exists() for p in old + kept] == [False, False, True, True]
    assert sweeper.stats["scratch_removed"] == 2


async def test_delete_then_create_again_starts_a_fresh_repository(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    node = await start_node(nursery, tmp_path / "node")
    caches = BuildCaches(
        tmp_path / "caches", blobs=None, state=node.ctx.state, node="n1", now_ms=lambda: 1  # type: ignore[arg-type]
    )
    sweeper = RepoSweeper(node.ctx.state, node.git.repos, caches)
    await nursery.start(sweeper.run)
    await create(node, "kept")
    await create(node, "again")
    git = Git(tmp_path / "client")
    url = with_token(node.url, "again")
    tree = await git.work_tree("a", url)
    await git.commit(tree, "f", "old history")
    await git.run("push", "origin", "HEAD:main", cwd=tree)
    old = node.app("again")
    api = httpx.AsyncClient(base_url=node.url, headers={"Authorization": f"Bearer {TOKEN.api_key}"})
    async with api:
        r = await api.patch("/v1/apps/again/env", json={"set": {"GREETING": "hi"}})  # a release: a counter
        assert r.status_code == 200, r.text
        assert node.git.repos.path(old.id).exists()
        assert any(old.id in key for key in node.etcd.kvs), sorted(node.etcd.kvs)

        cache = BuildCache(app_id=old.id, digest="sha256:" + "c" * 64, size=1, node="n1", updated_at=1)
        await node.ctx.state.write([cache])  # as a build that succeeded leaves it
        for app_id in (old.id, node.app("kept").id):  # and this node's copy of it
            (caches.dir(app_id) / "pip").mkdir(parents=True)
            (caches.root / f"{app_id}.json").write_text("{}")
        (caches.root / f"{old.id}.restore-0a1b2c3d").mkdir()  # a restore a kill cut short
        r = await api.delete("/v1/apps/again")
        assert r.status_code == 200, r.text

    def leftovers() -> list[str]:
        return sorted(k for k, kv in node.etcd.kvs.items() if old.id in k or old.id.encode() in kv.value)

    assert leftovers() == []  # the repo counter, the push lease, the release counter, the claims
    assert node.ctx.state.state.record(Repo, old.id) is None
    assert node.ctx.state.state.record(BuildCache, old.id) is None  # its blob is then collected

    async def repo_gone() -> bool:
        return not node.git.repos.path(old.id).exists() and old.id not in caches.app_ids()

    await wait_for(repo_gone, 10, "the deleted app's repo and cache to be removed from disk")
    assert old.id not in node.git.repos.app_ids()
    assert caches.app_ids() == [node.app("kept").id]  # the live app's cache stays
    assert sorted(p.name for p in caches.root.iterdir()) == [
        node.app("kept").id, f"{node.app('kept').id}.json",
    ]  # fmt: skip

    # A new app of the same name: an unrelated history is its first push.
    await create(node, "again")
    fresh = Git(tmp_path / "other")
    other = await fresh.work_tree("b", url)
    sha = await fresh.commit(other, "g", "new history")
    pushed = await fresh.run("push", "origin", "HEAD:main", cwd=other)
    assert "repository saved (generation 1 on 1 nodes, full bundle)" in text(pushed), text(pushed)
    new = node.app("again")
    assert new.id != old.id
    assert await node.git.repos.refs(new.id) == {"refs/heads/main": sha}
    assert node.git.repos.app_ids() == [new.id]  # the sweeper keeps a live app's repo
