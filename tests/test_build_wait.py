"""The push's wait on its deployment (`BuildStep._wait_web`), against a fake API
(`httpx.MockTransport`) that answers as a node does while the deploy runs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from flynnp2p.build.deploy import BuildStep
from flynnp2p.state.records import App

APP = App(id="a1", name="shop", created_at=0, deploy_timeout_s=5)
RUNNING = {
    "id": "d2", "app_id": "a1", "old_release_id": "r1", "new_release_id": "r2",
    "strategy": "one-by-one", "status": "running", "created_at": 1_000,
}  # fmt: skip
FAILED = {
    **RUNNING, "status": "rolled-back", "finished_at": 3_000, "failed_job_id": "web-9",
    "reason": "job web-9 (web) exited with code 3",
}  # fmt: skip


def fake_api(finish_as: dict[str, Any], asked: list[str]) -> httpx.AsyncClient:
    polls = iter([[RUNNING], [RUNNING], [finish_as, {**RUNNING, "new_release_id": "r1"}]])

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.url.path}?{request.url.query.decode()}".rstrip("?"))
        path = request.url.path
        if path.endswith("/deployments"):
            return httpx.Response(200, json={"deployments": next(polls)})
        if path.endswith("/releases"):
            return httpx.Response(
                200, json={"releases": [{"id": "r2", "version": 2}, {"id": "r1", "version": 1}]}
            )
        if path.endswith("/log"):
            lines = [
                {"text": "Traceback (most recent call last):"},
                {"event": "history-done"},
                {"text": "boom"},
            ]
            return httpx.Response(200, text="\n".join(json.dumps(x) for x in lines) + "\n")
        if path.endswith("/formation"):
            return httpx.Response(200, json={"formation": {"processes": {"web": 2}}})
        if path.endswith("/routes"):
            return httpx.Response(
                200, json={"routes": [{"type": "http", "domain": "shop.example"}]}
            )
        return httpx.Response(404, json={"error": {"message": "no"}})

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


async def waited(finish_as: dict[str, Any], tmp_path: Path) -> tuple[list[str], list[str]]:
    said: list[str] = []
    asked: list[str] = []

    async def say(line: str) -> None:
        said.append(line)

    step = BuildStep(api=fake_api(finish_as, asked), api_url="http://node:7100", slugs=None,  # type: ignore[arg-type]
                     work_root=tmp_path, wait_s=1)  # fmt: skip
    await step._wait_web(APP, "r2", say)
    return said, asked


async def test_a_failed_deploy_says_why_with_the_jobs_last_lines(
    tmp_path: Path, autojump_clock: Any
) -> None:
    said, asked = await waited(FAILED, tmp_path)
    assert said == [
        " !     deploy of v2 failed after 2.0 s: job web-9 (web) exited with code 3",
        " !     last lines of job web-9:",
        " !         Traceback (most recent call last):",
        " !         boom",
        " !     rolled back: the previous release v1 still serves",
    ]
    assert "/v1/apps/a1/log?job=web-9&n=10" in asked and asked.count("/v1/apps/a1/deployments") == 3


async def test_a_complete_deploy_says_where_the_app_answers(
    tmp_path: Path, autojump_clock: Any
) -> None:
    done = {**RUNNING, "status": "complete", "finished_at": 2_000}
    said, _ = await waited(done, tmp_path)
    assert said == ["-----> web is up (2 job(s)): http://shop.example:8080/"]


async def test_the_wait_reads_the_deployment_again_as_soon_as_an_event_says_it_changed(
    tmp_path: Path, autojump_clock: Any
) -> None:
    """The watcher finishes the deploy at 0.7 s: the event stream wakes the wait then
    (polls alone would see it at 1.0 s)."""
    done = trio.Event()
    asked_at: list[float] = []
    t0 = trio.current_time()

    async def events() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        await trio.sleep(0.7)
        done.set()
        yield b'event: deployment\ndata: {"kind":"deployment","key":"d2"}\n\n'
        await trio.sleep_forever()

    async def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/events":
            assert request.url.params["kinds"] == "deployment,job"
            return httpx.Response(200, content=events())
        if path.endswith("/deployments"):
            asked_at.append(trio.current_time() - t0)
            status = {"status": "complete", "finished_at": 2_000} if done.is_set() else {}
            return httpx.Response(200, json={"deployments": [{**RUNNING, **status}]})
        if path.endswith("/formation"):
            return httpx.Response(200, json={"formation": {"processes": {"web": 1}}})
        if path.endswith("/routes"):
            return httpx.Response(200, json={"routes": []})
        return httpx.Response(404, json={"error": {"message": "no"}})

    said: list[str] = []

    async def say(line: str) -> None:
        said.append(line)

    api = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    step = BuildStep(api=api, api_url="http://node:7100", slugs=None,  # type: ignore[arg-type]
                     work_root=tmp_path, wait_s=5)  # fmt: skip
    await step._wait_web(APP, "r2", say)
    assert said == ["-----> web is up (1 job(s)): http://shop:8080/"]
    assert asked_at == pytest.approx([0, 0.5, 0.7])


async def test_the_wait_ends_once_the_new_releases_web_jobs_are_up(
    tmp_path: Path, autojump_clock: Any
) -> None:
    """The deployment still runs (its old jobs drain), but as many new web jobs are up
    as the formation asks for at 0.3 s: the push says so then, not when the watcher's
    verdict arrives. Jobs of another release, or not up, do not count."""
    t0 = trio.current_time()
    said_at: list[float] = []

    def jobs() -> list[dict[str, Any]]:
        later = trio.current_time() - t0 >= 0.3
        return [
            {"id": "old", "release_id": "r1", "process_type": "web", "state": "up"},
            {"id": "n1", "release_id": "r2", "process_type": "web", "state": "up"},
            {"id": "w1", "release_id": "r2", "process_type": "worker", "state": "up"},
            {"id": "n2", "release_id": "r2", "process_type": "web", "state": "up" if later else "starting"},
        ]

    async def events() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        await trio.sleep(0.3)
        yield b'event: job\ndata: {"kind":"job","key":"n2"}\n\n'
        await trio.sleep_forever()

    async def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/events":
            return httpx.Response(200, content=events())
        if path.endswith("/deployments"):
            return httpx.Response(200, json={"deployments": [RUNNING]})  # never finished
        if path.endswith("/jobs"):
            return httpx.Response(200, json={"jobs": jobs()})
        if path.endswith("/formation"):
            return httpx.Response(200, json={"formation": {"release_id": "r2", "processes": {"web": 2}}})
        if path.endswith("/routes"):
            return httpx.Response(200, json={"routes": []})
        return httpx.Response(404, json={"error": {"message": "no"}})

    async def say(line: str) -> None:
        said_at.append(trio.current_time() - t0)
        assert line == "-----> web is up (2 job(s)): http://shop:8080/"

    api = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    step = BuildStep(api=api, api_url="http://node:7100", slugs=None,  # type: ignore[arg-type]
                     work_root=tmp_path, wait_s=5)  # fmt: skip
    await step._wait_web(APP, "r2", say)
    assert said_at == [pytest.approx(0.3)]
