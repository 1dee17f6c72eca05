"""Docker image deploys on a real cluster with a real dockerd, driven by the real CLI.

The image is made in the test (there is no registry): ``docker import`` of a tiny
root filesystem, busybox and a shell script that serves a page with busybox
httpd. ``deploy --image`` runs it on the two docker-backend nodes; a second image's
``docker save`` archive, removed from the engine first, is deployed with
``--image-tar`` after a process-backend node joins: the docker nodes load it, the
process node unpacks it and runs it chrooted. Every answer is checked through the
routers. Skipped when no engine answers (as the other docker tests), or without
busybox (Debian's busybox-static).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pytest
import trio

from tests.harness import AgentProc, Cluster, wait_for
from tests.jobs_app import jobs, live, wait_up
from tests.test_host_docker import docker_client, remove_containers

pytestmark = pytest.mark.slow
__all__ = ["docker_client"]  # a fixture, used by name

PREFIX = f"im{os.getpid()}"
BUSYBOX = shutil.which("busybox")
RUN_SH = b"""#!/bin/sh
busybox mkdir -p /tmp/www
echo "$GREETING from $JOB_ID" > /tmp/www/index.html
exec busybox httpd -f -p "$PORT" -h /tmp/www
"""


def rootfs_tar() -> bytes:
    assert BUSYBOX is not None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in (
            ("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755),
            ("srv/run.sh", RUN_SH, 0o755),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
    return buf.getvalue()


def import_image(engine: Any, repo: str, greeting: str) -> str:
    """`repo`:1 made by ``docker import`` with the image's CMD, EXPOSE and ENV; its id."""
    engine.api.import_image_from_data(
        rootfs_tar(), repository=repo, tag="1",
        changes=['CMD ["/bin/sh", "/srv/run.sh"]', "EXPOSE 8000", f"ENV GREETING={greeting}"],
    )  # fmt: skip
    image_id: str = engine.images.get(f"{repo}:1").id
    return image_id


@pytest.fixture
async def images_cluster(tmp_path: Path, docker_client: Any) -> AsyncIterator[Cluster]:
    if BUSYBOX is None:
        pytest.skip("no busybox here (apt-get install busybox-static) to build the test image")
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.kill_all()
        for agent in c.agents:
            await trio.to_thread.run_sync(remove_containers, docker_client, agent.name)
        for repo in (f"{PREFIX}-ref", f"{PREFIX}-tar"):
            with contextlib.suppress(docker.errors.ImageNotFound):
                await trio.to_thread.run_sync(
                    lambda r=repo: docker_client.images.remove(f"{r}:1", force=True)
                )


async def cli(agent: AgentProc, *argv: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "FLYNNP2P_URL": agent.url, "FLYNNP2P_TOKEN": agent.token.encode()}
    return await trio.run_process(
        [sys.executable, "-m", "flynnp2p", *argv], env=env, capture_stdout=True,
        capture_stderr=True, check=False,
    )  # fmt: skip


async def through_routers(agents: list[AgentProc], app: str, want: set[str]) -> dict[str, str]:
    """Ask every node's router until each job id in `want` has answered; job id -> text."""
    seen: dict[str, str] = {}

    async def all_answered() -> bool:
        async with httpx.AsyncClient(timeout=3.0) as h:
            for a in agents:
                r = await h.get(
                    f"http://{a.addr}:8080/", headers={"Host": f"{app}.flynnp2p.localhost"}
                )
                if r.status_code == 200:
                    greeting, _, job = r.text.strip().partition(" from ")
                    seen[job] = greeting
        return want <= set(seen)

    await wait_for(
        all_answered, 30, f"every job of {app} to answer through the routers", interval=0.1
    )
    return seen


