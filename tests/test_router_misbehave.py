"""Backends that misbehave in ways a hostile app can choose: neither may take the
router down nor corrupt what the client receives."""

from __future__ import annotations

import trio

from flynnp2p.router.proxy import ProxyConfig
from tests.test_router_helpers import LOCAL, HttpBackend, route, serve, start_router, table_of

SVC = ("app1", "web")


async def test_an_unasked_101_while_the_client_uploads_is_a_502_and_the_router_lives_on() -> None:
    async def switch(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)  # the head; the body is still coming
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        bad = await serve(nursery, switch)
        good = await HttpBackend("ok").start(nursery)
        table = table_of(
            [route("r1", "bad.test"), route("r2", "good.test", app="app2")],
            {SVC: [f"{LOCAL}:{bad}"], ("app2", "web"): [good]},
        )
        _, _, port = await start_router(nursery, table)
        stream = await trio.open_tcp_stream(LOCAL, port)
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: bad.test\r\nContent-Length: 1000000\r\n\r\n")
        out = b""
        with trio.fail_after(10):
            async with trio.open_nursery() as inner:

                async def upload() -> None:
                    try:
                        for _ in range(100):
                            await stream.send_all(b"x" * 10_000)
                    except trio.BrokenResourceError:
                        pass

                inner.start_soon(upload)
                while b"\r\n\r\n" not in out:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    out += chunk
                inner.cancel_scope.cancel()
        assert out.startswith(b"HTTP/1.1 502 "), out[:200]
        await stream.aclose()
        # The router still serves everyone else.
        other = await trio.open_tcp_stream(LOCAL, port)
        await other.send_all(b"GET / HTTP/1.1\r\nHost: good.test\r\nConnection: close\r\n\r\n")
        with trio.fail_after(5):
            reply = b""
            while chunk := await other.receive_some(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 ")
        nursery.cancel_scope.cancel()


async def test_a_backend_stalling_mid_body_gets_no_504_written_into_the_body() -> None:
    async def stall(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        data = b""
        while len(data) < 100 + 60:  # then read the whole request (the upload completes)
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
        await trio.sleep_forever()  # and stall mid-body

    cfg = ProxyConfig(response_header_timeout=0.3, idle_timeout=1.0, timer_tick=0.05)
    async with trio.open_nursery() as nursery:
        port_b = await serve(nursery, stall)
        _, _, port = await start_router(nursery, table_of([route("r1", "h.test")], {SVC: [f"{LOCAL}:{port_b}"]}), cfg)
        stream = await trio.open_tcp_stream(LOCAL, port)
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: 100\r\n\r\n")
        await trio.sleep(0.1)  # the response has begun before the body is sent
        await stream.send_all(b"y" * 100)
        out = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                out += chunk
        assert out.startswith(b"HTTP/1.1 200 ") and b"hello" in out
        assert b"504" not in out  # the idle timeout closes it; nothing is spliced into the body
        nursery.cancel_scope.cancel()
