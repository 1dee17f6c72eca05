"""git smart HTTP with the real git client against a real API server on loopback.

One node (the leader of itself) serves `/git/` through `git http-backend`, with a
real `StateService`, a real blobstore on disk and the hook server; etcd is the
in-memory stand-in (`tests.fake_etcd`, with leases added); the cluster test
(tests/test_cluster_git.py) uses real etcd.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from flynnp2p.api.app import create_app
from flynnp2p.api.apps import apps_blueprint
from flynnp2p.api.git import GitApi, GitLeaderApi, git_blueprint
from flynnp2p.api.server import ApiServer
from flynnp2p.build.blobs import BlobService
from flynnp2p.build.blobstore import BlobStore
from flynnp2p.build.hooks import GitSource, HookServer, RefUpdate, Say
from flynnp2p.build.push import LeaderLink, PreReceive, PushLocks, accept_push
from flynnp2p.build.repo import RepoStore
from flynnp2p.coord.client import KV
from flynnp2p.state.records import App, Repo
from tests.fake_etcd import MemoryEtcd
from tests.test_api_apps import TOKEN, Clock, Ctx, Node, Peers, start_service


class LeasedEtcd(MemoryEtcd):
    """MemoryEtcd with leases: a key created with one goes when it is revoked."""

    def __init__(self) -> None:
        super().__init__()
        self.next_lease = 100
        self.leases: set[int] = set()

    async def create(self, puts: dict[str, bytes | str], lease: int = 0) -> tuple[bool, int]:
        ok, rev = await super().create(puts)
        if ok and lease:
            for key in puts:
                kv = self.kvs[key]
                self.kvs[key] = KV(kv.key, kv.value, kv.create_revision, kv.mod_revision, lease)
        return ok, rev

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        self.next_lease += 1
        self.leases.add(self.next_lease)
        return self.next_lease, ttl_s

    async def keepalive(self, lease: int) -> int:
        return 20 if lease in self.leases else 0

    async def revoke(self, lease: int) -> None:
        self.leases.discard(lease)
        for key in [k for k, kv in self.kvs.items() if kv.lease == lease]:
            del self.kvs[key]


@dataclass
class GitNode:
    url: str
    ctx: Ctx
    git: GitApi
    etcd: LeasedEtcd
    root: Path

    def app(self, name: str) -> App:
        return next(a for a in self.ctx.state.state.records(App) if a.name == name)


async def start_node(
    nursery: trio.Nursery, root: Path, step: PreReceive = accept_push, blob_peers: Peers | None = None
) -> GitNode:
    """`blob_peers`: the peers the blobstore replicates to (none: a put is held by this node alone)."""
    service = await start_service(nursery, Peers())
    etcd = LeasedEtcd()
    ctx = Ctx(service, Clock(), etcd=etcd)
    hooks = HookServer(root / "git" / "hooks")
    await nursery.start(hooks.run)
    peer_http = httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN.peer_key}"})
    blobs = BlobService(BlobStore(root / "blobs"), service, blob_peers or Peers(), peer_http, "n1", ctx.now_ms)
    locks = PushLocks(lambda: etcd, ctx.now_ms)
    app = create_app(Node())
    app.register_blueprint(apps_blueprint(ctx, rng=random.Random(3)))
    addr: list[str] = []
    git = GitApi(
        ctx, repos=RepoStore(root / "git", root / "git" / "hooks"), hooks=hooks, blobs=blobs,
        leader=LeaderLink(peer_http, lambda: addr[0]), locks=locks, node_name="n1",
        scratch=root / "git" / ".scratch", step=step,
    )  # fmt: skip
    app.register_blueprint(git_blueprint(ctx, git, GitLeaderApi(ctx, locks)))
    server = ApiServer(app, "127.0.0.1", 0)
    sockets = server.bind()
    port = sockets.insecure_sockets[0].getsockname()[1]
    addr.append(f"127.0.0.1:{port}")
    ctx.leader_addr = addr[0]
    await nursery.start(server.run, sockets)
    return GitNode(f"http://127.0.0.1:{port}", ctx, git, etcd, root)


def git_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
        "LC_ALL": "C",
        **(extra or {}),
    }  # fmt: skip


class Git:
    """The git client in a home of its own; `cred` adds the token to URLs."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.env = git_env(home, env)

    async def run(self, *args: str, cwd: Path | None = None, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(60):
            done = await trio.run_process(
                ["git", *args], cwd=cwd or self.home, env=self.env, capture_stdout=True,
                capture_stderr=True, check=False,
            )  # fmt: skip
        if ok:
            assert done.returncode == 0, (args, done.stderr.decode())
        return done

    async def work_tree(self, name: str, url: str) -> Path:
        path = self.home / name
        await self.run("clone", "--quiet", url, str(path))
        return path

    async def commit(self, tree: Path, name: str, text: str) -> str:
        (tree / name).write_text(text)
        await self.run("add", name, cwd=tree)
        await self.run("commit", "--quiet", "-m", f"{name}: {text}", cwd=tree)
        return (await self.run("rev-parse", "HEAD", cwd=tree)).stdout.decode().strip()


def with_token(url: str, app: str) -> str:
    return url.replace("http://", f"http://x:{TOKEN.api_key}@") + f"/git/{app}.git"


async def create(node: GitNode, name: str) -> None:
    async with httpx.AsyncClient(base_url=node.url, headers={"Authorization": f"Bearer {TOKEN.api_key}"}) as c:
        r = await c.post("/v1/apps", json={"name": name})
        assert r.status_code == 201, r.text


@pytest.fixture
async def node(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[GitNode]:
    yield await start_node(nursery, tmp_path / "node")


def text(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


# -- the tests ----------------------------------------------------------------


async def test_clone_empty_push_clone_again_with_hook_output(node: GitNode, tmp_path: Path) -> None:
    await create(node, "hello")
    git = Git(tmp_path / "client")
    url = with_token(node.url, "hello")
    tree = await git.work_tree("a", url)  # an empty repository
    sha = await git.commit(tree, "app.py", "print('hi')\n")
    pushed = await git.run("push", "origin", "HEAD:main", cwd=tree)
    out = text(pushed)
    # The pre-receive step's line and the save's line reach the pusher, as git prints them.
    assert f"remote: -----> hello: main at {sha[:7]} received" in out
    assert "remote: -----> repository saved (generation 1" in out

    again = await git.work_tree("b", url)
    assert (again / "app.py").read_text() == "print('hi')\n"
    app = node.app("hello")
    record = node.ctx.state.state.record(Repo, app.id)
    assert record is not None and record.generation == 1 and record.digest is not None
    assert await node.git.repos.refs(app.id) == {"refs/heads/main": sha}

    # A pushed ref other than main/master is stored, and prints no build line.
    await git.run("push", "origin", "HEAD:refs/heads/feature", cwd=tree)
    record = node.ctx.state.state.record(Repo, app.id)
    assert record is not None and record.generation == 2
    assert set(await node.git.repos.refs(app.id)) == {"refs/heads/main", "refs/heads/feature"}


async def test_no_credentials_is_a_401_that_asks_for_basic(node: GitNode, tmp_path: Path) -> None:
    await create(node, "locked")
    async with httpx.AsyncClient(base_url=node.url) as c:
        r = await c.get("/git/locked.git/info/refs", params={"service": "git-upload-pack"})
        bad = await c.get("/git/locked.git/info/refs", params={"service": "git-upload-pack"},
                          auth=("x", "not-the-token"))  # fmt: skip
        good = await c.get("/git/locked.git/info/refs", params={"service": "git-upload-pack"},
                           auth=("anyone", TOKEN.api_key))  # fmt: skip
    for resp in (r, bad):
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == 'Basic realm="flynnp2p"'
    assert good.status_code == 200
    assert good.headers["content-type"] == "application/x-git-upload-pack-advertisement"

    git = Git(tmp_path / "client")
    done = await git.run("ls-remote", f"{node.url}/git/locked.git", ok=False)
    assert done.returncode != 0
    assert "could not read Username" in text(done) or "Authentication failed" in text(done)


async def test_remote_add_and_credential_helper_need_no_typed_token(node: GitNode, tmp_path: Path) -> None:
    await create(node, "helped")
    cli_env = {"FLYNNP2P_URL": node.url, "FLYNNP2P_TOKEN": TOKEN.encode(),
               "XDG_CONFIG_HOME": str(tmp_path / "xdg")}  # fmt: skip
    git = Git(tmp_path / "client", cli_env)
    tree = git.home / "w"
    tree.mkdir()
    await git.run("init", "--quiet", "-b", "main", cwd=tree)
    await git.commit(tree, "Procfile", "web: python app.py\n")
    with trio.fail_after(60):
        added = await trio.run_process(
            [sys.executable, "-m", "flynnp2p", "git", "remote", "add", "-a", "helped"],
            cwd=tree, env={**os.environ, **git.env}, capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
    assert added.returncode == 0, added.stderr.decode()
    remote = (await git.run("remote", "get-url", "flynnp2p", cwd=tree)).stdout.decode().strip()
    assert remote == f"{node.url}/git/helped.git" and TOKEN.api_key not in remote
    pushed = await git.run("push", "flynnp2p", "main", cwd=tree)
    assert "remote: -----> helped: main at" in text(pushed)

    # The helper answers for the cluster's host only.
    for host, expect in ((node.url[len("http://"):], True), ("example.com", False)):
        with trio.fail_after(30):
            got = await trio.run_process(
                [sys.executable, "-m", "flynnp2p", "git-credentials", "get"],
                stdin=f"protocol=http\nhost={host}\n\n".encode(), env={**os.environ, **git.env},
                capture_stdout=True, check=True,
            )  # fmt: skip
        assert (f"password={TOKEN.api_key}" in got.stdout.decode()) is expect


async def test_non_fast_forward_is_refused_as_git_refuses_it(node: GitNode, tmp_path: Path) -> None:
    await create(node, "nff")
    git = Git(tmp_path / "client")
    url = with_token(node.url, "nff")
    a = await git.work_tree("a", url)
    first = await git.commit(a, "f", "1")
    await git.run("push", "origin", "HEAD:main", cwd=a)
    b = await git.work_tree("b", url)
    await git.commit(a, "f", "2")
    await git.run("push", "origin", "HEAD:main", cwd=a)
    await git.commit(b, "f", "other")
    refused = await git.run("push", "origin", "HEAD:main", cwd=b, ok=False)
    assert refused.returncode != 0
    assert "[rejected]" in text(refused) and "fetch first" in text(refused)
    app = node.app("nff")
    assert (await node.git.repos.refs(app.id))["refs/heads/main"] != first


async def test_a_refusing_step_rejects_the_push_with_its_message(nursery: trio.Nursery, tmp_path: Path) -> None:
    async def refuse(app: App, updates: Sequence[RefUpdate], say: Say, source: GitSource) -> bool:
        await say("-----> Python app detected")
        await say("ERROR: no matching distribution for nosuchpkg==9")
        return False

    node = await start_node(nursery, tmp_path / "node", step=refuse)
    await create(node, "failing")
    git = Git(tmp_path / "client")
    tree = await git.work_tree("a", with_token(node.url, "failing"))
    await git.commit(tree, "requirements.txt", "nosuchpkg==9\n")
    refused = await git.run("push", "origin", "HEAD:main", cwd=tree, ok=False)
    out = text(refused)
    assert refused.returncode != 0
    assert "remote: -----> Python app detected" in out
    assert "remote: ERROR: no matching distribution for nosuchpkg==9" in out
    assert "pre-receive hook declined" in out
    app = node.app("failing")
    assert await node.git.repos.refs(app.id) == {}
    assert node.ctx.state.state.record(Repo, app.id) is None
    assert node.etcd.leases == set()  # the push lease was released


@pytest.mark.parametrize(
    "error, said",
    [
        (OSError(28, "No space left on device"), "the push failed on this node: No space left on device"),
        (RuntimeError("a bug"), "the push failed on this node (an internal error; see the agent's log)"),
    ],
)
async def test_a_step_that_raises_refuses_the_push_and_the_node_takes_the_next(
    nursery: trio.Nursery, tmp_path: Path, error: Exception, said: str
) -> None:
    """A step's unexpected error refuses that push; it never ends the hook server."""
    calls: list[int] = []

    async def step(app: App, updates: Sequence[RefUpdate], say: Say, source: GitSource) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return True

    node = await start_node(nursery, tmp_path / "node", step=step)
    await create(node, "raising")
    git = Git(tmp_path / "client")
    tree = await git.work_tree("a", with_token(node.url, "raising"))
    await git.commit(tree, "Procfile", "web: true\n")
    refused = await git.run("push", "origin", "HEAD:main", cwd=tree, ok=False)
    assert refused.returncode != 0
    assert f"remote: flynnp2p: {said}" in text(refused)
    assert await node.git.repos.refs(node.app("raising").id) == {}
    await git.run("push", "origin", "HEAD:main", cwd=tree)
    assert len(calls) == 2


async def test_a_second_push_while_one_runs_is_refused_clearly(nursery: trio.Nursery, tmp_path: Path) -> None:
    entered, release = trio.Event(), trio.Event()

    async def slow(app: App, updates: Sequence[RefUpdate], say: Say, source: GitSource) -> bool:
        entered.set()
        await release.wait()
        return True

    node = await start_node(nursery, tmp_path / "node", step=slow)
    await create(node, "busy")
    git = Git(tmp_path / "client")
    url = with_token(node.url, "busy")
    a, b = await git.work_tree("a", url), await git.work_tree("b", url)
    sha_a = await git.commit(a, "f", "a")
    await git.commit(b, "f", "b")
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def push(name: str, tree: Path) -> None:
        results[name] = await git.run("push", "origin", "HEAD:main", cwd=tree, ok=False)

    async with trio.open_nursery() as pushes:
        pushes.start_soon(push, "a", a)
        await entered.wait()
        await push("b", b)
        release.set()
    assert results["a"].returncode == 0, text(results["a"])
    assert results["b"].returncode != 0
    assert "remote: flynnp2p: another push to busy is in progress (on node n1); retry when it finishes" in text(results["b"])
    app = node.app("busy")
    assert await node.git.repos.refs(app.id) == {"refs/heads/main": sha_a}


def raw_get(url: str, target: str) -> int:
    host, port = url[len("http://"):].split(":")
    auth = httpx.BasicAuth("x", TOKEN.api_key)._auth_header
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


async def test_hostile_paths_never_reach_the_backend(node: GitNode) -> None:
    await create(node, "safe")
    targets = {
        "/git/../x.git/info/refs?service=git-upload-pack": {400, 404},
        "/git/..%2F..%2Fetc.git/info/refs?service=git-upload-pack": {400, 404},
        "/git/nosuchapp.git/info/refs?service=git-upload-pack": {404},
        "/git/Bad_Name.git/info/refs?service=git-upload-pack": {400},
        "/git/safe.git/HEAD": {404},
        "/git/safe.git/objects/info/packs": {404},
        "/git/safe.git/info/refs": {400},  # the dumb protocol
        "/git/safe.git/info/refs?service=git-daemon": {400},
        "/git/safe/info/refs?service=git-upload-pack": {404},
    }
    for target, statuses in targets.items():
        status = await trio.to_thread.run_sync(raw_get, node.url, target)
        assert status in statuses, (target, status)
    assert node.git.stats["backend_runs"] == 0
    assert await trio.to_thread.run_sync(raw_get, node.url, "/git/safe.git/info/refs?service=git-upload-pack") == 200
    assert node.git.stats["backend_runs"] == 1


async def test_create_in_a_work_tree_adds_the_remote(node: GitNode, tmp_path: Path) -> None:
    cli_env = {"FLYNNP2P_URL": node.url, "FLYNNP2P_TOKEN": TOKEN.encode(),
               "XDG_CONFIG_HOME": str(tmp_path / "xdg")}  # fmt: skip
    git = Git(tmp_path / "client", cli_env)
    tree = git.home / "w"
    tree.mkdir()
    await git.run("init", "--quiet", "-b", "main", cwd=tree)
    sha = await git.commit(tree, "index.html", "<p>hi</p>")
    with trio.fail_after(60):
        made = await trio.run_process(
            [sys.executable, "-m", "flynnp2p", "create", "fromtree"],
            cwd=tree, env={**os.environ, **git.env}, capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
    assert made.returncode == 0, made.stderr.decode()
    assert f"git remote flynnp2p: {node.url}/git/fromtree.git" in made.stdout.decode()
    await git.run("push", "--quiet", "flynnp2p", "main", cwd=tree)
    assert await node.git.repos.refs(node.app("fromtree").id) == {"refs/heads/main": sha}


async def test_later_pushes_save_increments_and_a_restore_applies_them(node: GitNode, tmp_path: Path) -> None:
    await create(node, "chain")
    git = Git(tmp_path / "client")
    url = with_token(node.url, "chain")
    tree = await git.work_tree("a", url)
    (tree / "data.bin").write_bytes(os.urandom(256 << 10))  # the base is big; later pushes are not
    await git.run("add", "data.bin", cwd=tree)
    await git.commit(tree, "f", "1")
    out = text(await git.run("push", "origin", "HEAD:main", "HEAD:refs/heads/feature", cwd=tree))
    assert "(generation 1 on 1 nodes, full bundle)" in out
    await git.commit(tree, "f", "2")
    out = text(await git.run("push", "origin", "HEAD:main", cwd=tree))
    assert "(generation 2 on 1 nodes, increment 1)" in out
    out = text(await git.run("push", "origin", ":refs/heads/feature", cwd=tree))
    assert "(generation 3, refs only)" in out
    app = node.app("chain")
    record = node.ctx.state.state.record(Repo, app.id)
    assert record is not None and record.generation == 3 and len(record.increments) == 1
    expected = await node.git.repos.refs(app.id)
    assert set(expected) == {"refs/heads/main"}

    # This node forgets its copy: the next request restores the chain, refs exact.
    node.git.repos.set_generation(app.id, -1)
    restores = node.git.stats["restores"]
    listed = (await git.run("ls-remote", url)).stdout.decode()
    assert node.git.stats["restores"] == restores + 1
    assert await node.git.repos.refs(app.id) == expected
    assert "refs/heads/feature" not in listed and expected["refs/heads/main"] in listed
    clone = await git.work_tree("b", url)
    assert (clone / "f").read_text() == "2"


async def test_a_garbage_push_is_refused_and_leaves_nothing_held(node: GitNode, tmp_path: Path) -> None:
    await create(node, "junk")
    junk = b"0098" + os.urandom(4000)
    async with httpx.AsyncClient(base_url=node.url, auth=("x", TOKEN.api_key), timeout=30) as c:
        r = await c.post(
            "/git/junk.git/git-receive-pack", content=junk,
            headers={"Content-Type": "application/x-git-receive-pack-request"},
        )  # fmt: skip
    # git answers itself (receive-pack stops at the bad input: no "ok" for any ref).
    assert r.status_code == 200 and b"ok refs/" not in r.content
    app = node.app("junk")
    assert await node.git.repos.refs(app.id) == {}
    assert node.etcd.leases == set() and node.ctx.state.state.record(Repo, app.id) is None
    # The node still takes a real push.
    git = Git(tmp_path / "client")
    tree = await git.work_tree("a", with_token(node.url, "junk"))
    sha = await git.commit(tree, "f", "ok")
    await git.run("push", "origin", "HEAD:main", cwd=tree)
    assert await node.git.repos.refs(app.id) == {"refs/heads/main": sha}
