"""When a push is accepted: only once its repository is saved in the cluster
(`flynnp2p.build.push.PushSession`), with the real git client against one real
node (`tests.test_git_http.start_node`: a real API server, blobstore and hook
server on loopback; etcd the in-memory stand-in with leases).

A blobstore that cannot keep the save (an alive peer that refuses every
connection: a blob held by one node only is not acknowledged) and a push lease
lost before the save is recorded both refuse the push, before any ref moves;
a forced push is accepted and saved as the forced history, so a node that
restores the repository agrees with the one that took the push, HEAD included.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from flynnp2p.build.hooks import GitSource, RefUpdate, Say
from flynnp2p.build.push import push_key, refs_after
from flynnp2p.build.repo import head_branch
from flynnp2p.peering import Peer
from flynnp2p.state.records import App, Repo
from tests.test_api_apps import Peers
from tests.test_git_http import Git, GitNode, create, start_node, text, with_token


def test_refs_after_applies_updates_and_deletions() -> None:
    a, b, c, zero = "a" * 40, "b" * 40, "c" * 40, "0" * 40
    before = {"refs/heads/main": a, "refs/heads/old": b}
    updates = [RefUpdate(a, c, "refs/heads/main"), RefUpdate(b, zero, "refs/heads/old"),
               RefUpdate(zero, a, "refs/tags/v1")]  # fmt: skip
    assert refs_after(before, updates) == {"refs/heads/main": c, "refs/tags/v1": a}
    assert before == {"refs/heads/main": a, "refs/heads/old": b}  # not changed in place


def test_head_is_main_else_master_else_the_first_branch() -> None:
    assert head_branch(["refs/heads/x", "refs/heads/master", "refs/heads/main"]) == "refs/heads/main"
    assert head_branch(["refs/heads/x", "refs/heads/master"]) == "refs/heads/master"
    assert head_branch(["refs/tags/v1", "refs/heads/z", "refs/heads/b"]) == "refs/heads/b"
    assert head_branch(["refs/tags/v1"]) is None


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port bound but not listening: every connection is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


class Releases:
    """The pre-receive step standing in for the build: records what it 'released'."""

    def __init__(self) -> None:
        self.commits: list[str] = []

    async def __call__(self, app: App, updates: Sequence[RefUpdate], say: Say, source: GitSource) -> bool:
        await source.wait_saved()  # as the build step does before it releases
        for update in updates:
            if update.ref == "refs/heads/main" and not update.deleted:
                self.commits.append(update.new)
                await say(f"-----> Released {update.new[:7]}")
        return True


async def main_of(git: Git, url: str) -> str:
    listed = (await git.run("ls-remote", url, "refs/heads/main")).stdout.decode()
    return listed.split("\t")[0].strip()


async def forget_local_copy(node: GitNode, app: App) -> None:
    """As if the next request reached another node: the repo is restored from the save."""
    node.git.repos.set_generation(app.id, -1)


async def test_a_push_the_blobstore_cannot_keep_is_refused_and_nothing_moves(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    releases = Releases()
    with refusing_port() as port:
        peers = Peers([Peer("n2", f"127.0.0.1:{port}")])
        node = await start_node(nursery, tmp_path / "node", step=releases, blob_peers=peers)
        await create(node, "durable")
        git = Git(tmp_path / "client")
        url = with_token(node.url, "durable")
        tree = await git.work_tree("a", url)
        sha = await git.commit(tree, "f", "1")
        refused = await git.run("push", "origin", "HEAD:main", cwd=tree, ok=False)
        out = text(refused)
        assert refused.returncode != 0 and "pre-receive hook declined" in out, out
        assert "the push could not be saved" in out and "no other alive node accepted" in out, out
        app = node.app("durable")
        assert await node.git.repos.refs(app.id) == {}  # no ref moved here
        assert node.ctx.state.state.record(Repo, app.id) is None
        assert releases.commits == []  # nothing was released from a push the cluster cannot keep
        assert node.etcd.leases == set()

        # The blobstore can keep it again (the unreachable peer left): the same push is accepted.
        peers.alive = []
        pushed = await git.run("push", "origin", "HEAD:main", cwd=tree)
    assert "remote: -----> repository saved (generation 1 on 1 nodes, full bundle)" in text(pushed)
    assert releases.commits == [sha]
    await forget_local_copy(node, app)
    assert await main_of(git, url) == sha


async def test_a_push_whose_lease_is_lost_before_the_save_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    holder: list[GitNode] = []

    async def lose_lease(app: App, updates: Sequence[RefUpdate], say: Say, source: GitSource) -> bool:
        del holder[0].etcd.kvs[push_key(app.id)]  # as if it had expired during a long build
        return True

    node = await start_node(nursery, tmp_path / "node", step=lose_lease)
    holder.append(node)
    await create(node, "lost")
    git = Git(tmp_path / "client")
    url = with_token(node.url, "lost")
    tree = await git.work_tree("a", url)
    await git.commit(tree, "f", "1")
    refused = await git.run("push", "origin", "HEAD:main", cwd=tree, ok=False)
    out = text(refused)
    assert refused.returncode != 0 and "pre-receive hook declined" in out, out
    assert "the push lock of lost was lost" in out, out
    app = node.app("lost")
    assert await node.git.repos.refs(app.id) == {}
    assert node.ctx.state.state.record(Repo, app.id) is None
    await forget_local_copy(node, app)
    assert await main_of(git, url) == ""


async def test_a_forced_push_is_accepted_and_saved_as_the_forced_history(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    releases = Releases()
    node = await start_node(nursery, tmp_path / "node", step=releases)
    await create(node, "forced")
    git = Git(tmp_path / "client")
    url = with_token(node.url, "forced")
    a = await git.work_tree("a", url)
    (a / "data.bin").write_bytes(os.urandom(256 << 10))  # a big base: later saves are increments
    await git.run("add", "data.bin", cwd=a)
    await git.commit(a, "f", "1")
    await git.run("push", "origin", "HEAD:main", cwd=a)
    b = await git.work_tree("b", url)  # at the first commit
    second = await git.commit(a, "f", "2")
    await git.run("push", "origin", "HEAD:main", cwd=a)
    app = node.app("forced")

    # Without --force, git refuses the non-fast-forward as before.
    other = await git.commit(b, "f", "other")
    refused = await git.run("push", "origin", "HEAD:main", cwd=b, ok=False)
    assert refused.returncode != 0 and "[rejected]" in text(refused) and "fetch first" in text(refused)
    assert releases.commits[-1] == second

    # With --force it is accepted, deployed, and saved as the forced history.
    forced = await git.run("push", "--force", "origin", "HEAD:main", cwd=b)
    out = text(forced)
    assert "forced update" in out, out
    assert "remote: -----> repository saved (generation 3 on 1 nodes, increment 2)" in out, out
    assert releases.commits[-1] == other
    await forget_local_copy(node, app)
    restores = node.git.stats["restores"]
    assert await main_of(git, url) == other
    assert node.git.stats["restores"] == restores + 1
    clone = await git.work_tree("c", url)
    assert (clone / "f").read_text() == "other"

    # The replaced history is gone for pushers too: a commit on it is a non-fast-forward now.
    await git.commit(a, "f", "3")
    refused = await git.run("push", "origin", "HEAD:main", cwd=a, ok=False)
    assert refused.returncode != 0 and "[rejected]" in text(refused)

    # A forced push back to an ancestor moves the ref only.
    back = await git.run("push", "--force", "origin", "HEAD~1:main", cwd=b)
    assert "(generation 4, refs only)" in text(back), text(back)
    await forget_local_copy(node, app)
    first = (await git.run("rev-parse", "HEAD~1", cwd=b)).stdout.decode().strip()
    assert await main_of(git, url) == first


async def test_a_clone_checks_out_the_pushed_branch_on_the_node_that_took_the_push(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    node = await start_node(nursery, tmp_path / "node")
    await create(node, "onmaster")
    git = Git(tmp_path / "client")
    url = with_token(node.url, "onmaster")
    tree = await git.work_tree("a", url)
    await git.commit(tree, "f", "on master")
    await git.run("push", "origin", "HEAD:master", cwd=tree)  # no main: HEAD names master
    restores = node.git.stats["restores"]
    clone = await git.work_tree("here", url)  # this node's own repo, not restored: the
    assert (clone / "f").read_text() == "on master"  # refs moved as saved, once git exited
    assert node.git.stats["restores"] == restores
    await forget_local_copy(node, node.app("onmaster"))
    restored = await git.work_tree("restored", url)
    assert (restored / "f").read_text() == "on master"


async def test_the_save_runs_while_the_step_builds_and_gates_its_release(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The save waits here until the step has begun: a session that saved before
    building would never finish. The step's release still comes after the save."""
    building = trio.Event()
    order: list[str] = []

    async def step(app: App, updates: Sequence[RefUpdate], say: Say, source: GitSource) -> bool:
        building.set()  # the "build" has begun while the save is held
        await source.wait_saved()
        order.append("released")
        return True

    node = await start_node(nursery, tmp_path / "node", step=step)
    blobs = node.git.blobs
    real_put = blobs.put

    async def held_put(digest: str, chunks: Any) -> tuple[int, int]:
        with trio.fail_after(20):
            await building.wait()
        done = await real_put(digest, chunks)
        order.append("saved")
        return done

    blobs.put = held_put  # type: ignore[method-assign]
    await create(node, "overlap")
    git = Git(tmp_path / "client")
    tree = await git.work_tree("a", with_token(node.url, "overlap"))
    sha = await git.commit(tree, "f", "1")
    pushed = await git.run("push", "origin", "HEAD:main", cwd=tree)
    assert "repository saved (generation 1" in text(pushed)
    assert order == ["saved", "released"]
    assert await node.git.repos.refs(node.app("overlap").id) == {"refs/heads/main": sha}
