"""The HTTP fast lane (flynnp2p/router/lane.py) through a real router and real
loopback backends: which requests it keeps, pipelining, flow control toward a
slow client, a pooled connection the backend dropped, and a response-head timeout."""

from __future__ import annotations

import json
import socket
import time

import h11
import trio

from flynnp2p.router.proxy import ProxyConfig
from flynnp2p.router.service import Router
from flynnp2p.router.table import Backend, RouteTable
from tests.test_router_helpers import (
    LOCAL,
    HttpBackend,
    answer_one_then_drop,
    route,
    serve,
    start_router,
)


def table(*addrs: str) -> RouteTable:
    return RouteTable.build([route("r1", "a.test")],
                            {("app1", "web"): [Backend(f"j{i}", a) for i, a in enumerate(addrs)]})  # fmt: skip


def lane(router: Router) -> dict[str, int]:
    return router.status()["lane"]  # type: ignore[return-value]


async def responses(stream: trio.SocketStream, n: int) -> list[h11.Event]:
    """`n` responses (head, body data joined) read with h11, an independent parser."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a.test")]))  # (state only)
    conn.send(h11.EndOfMessage())
    out: list[h11.Event] = []
    body = bytearray()
    while len(out) < 2 * n:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            out.append(event)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append(h11.Data(data=bytes(body)))
            body = bytearray()
            if len(out) < 2 * n:
                conn.start_next_cycle()
                conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a.test")]))
                conn.send(h11.EndOfMessage())
    return out


async def test_keep_alive_gets_are_served_by_the_lane_with_the_router_headers() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b1")
        router, _, port = await start_router(nursery, table(await backend.start(nursery)))
        stream = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(10):
            for i in range(10):
                await stream.send_all(b"GET /headers?i=%d HTTP/1.1\r\nHost: a.test\r\n"
                                      b"X-Request-Id: abcdefghij0123456789\r\n\r\n" % i)  # fmt: skip
                resp, data = await responses(stream, 1)
                assert isinstance(resp, h11.Response) and resp.status_code == 200
                assert dict(resp.headers)[b"x-request-id"] == b"abcdefghij0123456789"
                seen = json.loads(data.data)  # type: ignore[attr-defined]
                headers = {n.lower(): v for n, v in seen["headers"]}
                assert seen["target"] == f"/headers?i={i}"
                assert (
                    headers["x-forwarded-for"] == LOCAL and headers["x-forwarded-proto"] == "http"
                )
        await stream.aclose()
        status = lane(router)
        # the first request finds no pooled connection: the task path connects, then
        # hands the connection back; the other nine stay in the lane
        assert status["kept"] == 9 and status["handed"] == 1
        assert backend.connections == 1
        assert router.status()["apps"]["app1"]["requests"]["2xx"] == 10  # type: ignore[index]
        nursery.cancel_scope.cancel()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b1")
        router, _, port = await start_router(nursery, table(await backend.start(nursery)))
        stream = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(10):
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")  # warms the pool
            await responses(stream, 1)
            targets = [b"/download/%d" % (1000 * i + 1) for i in range(8)]
            await stream.send_all(
                b"".join(b"GET %s HTTP/1.1\r\nHost: a.test\r\n\r\n" % t for t in targets)
            )
            got = await responses(stream, len(targets))
        for i in range(len(targets)):
            assert len(got[2 * i + 1].data) == 1000 * i + 1  # type: ignore[attr-defined]
        assert lane(router)["kept"] >= len(targets)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_slow_client_gets_a_big_response_intact_through_the_lane() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b1")
        router, _, port = await start_router(nursery, table(await backend.start(nursery)))
        stream = await trio.open_tcp_stream(LOCAL, port)
        size = 16 << 20
        with trio.fail_after(30):
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            await responses(stream, 1)
            kept = lane(router)["kept"]
            await stream.send_all(b"GET /download/%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % size)
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
            head, _, body = head.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: %d" % size in head
            received = len(body)
            await trio.sleep(0.3)  # the client takes nothing: the router must hold, not buffer all
            assert router.status()["lane"]["kept"] == kept + 1  # type: ignore[index]
            while received < size:
                data = await stream.receive_some(65536)
                assert data.strip(b"x") == b""
                received += len(data)
            assert received == size
            # and the connection goes on with the next request
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            _, last = await responses(stream, 1)
            assert last.data == b"hello from b1"  # type: ignore[attr-defined]
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_pooled_connection_the_backend_dropped_is_retried_on_the_task_path() -> None:
    async with trio.open_nursery() as nursery:
        addr = f"{LOCAL}:{await serve(nursery, answer_one_then_drop)}"
        router, _, port = await start_router(nursery, table(addr))
        stream = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(10):
            for _ in range(3):
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                resp, data = await responses(stream, 1)
                assert resp.status_code == 200 and data.data == b"ok"  # type: ignore[attr-defined]
        status = lane(router)
        assert status["kept"] >= 2 and status["handed"] >= 3, status  # each dropped one went back
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_response_head_timeout_in_the_lane_is_a_504() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b1")
        cfg = ProxyConfig(response_header_timeout=0.5, timer_tick=0.05)
        router, _, port = await start_router(nursery, table(await backend.start(nursery)), cfg)
        stream = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(10):
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            await responses(stream, 1)
            await stream.send_all(b"GET /slow/3 HTTP/1.1\r\nHost: a.test\r\n\r\n")
            out = b""
            while data := await stream.receive_some(65536):
                out += data
        assert out.startswith(b"HTTP/1.1 504 ") and b"Connection: close" in out
        assert lane(router)["kept"] == 1
        apps = router.status()["apps"]
        assert apps["app1"]["requests"]["5xx"] == 1 and apps["app1"]["router_errors"] == 1  # type: ignore[index]
        assert router.status()["balancer"]["in_flight"] == {}  # type: ignore[index]
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_the_lane_gives_other_tasks_their_turn_under_steady_traffic() -> None:
    """The lane waits on its own epoll for a burst after each trio wakeup (lane.py); the
    burst is bounded, so with a client and a backend outside trio (threads) keeping
    it busy without a pause, another task's sleep still ends about on time."""
    listener = socket.create_server((LOCAL, 0))
    address = f"{LOCAL}:{listener.getsockname()[1]}"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def backend() -> None:  # the one upstream connection (pooled), answered in a loop
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            buf = b""
            while data := conn.recv(65536):
                buf += data
                while b"\r\n\r\n" in buf:
                    _, _, buf = buf.partition(b"\r\n\r\n")
                    conn.sendall(answer)

    def client(port: int) -> int:  # back-to-back keep-alive requests for a while
        done = 0
        with socket.create_connection((LOCAL, port), timeout=10) as s:
            until = time.monotonic() + 1.5
            while time.monotonic() < until:
                s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                got = b""
                while not got.endswith(b"ok"):
                    data = s.recv(65536)
                    assert data, "the router closed the connection"
                    got += data
                done += 1
        return done

    late = 0.0
    served = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, backend)
            router, _, port = await start_router(nursery, table(address))

            async def load() -> None:
                nonlocal served
                served = await trio.to_thread.run_sync(client, port)

            async with trio.open_nursery() as inner:
                inner.start_soon(load)
                while served == 0:  # every wait is measured, from the first request on
                    t0 = trio.current_time()
                    await trio.sleep(0.005)
                    late = max(late, trio.current_time() - t0 - 0.005)
            kept = lane(router)["kept"]
            nursery.cancel_scope.cancel()  # the router closes its pooled connection: backend ends
    finally:
        listener.close()
    assert served > 10 and kept >= served - 1  # the lane served them (the first one connects)
    assert late < 0.25, f"a task waited {late:.3f}s for its turn"
