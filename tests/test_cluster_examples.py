"""The examples and the build as a job of the app, on a real 3-node cluster (real
agents, serf, etcd, the git client, the built-in buildpacks, npm's registry).

* ``examples/nodejs`` (one dependency from npm) and ``examples/static`` deploy by
  ``git push`` and answer through the router of a node the push did not reach;
  what the build said is in the app's log with source ``build``.
* A build cache saved on one node is restored by a build on another: the test's
  buildpack (in ``.buildpacks``, a local directory) says whether its dependency
  was in CACHE_DIR or had to be "downloaded".
* A build over the app's memory limit (``PATCH /v1/apps/<app>``) fails the push
  naming the limit and how to raise it; the running release keeps serving.
* Hostile input: a push of a huge file is deployed intact without the agent
  holding it in memory; a pack over the body limit is a 413 at once; the node
  stays healthy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import AgentProc, Cluster, wait_for
from tests.test_git_http import Git, text

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def url_of(agent: AgentProc, app: str) -> str:
    return agent.url.replace("http://", f"http://x:{agent.token.api_key}@") + f"/git/{app}.git"


async def create(agent: AgentProc, name: str, **settings: object) -> None:
    async with agent.client() as c:
        c.timeout = 15.0
        r = await c.post("/v1/apps", json={"name": name})
        assert r.status_code == 201, r.text
        if settings:
            r = await c.patch(f"/v1/apps/{name}", json=settings)
            assert r.status_code == 200, r.text


async def work_tree(git: Git, name: str, files: Path | None = None) -> Path:
    tree = git.home / name
    if files is not None:
        shutil.copytree(files, tree)
    else:
        tree.mkdir()
    await git.run("init", "--quiet", "-b", "main", cwd=tree)
    return tree


async def commit_all(git: Git, tree: Path, message: str) -> None:
    await git.run("add", "-A", cwd=tree)
    await git.run("commit", "--quiet", "-m", message, cwd=tree)


async def push(git: Git, tree: Path, agent: AgentProc, app: str, ok: bool = True) -> str:
    done = await git.run("push", url_of(agent, app), "HEAD:main", cwd=tree, ok=False)
    out = text(done)
    assert (done.returncode == 0) is ok, out
    return out


async def served(agent: AgentProc, app: str, path: str = "/") -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(
            f"http://{agent.addr}:8080{path}", headers={"Host": f"{app}.flynnp2p.localhost"}
        )
        return r.status_code, r.text


async def serves(agent: AgentProc, app: str, expected: str, path: str = "/") -> None:
    """Wait (bounded) until `agent`'s router answers `expected`: its route table
    follows the new release's jobs a moment after the push returns."""

    seen: list[tuple[int, str]] = []

    async def answered() -> bool:
        seen[:] = [await served(agent, app, path)]
        return seen[0] == (200, expected)

    try:
        await wait_for(answered, 15, f"{agent.name}'s router to answer {expected!r} for {app}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it answered {seen}") from None


async def answer(agent: AgentProc, app: str) -> str:
    """The body of the first 200 `agent`'s router gives for `app` (bounded wait)."""

    async def ok() -> str | None:
        status, body = await served(agent, app)
        return body if status == 200 else None

    return await wait_for(ok, 15, f"{agent.name}'s router to answer for {app}")


async def build_log(agent: AgentProc, app: str) -> list[dict[str, object]]:
    async with agent.client() as c:
        r = await c.get(f"/v1/apps/{app}/log", params={"n": "2000", "type": "build"}, timeout=20)
        assert r.status_code == 200, r.text
    return [item for item in map(json.loads, r.text.splitlines()) if "event" not in item]


async def test_nodejs_and_static_examples_deploy_and_log_their_builds(
    cluster: Cluster, tmp_path: Path
) -> None:
    n1, n2, n3 = await cluster.start(3)
    await cluster.wait_converged([n1, n2, n3], alive=3)
    git = Git(tmp_path / "client")
    await create(n1, "nodejs")
    await create(n1, "static")

    node = await work_tree(git, "nodejs", EXAMPLES / "nodejs")
    await commit_all(git, node, "the Node.js example")
    out = await push(git, node, n1, "nodejs")
    assert "-----> Node.js app detected" in out and "web is up" in out, out
    body = await answer(n3, "nodejs")
    assert "Node.js v" in body and "with ms" in body, body

    site = await work_tree(git, "static", EXAMPLES / "static")
    await commit_all(git, site, "the static example")
    out = await push(git, site, n2, "static")
    assert "-----> Static app detected" in out and "web is up" in out, out
    body = await answer(n1, "static")
    assert "<h1>Hello from flynnp2p</h1>" in body, body

    # What each build said is in its app's log (merged from every node), source "build".
    logged = await build_log(n3, "nodejs")
    texts = [str(item["text"]) for item in logged]
    assert {item["job_id"] for item in logged} == {"build"} and {
        item["node"] for item in logged
    } == {"n1"}
    assert any(t.startswith("-----> Building nodejs (main at") for t in texts), texts
    assert any("Installing dependencies (npm install)" in t for t in texts), texts
    assert any(t.startswith("-----> web is up") for t in texts), texts
    assert all(item["type"] == "build" for item in logged)
    static_texts = [str(item["text"]) for item in await build_log(n1, "static")]
    assert any("Static app detected" in t for t in static_texts) and not any(
        "npm" in t for t in static_texts
    )