async def test_deploy_image_and_image_tar(
    images_cluster: Cluster, docker_client: Any, tmp_path: Path
) -> None:
    c = images_cluster
    engine = docker_client
    ref = f"{PREFIX}-ref:1"
    await trio.to_thread.run_sync(import_image, engine, f"{PREFIX}-ref", "from-image")

    # Two docker-backend nodes.
    c.backend = "docker"
    d1, d2 = c.add(name=f"{PREFIX}-d1"), c.add(name=f"{PREFIX}-d2")
    d1.start()
    await d1.wait_ready(30)
    d2.start(peers=[d1.gossip])
    await d2.wait_ready(30)
    await c.wait_converged([d1, d2], 2, timeout=30)

    async with d1.client() as api:
        assert (await api.post("/v1/apps", json={"name": "img"})).status_code == 201
        missing = await cli(d1, "deploy", "-a", "img", "--image", f"{PREFIX}-nope:9")
        assert missing.returncode == 1
        assert (
            f"image '{PREFIX}-nope:9' is not on this node's Docker engine"
            in missing.stderr.decode()
        )

        done = await cli(d2, "deploy", "-a", "img", "--image", ref)  # any node; made on the leader
        assert done.returncode == 0, done.stderr.decode()
        assert "deployed: web=1" in done.stdout.decode()
        release = (await api.get("/v1/apps/img")).json()["release"]
        assert release["processes"]["web"]["command"] == "/bin/sh /srv/run.sh"
        assert release["processes"]["web"]["ports"] == [8000]
        assert (
            await api.patch("/v1/apps/img/env", json={"set": {"GREETING": "from-app"}})
        ).status_code == 200
        r = await api.put("/v1/apps/img/formation", json={"processes": {"web": 2}})
        assert r.status_code == 200, r.text
        up = await wait_up(api, "img", 2, timeout=60)
        assert sorted(j["host"] for j in up) == sorted([d1.name, d2.name])
        seen = await through_routers([d1, d2], "img", {j["id"] for j in up})
        assert set(seen.values()) == {"from-app"}  # the app's env over the image's ENV

        # An archive of another image, gone from the engine: docker nodes must load it.
        tar_repo = f"{PREFIX}-tar"
        tar_id = await trio.to_thread.run_sync(import_image, engine, tar_repo, "from-tar")
        archive = tmp_path / "image.tar"

        def save() -> None:
            with archive.open("wb") as f:
                for chunk in engine.images.get(f"{tar_repo}:1").save(named=True):
                    f.write(chunk)
            engine.images.remove(f"{tar_repo}:1", force=True)

        await trio.to_thread.run_sync(save)
        not_archive = tmp_path / "not.tar"
        not_archive.write_bytes(b"just bytes\n" * 100)
        bad = await cli(d1, "deploy", "-a", "img", "--image-tar", str(not_archive))
        assert bad.returncode == 1 and "not a docker save archive" in bad.stderr.decode()

        # A process-backend node joins; the archive runs on all three.
        c.backend = "process"
        p3 = c.add(name=f"{PREFIX}-p3")
        p3.start(peers=[d1.gossip])
        await p3.wait_ready(30)
        await c.wait_converged([d1, d2, p3], 3, timeout=30)
        assert (await api.post("/v1/apps", json={"name": "imgtar"})).status_code == 201
        done = await cli(p3, "deploy", "-a", "imgtar", "--image-tar", str(archive))
        assert done.returncode == 0, done.stderr.decode()
        r = await api.put("/v1/apps/imgtar/formation", json={"processes": {"web": 3}})
        assert r.status_code == 200, r.text
        up = await wait_up(api, "imgtar", 3, timeout=90)
        assert sorted(j["host"] for j in up) == sorted(a.name for a in c.agents)
        seen = await through_routers([p3, d1], "imgtar", {j["id"] for j in up})
        assert set(seen.values()) == {"from-tar"}
        assert engine.images.get(tar_id).id == tar_id  # loaded back from the archive
        on_p3 = next(j for j in up if j["host"] == p3.name)
        digest = "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
        unpacked = p3.data_dir / "jobs" / "images" / digest / "rootfs"
        assert (unpacked / "srv" / "run.sh").read_bytes() == RUN_SH  # run from its rootfs
        assert on_p3["id"] in seen
        assert len(live(await jobs(api, "img"))) == 2  # the first app serves on
