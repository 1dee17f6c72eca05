"""Builds and image unpacks on a node whose disk is full, for real: its data dir on
a small tmpfs, filled with a file (as tests/test_cluster_disk.py does).

Three agents: n1 and n3 hold etcd and lead (on ordinary disks), n2 is the only
host and the node pushed to, its data dir on the small disk. The app is built by
a buildpack of the test's own that leaves CACHE_BYTES of incompressible data in
the build cache on every build, and served by a job on n2 through n1's router.
In turn:

(a) a push with 1 MiB free: rejected, saying the disk of n2 is full (before the
    fix the build's ENOSPC escaped the push's hook and took the agent down); the
    running release keeps serving; nothing half-written is left (no build
    directory, no blob being written); so is one whose tree, exported before
    the build, does not fit (it too ended the agent);
(b) once space is freed, but not enough for the cache's copy with the space a
    node keeps free: the same push works, the cache not saved (the push says
    why);
(c) a docker save archive whose image does not fit on n2 when it unpacks: the
    job cannot start, saying why, the deploy is rolled back, the running release
    keeps serving, and no partial root filesystem is left; once space is freed,
    the same image deploys and serves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from flynnp2p.build.builder import _default_tools
from tests.diskfill import fill, small_tmpfs
from tests.harness import AgentProc, Cluster, wait_for
from tests.image_archives import config_doc, save_archive
from tests.test_git_http import Git, text

pytestmark = pytest.mark.slow

SIZE = "160m"
CACHE_BYTES = 3 << 20  # left in the build cache by every build
ASSET_BYTES = 2 << 20  # put in the slug by every build
HOST = "hello.flynnp2p.localhost"
LEAD_ONLY = ["--roles", "scheduler"]
HOST_ONLY = ["--roles", "host"]

DETECT = "#!/bin/sh\necho cachey\n"
COMPILE = f"""#!/bin/sh
# bin/compile BUILD_DIR CACHE_DIR ENV_DIR: a cache of incompressible data, new every build
head -c {CACHE_BYTES} /dev/urandom > "$2/deps.bin"
head -c {ASSET_BYTES} /dev/urandom > "$1/assets.bin"
echo "cache filled"
"""


@pytest.fixture
def small_disk(tmp_path: Path, cluster: Cluster) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small", SIZE, before_unmount=cluster.kill_all) as mnt:
        yield mnt


def leftovers(node: AgentProc) -> list[str]:
    """What a failed build, cache save, blob write or unpack could leave behind on `node`."""
    d = node.data_dir
    found = [p for p in (d / "builds").iterdir() if p.name != "cache"]
    found += list((d / "builds" / "cache").glob("*.restore-*"))
    found += list((d / "builds" / "cache").glob("*.old-*"))
    found += list((d / "blobs" / "tmp").iterdir())
    images = d / "jobs" / "images"
    found += [p for p in images.iterdir() if p.name.startswith(".")] if images.is_dir() else []
    return sorted(str(p.relative_to(d)) for p in found)


def url_of(agent: AgentProc) -> str:
    return agent.url.replace("http://", f"http://x:{agent.token.api_key}@") + "/git/hello.git"


async def served(agent: AgentProc) -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"http://{agent.addr}:8080/", headers={"Host": HOST})
        return r.status_code, r.text


async def serves(agent: AgentProc, body: str, timeout: float = 30) -> None:
    async def ok() -> bool:
        return await served(agent) == (200, body)

    await wait_for(ok, timeout, f"{agent.name}'s router to serve {body!r}", interval=0.2)


async def cli(agent: AgentProc, *argv: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "FLYNNP2P_URL": agent.url, "FLYNNP2P_TOKEN": agent.token.encode()}
    return await trio.run_process(
        [sys.executable, "-m", "flynnp2p", *argv], env=env, capture_stdout=True,
        capture_stderr=True, check=False,
    )  # fmt: skip


def image_archive(path: Path, body: str) -> Path:
    """A docker save archive of a static busybox serving `body` on $PORT."""
    busybox = Path("/bin/busybox").read_bytes()
    layer = [
        ("bin", "dir", b"", 0o755),
        ("bin/busybox", "file", busybox, 0o755),
        ("bin/sh", "symlink", "busybox", 0o777),
        ("www", "dir", b"", 0o755),
        ("www/index.html", "file", body.encode(), 0o644),
    ]
    cmd = ["/bin/busybox", "sh", "-c", "exec /bin/busybox httpd -f -p $PORT -h /www"]
    return save_archive(path, [layer], config_doc(Cmd=cmd))


async def deployment_of(agent: AgentProc, release_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        async with agent.client() as c:
            r = await c.get("/v1/apps/hello/deployments")
        dep = next((d for d in r.json()["deployments"] if d["new_release_id"] == release_id), None)
        return dep if dep is not None and dep["status"] != "running" else None

    return await wait_for(done, 60, f"the deployment of {release_id} to finish", interval=0.2)


async def test_builds_and_unpacks_on_a_full_disk(
    cluster: Cluster, small_disk: Path, tmp_path: Path
) -> None:
    if not Path("/bin/busybox").is_file():
        pytest.skip("needs a static /bin/busybox for the image")
    a = cluster.add()
    a.start(extra=LEAD_ONLY)
    await a.wait_ready()
    b = cluster.add()
    b.data_dir = small_disk / b.name
    b.start(peers=[a.gossip], extra=HOST_ONLY)
    c = cluster.add()
    c.start(peers=[a.gossip], extra=LEAD_ONLY)
    await b.wait_ready()
    await c.wait_ready()
    await cluster.wait_converged([a, b, c], alive=3, timeout=30)
    async with a.client() as api:
        api.timeout = 15.0
        r = await api.post("/v1/apps", json={"name": "hello"})
        assert r.status_code == 201, r.text

    buildpack = tmp_path / "cachey"
    (buildpack / "bin").mkdir(parents=True)
    for name, script in (("detect", DETECT), ("compile", COMPILE)):
        (buildpack / "bin" / name).write_text(script)
        (buildpack / "bin" / name).chmod(0o755)
    git = Git(tmp_path / "client")
    tree = tmp_path / "client" / "app"
    await git.run("init", "--quiet", "-b", "main", str(tree))
    await git.run("remote", "add", "origin", url_of(b), cwd=tree)
    await git.commit(tree, ".buildpacks", f"{buildpack}\n")
    await git.commit(tree, "Procfile", "web: exec python3 -m http.server $PORT\n")
    await git.commit(tree, "index.html", "v1")

    async def push() -> subprocess.CompletedProcess[bytes]:
        return await git.run("push", "origin", "HEAD:main", cwd=tree, ok=False)

    pushed = await push()
    out = text(pushed)
    assert pushed.returncode == 0, out
    assert "Build cache saved" in out and "web is up" in out, out
    await serves(a, "v1")

    # (a) a build on a full disk: refused, saying so; v1 keeps serving.
    filler = fill(small_disk, leave=1 << 20)
    await git.commit(tree, "index.html", "v2")
    refused = await push()
    out = text(refused)
    print(f"\n(a) a push with 1 MiB free:\n{out}")
    assert refused.returncode != 0 and b.running, out
    assert f"no space left on {b.name}" in out and "Push rejected" in out, out
    assert await served(a) == (200, "v1")
    assert leftovers(b) == []
    # A push whose pack fits, and the tar of its tree too, but not that tree
    # unpacked beside it (3 MiB of zeros, 5 MiB free): the source's export fails
    # before the build starts; refused the same way (it ended the agent).
    filler.unlink()
    filler = fill(small_disk, leave=5 << 20)
    (tree / "zeros.bin").write_bytes(bytes(3 << 20))
    await git.run("add", "zeros.bin", cwd=tree)
    await git.run("commit", "--quiet", "-m", "zeros", cwd=tree)
    refused = await push()
    out = text(refused)
    print(f"(a) a push of a tree bigger than what is free:\n{out}")
    assert refused.returncode != 0 and b.running, out
    assert f"no space left on {b.name}: the push could not be built" in out, out
    assert await served(a) == (200, "v1")
    assert leftovers(b) == []

    # (b) room for the build (and the tools it copies into its sandbox), not for
    # the cache's copy: not saved, the push goes on.
    filler.unlink()
    tools = sum(p.stat().st_size for p in _default_tools())
    filler = fill(small_disk, leave=tools + (24 << 20))
    pushed = await push()
    out = text(pushed)
    print(f"(b) a push with {(tools >> 20) + 24} MiB free:\n{out}")
    assert pushed.returncode == 0, out
    assert f"Build cache not saved: no space left on {b.name}" in out and "web is up" in out, out
    await serves(a, "v2")
    assert leftovers(b) == []
    filler.unlink()

    # (c) an image that fits in the blobstore but not unpacked: rolled back, v2 serves.
    archive = image_archive(tmp_path / "image.tar", "image v1")
    filler = fill(small_disk, leave=16 << 20)
    deployed = await cli(a, "deploy", "-a", "hello", "--image-tar", str(archive))
    assert deployed.returncode == 0, deployed.stderr.decode()
    async with a.client() as api:
        releases = (await api.get("/v1/apps/hello/releases")).json()["releases"]
        release = max(releases, key=lambda r: int(r["version"]))["id"]
    dep = await deployment_of(a, release)
    print(f"(c) an image that does not fit: {dep}")
    assert dep["status"] == "rolled-back", dep
    assert f"no space left on {b.name}" in (dep["reason"] or ""), dep
    assert await served(a) == (200, "v2")
    assert leftovers(b) == []
    filler.unlink()
    deployed = await cli(a, "deploy", "-a", "hello", "--image-tar", str(archive))
    assert deployed.returncode == 0, deployed.stderr.decode()
    await serves(a, "image v1", timeout=60)
    assert leftovers(b) == []
