"""The merged log API's sessions (flynnp2p/api/logs.py) against the real API on
127.0.0.1: a follower's readers live in its session's nursery, and a client that
goes away mid-follow leaves no session and no task behind."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from flynnp2p.api.app import create_app
from flynnp2p.api.logs import LogFanout, internal_log_blueprint, logs_blueprint
from flynnp2p.api.server import ApiServer
from flynnp2p.host.loghub import LogHub
from flynnp2p.host.logs import LogLine
from flynnp2p.peering import Peer
from flynnp2p.state.records import App
from tests.test_api_apps import AUTH, TOKEN, Clock, Ctx, Node, start_service
from tests.test_router_helpers import wait_for


def fanout_tasks() -> list[str]:
    """The names of the running tasks of log sessions (the session and its readers)."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                if "LogSession.run" in child.name or "LogFanout._pump" in child.name:
                    names.append(child.name)
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


@asynccontextmanager
async def log_api(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[LogHub, LogFanout, int]]:
    """The app "shop", its log hub, and the log API on 127.0.0.1 (this node only)."""
    service = await start_service(nursery)
    await service.write([App(id="a1", name="shop", created_at=1)])
    ctx = Ctx(service, Clock())
    hub = LogHub(tmp_path / "logs")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN.peer_key}"}) as peers_http:
        fanout = LogFanout(peers_http, lambda: [], Peer("n1", "unbound"))
        app = create_app(Node())
        app.register_blueprint(internal_log_blueprint(hub))
        app.register_blueprint(logs_blueprint(ctx, fanout))
        server = ApiServer(app, "127.0.0.1", 0)
        sockets = server.bind()
        port = sockets.insecure_sockets[0].getsockname()[1]
        fanout.self_peer = Peer("n1", f"127.0.0.1:{port}")
        await nursery.start(fanout.run)
        await nursery.start(server.run, sockets)
        yield hub, fanout, port


async def test_a_client_that_leaves_mid_follow_leaves_no_session_or_task(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        async with log_api(nursery, tmp_path) as (hub, fanout, port):

            async def keep_writing() -> None:  # until the follower has a line
                i = 0
                while True:
                    hub.publish_lines("shop", "web-1", [LogLine(1000 + i, "stdout", f"line {i}")])
                    i += 1
                    await trio.sleep(0.05)

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as client:
                for _ in range(2):  # twice: a second follower starts from a clean slate too
                    with trio.fail_after(10):
                        async with trio.open_nursery() as writing:
                            writing.start_soon(keep_writing)
                            async with client.stream(
                                "GET", "/v1/apps/shop/log", params={"follow": "1", "n": "0"}
                            ) as resp:
                                assert resp.status_code == 200
                                async for raw in resp.aiter_lines():
                                    if raw.strip() and "text" in json.loads(raw):
                                        break
                                assert len(fanout.sessions) == 1
                                assert sorted(fanout_tasks()) == [
                                    "flynnp2p.api.logs.LogFanout._pump",
                                    "flynnp2p.api.logs.LogSession.run",
                                ]  # one session task, and its reader of this node inside it
                            writing.cancel_scope.cancel()
                    # the client closed its connection mid-follow
                    await wait_for(lambda: not fanout.sessions and not fanout_tasks(), 5)
        nursery.cancel_scope.cancel()


async def test_n_lines_of_a_type_are_the_newest_of_that_type(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        async with log_api(nursery, tmp_path) as (hub, _fanout, port):
            await hub.write("shop", "build", [LogLine(1000 + i, "stdout", f"build {i}") for i in range(3)])
            await hub.write("shop", "web-1", [LogLine(2000 + i, "stdout", f"web {i}") for i in range(50)])
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as client:
                with trio.fail_after(10):
                    resp = await client.get("/v1/apps/shop/log", params={"n": "2", "type": "build"})
            texts = [json.loads(raw)["text"] for raw in resp.text.splitlines() if '"text"' in raw]
            assert texts == ["build 1", "build 2"]
        nursery.cancel_scope.cancel()
