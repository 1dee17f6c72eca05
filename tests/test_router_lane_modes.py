"""The fast lane as the agent runs it and as a router worker runs it, and the retry of
a pooled connection the backend dropped: the lane and the task path write the same
retry line (real router, real loopback backends, a real `LogHub`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from flynnp2p.host.loghub import LogHub
from flynnp2p.router.applog import RouterLog
from flynnp2p.router.lane import BURST_SECONDS
from flynnp2p.router.logline import parse_line
from flynnp2p.router.service import Router
from flynnp2p.router.table import Backend, RouteTable
from flynnp2p.watch import Watched
from tests.test_router_helpers import (
    LOCAL,
    HttpBackend,
    answer_one_then_drop,
    route,
    serve,
    wait_for,
)

REQUEST = b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n"


def table(addr: str) -> RouteTable:
    return RouteTable.build([route("r1", "a.test")], {("app1", "web"): [Backend("j0", addr)]})


async def one_response(stream: trio.SocketStream, ending: bytes) -> bytes:
    out = b""
    while not out.endswith(ending):
        data = await stream.receive_some(65536)
        assert data, "the router closed the connection"
        out += data
    return out


@pytest.mark.parametrize("burst", [None, BURST_SECONDS])
async def test_the_lane_waits_on_its_own_epoll_only_in_a_process_of_its_own(
    burst: float | None,
) -> None:
    """As the agent builds it (``--router-workers 0``) the router's lane never blocks in
    its own epoll (the agent's loop is shared); a worker sets `lane_burst`, and then it does.
    Either way the keep-alive requests stay in the lane."""
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b1")
        router = Router(
            Watched(table(await backend.start(nursery))), address=LOCAL, http_port=0, seed=1
        )
        if burst is not None:
            router.shared.lane_burst = burst
        port = await nursery.start(router.run)
        stream = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(10):
            for _ in range(20):
                await stream.send_all(REQUEST)
                assert (await one_response(stream, b"hello from b1")).startswith(b"HTTP/1.1 200 ")
        status = router.status()["lane"]
        assert status["kept"] == 19  # type: ignore[index]  # (the first one connects on the task path)
        if burst is None:
            assert status["bursts"] == 0  # type: ignore[index]
        else:
            assert status["bursts"] >= 19  # type: ignore[index]  # at least one wait per request
        await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_dropped_pooled_connection_is_retried_with_the_same_retry_line_on_either_path(
    tmp_path: Path, fast_lane: bool
) -> None:
    """The backend answers one request per connection, keep-alive, then drops the
    connection when the next request arrives on it: that request is retried on a new
    connection to the same backend (the connection failed, not the backend), with one
    H13 retry line in the app's log and one retry counted, whether the lane
    (`fast_lane`) or the task path sent it."""

    async with trio.open_nursery() as nursery:
        addr = f"{LOCAL}:{await serve(nursery, answer_one_then_drop)}"
        hub = LogHub(tmp_path / "logs")
        router = Router(Watched(table(addr)), address=LOCAL, http_port=0, seed=1, log=RouterLog(hub),
                        fast_lane=fast_lane)  # fmt: skip
        port = await nursery.start(router.run)
        stream = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(10):
            for _ in range(2):
                await stream.send_all(REQUEST)
                assert (await one_response(stream, b"ok")).startswith(b"HTTP/1.1 200 ")
            await wait_for(lambda: router.shared.log.written >= 1)
        await stream.aclose()
        lines = [parse_line(line.text) for line in await hub.history("app1", 100)]
        assert [(ln["at"], ln["code"]) for ln in lines] == [("warning", "H13")]
        assert lines[0]["backend"] == lines[0]["retry"] == f"j0@{addr}"
        assert (lines[0]["method"], lines[0]["path"], lines[0]["host"]) == ("GET", "/x", "a.test")
        app = router.status()["apps"]["app1"]  # type: ignore[index]
        assert app["retries"] == 1 and app["requests"]["2xx"] == 2 and app["codes"] == {"H13": 1}
        if fast_lane:
            assert router.status()["lane"]["kept"] >= 1  # type: ignore[index]  # the lane sent it first
        nursery.cancel_scope.cancel()
