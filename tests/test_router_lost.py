"""A request in flight to a backend whose job turns lost is given up at once, on the
fast lane and on the task path; one in flight to a draining (``stopping``) job is not.

Real router, real loopback backends: the "silent" one answers the first request on
each connection (so the router pools it and the lane can use it), then reads the
next and never answers, until a test tells it to. The table is swapped as the feed
would swap it (`table_from_state`'s `lost`: the leader stopped the job because its
host is not alive).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from flynnp2p.host.loghub import LogHub
from flynnp2p.router.applog import RouterLog
from flynnp2p.router.build import table_from_state
from flynnp2p.router.handover import decode_table, encode_table
from flynnp2p.router.logline import parse_line
from flynnp2p.router.lost import InFlight
from flynnp2p.router.service import Router
from flynnp2p.router.table import Backend, RouteTable
from flynnp2p.state.jobs import host_gone_reason
from flynnp2p.state.records import App, Job, Placement, Route
from flynnp2p.watch import Watched
from tests.states import state_of
from tests.test_router_helpers import LOCAL, HttpBackend, route, serve, wait_for

SVC = ("app1", "web")
GET = b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n"
POST = b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello"
SWAP_S = 0.1  # a request given up is answered within this of the swap (plus slack below)
SLACK_S = 0.4  # a noisy 2-core machine: the assertion allows this much more


def table(backends: list[Backend], lost: tuple[str, ...] = ()) -> RouteTable:
    return RouteTable.build([route("r1", "a.test")], {SVC: backends}, lost)


class Silent:
    """Answers each connection's first request; then reads requests and answers none
    until `release` is set (then "late" to each)."""

    def __init__(self) -> None:
        self.waiting = 0  # requests read and not answered
        self.release = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        first = True
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                got = await stream.receive_some(65536)
                if not got:
                    return
                data += got
            head, _, data = data.partition(b"\r\n\r\n")
            if b"content-length: 5" in head.lower():
                while len(data) < 5:
                    data += await stream.receive_some(65536)
                data = data[5:]
            if first:
                first = False
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                continue
            self.waiting += 1
            await self.release.wait()
            self.waiting -= 1
            try:
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
            except trio.BrokenResourceError:
                return


async def response(stream: trio.SocketStream) -> bytes:
    """One response with a Content-Length body (what these backends and the router send)."""
    out = b""
    while True:
        head, sep, body = out.partition(b"\r\n\r\n")
        if sep:
            length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:"))  # fmt: skip
            if len(body) >= length:
                return out
        data = await stream.receive_some(65536)
        assert data, f"the router closed the connection: {out!r}"
        out += data


async def setup(nursery: trio.Nursery, tmp_path: Path, fast_lane: bool) -> tuple[
    Router, Watched[RouteTable], Silent, Backend, Backend, LogHub, trio.SocketStream
]:  # fmt: skip
    """A router whose one backend is `silent`, and a client connection on which one
    request was answered (the router now pools a connection to it)."""
    silent = Silent()
    quiet = Backend("jq", f"{LOCAL}:{await serve(nursery, silent.handle)}")
    good = Backend("jg", await HttpBackend("good").start(nursery))
    hub = LogHub(tmp_path / "logs")
    watched = Watched(table([quiet]))
    router = Router(watched, address=LOCAL, http_port=0, seed=1, log=RouterLog(hub),
                    fast_lane=fast_lane)  # fmt: skip
    port = await nursery.start(router.run)
    stream = await trio.open_tcp_stream(LOCAL, port)
    await stream.send_all(GET)
    assert (await response(stream)).endswith(b"first")
    return router, watched, silent, quiet, good, hub, stream


async def lines_of(router: Router, hub: LogHub, n: int) -> list[dict[str, str]]:
    await wait_for(lambda: router.shared.log.written >= n)
    return [parse_line(line.text) for line in await hub.history("app1", 100)]


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_get_in_flight_to_a_lost_backend_is_retried_on_another_at_once(
    tmp_path: Path, fast_lane: bool
) -> None:
    async with trio.open_nursery() as nursery:
        router, watched, silent, quiet, good, hub, stream = await setup(nursery, tmp_path, fast_lane)
        kept = router.status()["lane"]["kept"] if fast_lane else 0  # type: ignore[index]
        with trio.fail_after(10):
            await stream.send_all(GET)
            await wait_for(lambda: silent.waiting == 1)
            if fast_lane:  # the lane sent it (on the pooled connection)
                assert router.status()["lane"]["kept"] == kept + 1  # type: ignore[index]
            swapped = trio.current_time()
            watched.set(table([good], lost=(quiet.address,)))
            out = await response(stream)
            took = trio.current_time() - swapped
            print(f"\nfast_lane={fast_lane}: the GET answered {took * 1000:.1f} ms after the swap")
            assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"hello from good"), out
            assert took < SWAP_S + SLACK_S
            lines = await lines_of(router, hub, 1)
        assert [(ln["at"], ln["code"]) for ln in lines] == [("warning", "H13")]
        assert (lines[0]["backend"], lines[0]["retry"]) == (f"jq@{quiet.address}", f"jg@{good.address}")
        app = router.status()["apps"]["app1"]  # type: ignore[index]
        assert app["retries"] == 1 and app["requests"]["2xx"] == 2 and app["requests"]["5xx"] == 0
        assert router.shared.inflight.count == 0
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_post_in_flight_to_a_lost_backend_is_answered_504_at_once(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        router, watched, silent, quiet, good, hub, stream = await setup(nursery, tmp_path, True)
        with trio.fail_after(10):
            await stream.send_all(POST)
            await wait_for(lambda: silent.waiting == 1)
            swapped = trio.current_time()
            watched.set(table([good], lost=(quiet.address,)))
            out = await response(stream)
            took = trio.current_time() - swapped
            print(f"\nthe POST answered {took * 1000:.1f} ms after the swap")
            assert out.startswith(b"HTTP/1.1 504 ") and b"the backend is lost" in out, out
            assert took < SWAP_S + SLACK_S
            lines = await lines_of(router, hub, 1)
        assert [(ln["at"], ln["code"], ln["status"]) for ln in lines] == [("error", "H12", "504")]
        assert (lines[0]["desc"], lines[0]["backend"]) == ("Backend lost", f"jq@{quiet.address}")
        app = router.status()["apps"]["app1"]  # type: ignore[index]
        assert app["retries"] == 0 and app["requests"]["5xx"] == 1 and app["codes"] == {"H12": 1}
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_get_to_a_lost_backend_with_no_other_is_answered_504(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        router, watched, silent, quiet, _, hub, stream = await setup(nursery, tmp_path, True)
        with trio.fail_after(10):
            await stream.send_all(GET)
            await wait_for(lambda: silent.waiting == 1)
            watched.set(table([], lost=(quiet.address,)))
            out = await response(stream)
            assert out.startswith(b"HTTP/1.1 504 ") and b"the backend is lost" in out, out
            lines = await lines_of(router, hub, 1)
        # the lane's attempt, handed to the task path as failed, has no backend left to try
        assert [(ln["code"], ln.get("desc")) for ln in lines] == [("H12", "Backend lost")]
        await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_request_in_flight_to_a_draining_backend_is_not_given_up(
    tmp_path: Path, fast_lane: bool
) -> None:
    """The job left the table as ``stopping`` (not lost): its answer, however late, is
    the client's. And a table naming the address lost while it lists it again (a job
    that takes traffic there now) gives up nothing either."""
    async with trio.open_nursery() as nursery:
        router, watched, silent, quiet, good, _, stream = await setup(nursery, tmp_path, fast_lane)
        with trio.fail_after(10):
            await stream.send_all(GET)
            await wait_for(lambda: silent.waiting == 1)
            watched.set(table([good]))  # draining: just not listed
            await trio.sleep(0.2)
            watched.set(table([quiet, good], lost=(quiet.address,)))  # listed again
            await trio.sleep(0.2)
            assert silent.waiting == 1
            silent.release.set()
            out = await response(stream)
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"late"), out
        assert router.shared.log.written == 0
        assert router.status()["apps"]["app1"]["retries"] == 0  # type: ignore[index]
        await stream.aclose()
        nursery.cancel_scope.cancel()


class Told:
    def __init__(self) -> None:
        self.told: list[str] = []

    def backend_lost(self, address: str) -> None:
        self.told.append(address)


def test_in_flight_tells_only_what_waits_on_a_lost_address_the_table_no_longer_lists() -> None:
    a, b, c = "127.0.0.2:1", "127.0.0.3:1", "127.0.0.4:1"
    inflight = InFlight()
    on_a, on_b, on_c, done = Told(), Told(), Told(), Told()
    for address, who in ((a, on_a), (b, on_b), (c, on_c), (a, done)):
        inflight.add(address, who)
    inflight.discard(a, done)
    told = inflight.abort_lost(table([Backend("jc", c)], lost=(a, c)))
    assert told == 1 and (on_a.told, on_b.told, on_c.told, done.told) == ([a], [], [], [])
    for address, who in ((a, on_a), (b, on_b), (c, on_c)):
        inflight.discard(address, who)
    assert inflight.count == 0
    assert inflight.abort_lost(table([], lost=(a,))) == 0
    inflight.prune({c})
    assert list(inflight.by_address) == [c]


def test_the_table_names_lost_the_jobs_stopped_because_their_host_is_not_alive() -> None:
    def job(id: str, address: str) -> Job:
        return Job(id, "app1", "r1", "web", "n1", "up", 1, 1, address=address)

    def stop(id: str, reason: str) -> Placement:
        return Placement(id, "app1", "r1", "web", "n1", "stop", 1, 1, reason=reason)

    state = state_of(
        App("app1", "hello", 1), Route("rt1", "app1", "http", 1, domain="hello.test"),
        job("up", "127.0.0.2:5000"),
        job("gone", "127.0.0.3:5000"), stop("gone", host_gone_reason("n1")),
        job("drained", "127.0.0.4:5000"), stop("drained", "scaled down to 1"),
    )  # fmt: skip
    built = table_from_state(state)
    assert [b.job_id for b in built.backends[SVC]] == ["up"]
    assert built.lost == frozenset({"127.0.0.3:5000"})
    assert built != RouteTable.build(built.routes, built.backends)  # a swap tells the router


def test_a_router_worker_gets_the_lost_addresses_with_the_table() -> None:
    sent = table([Backend("jg", "127.0.0.2:5000")], lost=("127.0.0.3:5000",))
    assert decode_table(encode_table(sent)) == sent
    assert decode_table(encode_table(sent)).lost == frozenset({"127.0.0.3:5000"})


async def test_a_connect_under_way_to_a_lost_backend_is_given_up(tmp_path: Path) -> None:
    """A backend whose accept queue is full (a listener with backlog 0, taken by one
    connection nobody accepts) leaves the router's connect unanswered, as a host that
    is gone does; the lost table ends it and the GET goes to the other backend."""
    with socket.socket() as full, socket.socket() as filler:
        full.bind((LOCAL, 0))
        full.listen(0)
        filler.connect(full.getsockname())
        gone = Backend("jq", f"{LOCAL}:{full.getsockname()[1]}")
        async with trio.open_nursery() as nursery:
            good = Backend("jg", await HttpBackend("good").start(nursery))
            watched = Watched(table([gone]))
            router = Router(watched, address=LOCAL, http_port=0, seed=1)
            port = await nursery.start(router.run)
            stream = await trio.open_tcp_stream(LOCAL, port)
            with trio.fail_after(10):
                await stream.send_all(GET)
                await wait_for(lambda: router.shared.inflight.count == 1)
                await trio.sleep(0.1)  # the SYN is out, unanswered
                swapped = trio.current_time()
                watched.set(table([good], lost=(gone.address,)))
                out = await response(stream)
                took = trio.current_time() - swapped
            print(f"\nthe GET answered {took * 1000:.1f} ms after the swap (connect_timeout: 5 s)")
            assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"hello from good"), out
            assert took < SWAP_S + SLACK_S
            assert router.status()["apps"]["app1"]["retries"] == 1  # type: ignore[index]
            await stream.aclose()
            nursery.cancel_scope.cancel()
