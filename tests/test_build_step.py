"""The push's build step end to end on one node (`flynnp2p.build.deploy.BuildStep`):
a real git repository, the real builder and sandbox (the procfile buildpack), and
a fake of this node's API (`httpx.MockTransport`) that answers as a node does.

What is checked here: the release carries the process types the build read (the
API need not read the slug again), and the build's sandbox is removed while the
release is made and deployed, not before it: a removal that fails is counted and
never fails the push, and nothing of the build is left once the step is over.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from flynnp2p.build.deploy import BuildStep, remove_tree
from flynnp2p.build.hooks import GitSource, RefUpdate
from flynnp2p.host.slug import SlugError
from flynnp2p.state.records import BUILT_ON, App
from tests.test_host_prepare_unpack import preparer

APP = App(id="a1", name="shop", created_at=0, deploy_timeout_s=5)
PROCFILE = "web: python3 -m http.server $PORT\n"


def repo_with_procfile(root: Path) -> tuple[Path, str]:
    tree = root / "repo"
    tree.mkdir()
    (tree / "Procfile").write_text(PROCFILE)
    env = {"GIT_CONFIG_NOSYSTEM": "1", "HOME": str(root), "PATH": "/usr/bin:/bin",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}  # fmt: skip
    for argv in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "app"]):
        subprocess.run(["git", *argv], cwd=tree, env=env, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    return tree / ".git", head


class Slugs:
    def __init__(self) -> None:
        self.stored: dict[str, int] = {}

    async def put(self, digest: str, chunks: AsyncIterator[bytes]) -> tuple[int, int]:
        size = 0
        async for chunk in chunks:
            size += len(chunk)
        self.stored[digest] = size
        return size, 2


class FakeApi:
    """This node's API as the step sees it: the release made, its deploy complete."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.release_bodies: list[dict[str, Any]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/apps/a1/env":
            return httpx.Response(200, json={"env": {}})
        if path == "/v1/apps/a1/releases" and request.method == "POST":
            self.release_bodies.append(json.loads(request.content))
            self.released.set()
            return httpx.Response(201, json={"release": {"id": "r2", "version": 2}})
        if path == "/v1/apps/a1/deployments":
            dep = {"id": "d2", "new_release_id": "r2", "status": "complete", "created_at": 0}
            return httpx.Response(200, json={"deployments": [dep]})
        if path == "/v1/apps/a1/formation":
            return httpx.Response(200, json={"formation": {"processes": {"web": 1}}})
        if path == "/v1/apps/a1/routes":
            return httpx.Response(200, json={"routes": [{"type": "http", "domain": "shop.test"}]})
        return httpx.Response(404, json={"error": {"message": "no"}})  # /v1/events: the wait polls


async def push(step: BuildStep, repo: Path, head: str) -> tuple[bool, list[str]]:
    said: list[str] = []

    async def say(line: str) -> None:
        said.append(line)

    update = RefUpdate(old="0" * 40, new=head, ref="refs/heads/main")
    ok = await step(APP, [update], say, GitSource(repo))
    return ok, said


def make_step(api: FakeApi, slugs: Slugs, work_root: Path, **kwargs: Any) -> BuildStep:
    client = httpx.AsyncClient(transport=httpx.MockTransport(api.handle))
    return BuildStep(api=client, api_url="http://node:7100", slugs=slugs, work_root=work_root, **kwargs)


async def test_the_release_carries_the_builds_process_types_and_the_sandbox_goes_meanwhile(
    tmp_path: Path,
) -> None:
    repo, head = repo_with_procfile(tmp_path)
    api, slugs = FakeApi(), Slugs()
    removed: list[tuple[str, bool]] = []

    def remove(path: Path) -> str | None:
        # Held until the release is made: a step that removed the sandbox before
        # making the release would wait here in vain (and record False).
        removed.append((path.name, api.released.wait(10)))
        return remove_tree(path)

    work = tmp_path / "work"
    ok, said = await push(make_step(api, slugs, work, remove=remove), repo, head)
    assert ok, said
    assert "-----> web is up (1 job(s)): http://shop.test:8080/" in said
    [body] = api.release_bodies
    assert body["process_types"] == {"web": "python3 -m http.server $PORT"}
    assert body["slug"] in slugs.stored
    # The sandbox and the exported source went while the release was being made.
    assert [seen for _, seen in removed] == [True, True]
    assert removed[0][0].startswith("build-") and removed[1][0] == "src"
    assert sorted(p.name for p in work.iterdir()) == ["cache"]  # nothing of the build is left


async def test_the_slug_is_unpacked_for_this_nodes_jobs_and_a_failed_unpack_is_only_counted(
    tmp_path: Path,
) -> None:
    repo, head = repo_with_procfile(tmp_path)
    api, slugs = FakeApi(), Slugs()
    jobs = tmp_path / "jobs"

    trees: list[Path | None] = []

    async def unpack(path: Path, digest: str, built: Path | None) -> Path:
        trees.append(built)
        return await preparer(jobs).unpacked_slug(path, digest.replace(":", "-"), built)

    work = tmp_path / "w1"
    ok, said = await push(make_step(api, slugs, work, unpack=unpack, node="n2"), repo, head)
    assert ok, said
    [digest] = slugs.stored
    app = jobs / "slugs" / digest.replace(":", "-") / "app"
    assert (app / "Procfile").read_text() == PROCFILE
    # It was the build's own tree, moved out of the sandbox; the rest of which is gone.
    [tree] = trees
    assert tree is not None and tree.name == "app" and tree.parent.name.startswith("build-")
    assert not tree.parent.exists() and sorted(p.name for p in work.iterdir()) == ["cache"]
    # The release says where the slug is unpacked: the scheduler places its job there.
    assert api.release_bodies[0]["meta"][BUILT_ON] == "n2"

    async def broken(path: Path, digest: str, built: Path | None) -> Path:
        raise SlugError("slug is not a readable gzipped tar")

    step = make_step(FakeApi(), Slugs(), tmp_path / "w2", unpack=broken)
    ok, said = await push(step, repo, head)
    assert ok, said
    assert step.meanwhile_failed["unpack"] == 1 and step.stats["releases"] == 1
    # A node that runs no jobs unpacks nothing for them, and says it built nothing there.
    api = FakeApi()
    ok, said = await push(make_step(api, Slugs(), tmp_path / "w3", node="n2"), repo, head)
    assert ok, said
    assert BUILT_ON not in api.release_bodies[0]["meta"]


async def test_a_teardown_that_fails_is_counted_and_never_fails_the_push(tmp_path: Path) -> None:
    repo, head = repo_with_procfile(tmp_path)
    api, slugs = FakeApi(), Slugs()
    work = tmp_path / "work"
    step = make_step(api, slugs, work, remove=lambda path: "device or resource busy")
    ok, said = await push(step, repo, head)
    assert ok, said
    assert step.meanwhile_failed["teardown"] == 2 and step.stats["releases"] == 1
    # The step's own scratch, removed as it ends, took what the teardown left.
    assert sorted(p.name for p in work.iterdir()) == ["cache"]


def test_remove_tree_says_why_it_could_not(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    assert remove_tree(tree) is None and not tree.exists()
    assert remove_tree(tmp_path / "missing") is None  # already gone is removed
    (tmp_path / "file").write_text("x")
    why = remove_tree(tmp_path / "file")  # not a directory: rmtree refuses it
    assert why is not None and "file" in why
