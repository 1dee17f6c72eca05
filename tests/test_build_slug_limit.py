"""The slug-size limit (`flynnp2p.build.slugsize`): a push whose slug is over it is
refused by the build step (`BuildStep`) with the size, the limit and what to do,
before anything is stored or released; a ``.slugignore`` that leaves the big file
out lets the same app through.

The real builder runs on a real git commit (a Procfile app with a big random
file); the node's API is a fake (`httpx.MockTransport`) answering the env and
the release, and the blobstore a list of what was put.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from flynnp2p.build.deploy import BuildStep
from flynnp2p.build.hooks import GitSource, RefUpdate
from flynnp2p.build.slugsize import DEFAULT_SLUG_MAX_MB, MIB, slug_too_big
from flynnp2p.state.records import App

APP = App(id="a1", name="big", created_at=0)
ZERO = "0" * 40


def test_the_message_says_the_size_the_limit_and_what_to_do() -> None:
    assert slug_too_big(MIB, MIB) is None
    said = slug_too_big(3 * MIB + MIB // 2, MIB)
    assert said is not None
    assert "3.5 MiB compressed" in said and "limit of 1 MiB" in said and ".slugignore" in said
    assert slug_too_big(500 * MIB, DEFAULT_SLUG_MAX_MB * MIB) is None  # Heroku's 500 MB fits


class Slugs:
    def __init__(self) -> None:
        self.put_digests: list[str] = []

    async def put(self, digest: str, chunks: AsyncIterator[bytes]) -> tuple[int, int]:
        size = 0
        async for chunk in chunks:
            size += len(chunk)
        self.put_digests.append(digest)
        return size, 2


def fake_api(asked: list[str]) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.method} {request.url.path}")
        if request.url.path.endswith("/env"):
            return httpx.Response(200, json={"env": {}})
        if request.url.path.endswith("/releases") and request.method == "POST":
            return httpx.Response(201, json={"release": {"id": "r1", "version": 1}})
        return httpx.Response(404, json={"error": {"message": "no"}})

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


def commit(repo: Path, files: dict[str, bytes]) -> str:
    """A commit of `files` in the repo at `repo` (made if absent); its id."""
    env = {
        "PATH": os.environ["PATH"], "HOME": str(repo.parent), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }  # fmt: skip
    if not repo.exists():
        subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
    for name, data in files.items():
        (repo / name).write_bytes(data)
    subprocess.run(["git", "add", "."], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "c"], cwd=repo, check=True, env=env)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, check=True, env=env, capture_output=True
    ).stdout.decode().strip()


@pytest.mark.parametrize("ignored", [False, True])
async def test_a_slug_over_the_limit_is_refused_before_it_is_stored(tmp_path: Path, ignored: bool) -> None:
    repo = tmp_path / "repo"
    files = {"Procfile": b"worker: sleep 1000\n", "data.bin": os.urandom(3 * MIB)}
    if ignored:
        files[".slugignore"] = b"data.bin\n"
    sha = commit(repo, files)
    asked: list[str] = []
    slugs = Slugs()
    step = BuildStep(
        api=fake_api(asked), api_url="http://node:7100", slugs=slugs, work_root=tmp_path / "builds",
        slug_max_bytes=1 * MIB,
    )  # fmt: skip
    lines: list[str] = []

    async def say(line: str) -> None:
        lines.append(line)

    ok = await step(APP, [RefUpdate(ZERO, sha, "refs/heads/main")], say, GitSource(repo / ".git"))
    out = "\n".join(lines)
    if ignored:
        assert ok, out
        assert len(slugs.put_digests) == 1 and "POST /v1/apps/a1/releases" in asked
        assert "-----> Released v1" in out
        return
    assert not ok
    assert " !     the slug is 3.0 MiB compressed, over this cluster's limit of 1 MiB" in out, out
    assert ".slugignore" in out and "Push rejected: the build failed" in out, out
    assert slugs.put_digests == [] and not any(a.startswith("POST") for a in asked), asked
    assert step.stats == {"builds": 1, "builds_failed": 1, "releases": 0}