CACHING_BUILDPACK = """\
#!/bin/sh
# bin/compile BUILD_DIR CACHE_DIR ENV_DIR: "downloads" its dependency once per cache.
set -e
if [ -f "$1/grab" ]; then
  echo "grabbing 600 MB"
  python3 -c 'b = bytearray(600 * 1024 * 1024); print(len(b))'
fi
if [ -f "$2/dep-1.0.tar.gz" ]; then
  echo "dep-1.0 from the build cache"
else
  echo "downloading dep-1.0"
  head -c 100000 /dev/urandom > "$2/dep-1.0.tar.gz"
fi
cp "$2/dep-1.0.tar.gz" "$1/dep.tar.gz"
"""


async def test_a_warm_build_on_another_node_and_the_memory_limit(
    cluster: Cluster, tmp_path: Path
) -> None:
    n1, n2, n3 = await cluster.start(3)
    await cluster.wait_converged([n1, n2, n3], alive=3)
    bp = tmp_path / "buildpack"
    (bp / "bin").mkdir(parents=True)
    (bp / "bin" / "compile").write_text(CACHING_BUILDPACK)
    (bp / "bin" / "compile").chmod(0o755)
    await create(n1, "cached")
    git = Git(tmp_path / "client")
    tree = await work_tree(git, "cached")
    (tree / ".buildpacks").write_text(f"{bp}\n")  # (an env change would make a release first)
    (tree / "Procfile").write_text("web: exec python3 -m http.server $PORT\n")
    (tree / "index.html").write_text("v1")
    await commit_all(git, tree, "v1")

    cold = await push(git, tree, n1, "cached")
    assert "remote:        downloading dep-1.0" in cold and "Build cache saved" in cold, cold
    (tree / "index.html").write_text("v2")
    await commit_all(git, tree, "v2")
    warm = await push(git, tree, n2, "cached")  # another node: its cache comes from the blobstore
    assert "remote: -----> Build cache restored from node n1" in warm, warm
    async with n2.client() as c:  # fetched and unpacked while git sent the pack
        cache = (await c.get("/v1/status", timeout=15)).json()["components"]["git"]["build_cache"]
    assert cache["prefetched"] == 1 and cache["restored"] == 1, cache
    assert "remote:        dep-1.0 from the build cache" in warm and "downloading" not in warm, warm
    await serves(n3, "cached", "v2")

    # Over the memory limit: refused, naming the limit and how to raise it.
    async with n1.client() as c:
        r = await c.patch("/v1/apps/cached", json={"build_memory_mb": 256}, timeout=15)
        assert r.status_code == 200, r.text
    (tree / "grab").write_text("")
    (tree / "index.html").write_text("v3")
    await commit_all(git, tree, "v3 grabs memory")
    refused = await push(git, tree, n3, "cached", ok=False)
    assert "memory limit 256 MiB" in refused, refused
    assert (
        "flynnp2p app set build_memory_mb=512" in refused and "pre-receive hook declined" in refused
    )
    assert await served(n1, "cached") == (200, "v2")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def test_a_huge_file_and_an_oversized_pack(cluster: Cluster, tmp_path: Path) -> None:
    n1, n2, n3 = await cluster.start(3)
    await cluster.wait_converged([n1, n2, n3], alive=3)
    await create(n1, "huge")
    git = Git(tmp_path / "client")
    tree = await work_tree(git, "huge")
    (tree / "Procfile").write_text("web: exec python3 -m http.server $PORT\n")
    size = 96 * 1024 * 1024  # incompressible: the pack, the tree, the slug are each this big
    with (tree / "big.bin").open("wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    await commit_all(git, tree, "a huge file")
    assert n1.proc is not None
    before = rss_kb(n1.proc.pid)
    with trio.fail_after(180):
        done = await trio.run_process(
            ["git", "push", url_of(n1, "huge"), "HEAD:main"], cwd=tree, env=git.env,
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    out = text(done)
    assert done.returncode == 0 and "web is up" in out, out
    grown_mb = (rss_kb(n1.proc.pid) - before) / 1024
    assert grown_mb < 64, f"the agent grew by {grown_mb:.0f} MB for a {size >> 20} MB push"
    async with httpx.AsyncClient(timeout=60) as c:
        got = 0
        headers = {"Host": "huge.flynnp2p.localhost"}
        async with c.stream("GET", f"http://{n2.addr}:8080/big.bin", headers=headers) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_bytes():
                got += len(chunk)
    assert got == size

    # A pack over the git body limit: 413 at once, nothing read, the node fine.
    status, answer = await trio.to_thread.run_sync(oversized_pack, n3)
    assert status == 413, answer
    assert "over this endpoint's limit" in json.loads(answer)["error"]["message"]
    assert n3.running and await n3.status() is not None
    await serves(n3, "huge", "web: exec python3 -m http.server $PORT\n", "/Procfile")


def oversized_pack(agent: AgentProc) -> tuple[int, str]:
    """POST a receive-pack claiming 5 TB, send a few bytes, read the answer."""
    import base64
    import socket

    auth = base64.b64encode(f"x:{agent.token.api_key}".encode()).decode()
    head = (
        "POST /git/huge.git/git-receive-pack HTTP/1.1\r\n"
        f"Host: {agent.addr}\r\nAuthorization: Basic {auth}\r\n"
        "Content-Type: application/x-git-receive-pack-request\r\n"
        "Content-Length: 5000000000000\r\n\r\n"
    )
    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + b"0000")
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30
