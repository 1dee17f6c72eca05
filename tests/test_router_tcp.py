"""TCP routes: listeners follow the table, bytes both ways, half-close, retry on refusal."""

from __future__ import annotations

import socket

import trio

from flynnp2p.router.table import Backend, RouteSpec, RouteTable
from tests.test_router_helpers import LOCAL, serve, start_router, tcp_echo, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def tcp_table(port: int, addrs: list[str]) -> RouteTable:
    return RouteTable.build(
        [RouteSpec(id="t1", app_id="app1", type="tcp", port=port, process_type="echo")],
        {("app1", "echo"): [Backend(f"j{i}", a) for i, a in enumerate(addrs)]},
    )


async def test_tcp_route_proxies_both_ways_with_half_close_and_follows_the_table() -> None:
    async with trio.open_nursery() as nursery:
        echo = f"{LOCAL}:{await serve(nursery, tcp_echo)}"
        refused = f"{LOCAL}:{free_port()}"
        port = free_port()
        router, watched, _ = await start_router(nursery, RouteTable())
        watched.set(tcp_table(port, [refused, echo]))
        await wait_for(lambda: port in router.status()["listeners"]["tcp"])  # type: ignore[index]
        payload = bytes(range(256)) * 4096 * 5  # 5 MiB
        for _ in range(3):  # each connection may pick the refusing backend first
            stream = await trio.open_tcp_stream(LOCAL, port)
            got = bytearray()

            async def sender(stream: trio.SocketStream = stream) -> None:
                await stream.send_all(payload)
                await stream.send_eof()  # half-close: the echo still answers everything

            with trio.fail_after(10):
                async with trio.open_nursery() as inner:
                    inner.start_soon(sender)
                    while chunk := await stream.receive_some(65536):
                        got += chunk
            assert bytes(got) == payload
            await stream.aclose()
        assert refused in router.status()["balancer"]["skipped"]  # type: ignore[index]

        watched.set(RouteTable())  # the route is removed: the port closes
        await wait_for(lambda: router.status()["listeners"]["tcp"] == [])  # type: ignore[index]
        with trio.fail_after(5):
            try:
                await trio.open_tcp_stream(LOCAL, port)
            except OSError:
                pass
            else:
                raise AssertionError("the removed TCP route still accepts connections")
        nursery.cancel_scope.cancel()


async def test_a_tcp_port_in_use_is_reported_not_fatal() -> None:
    async with trio.open_nursery() as nursery:
        with socket.socket() as taken:
            taken.bind((LOCAL, 0))
            taken.listen()
            port = taken.getsockname()[1]
            router, watched, http_port = await start_router(nursery, RouteTable())
            watched.set(tcp_table(port, []))
            await wait_for(lambda: port in router.status()["tcp_errors"])  # type: ignore[operator]
            stream = await trio.open_tcp_stream(LOCAL, http_port)  # the router still serves
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")
            with trio.fail_after(5):
                assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 404 ")
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_silent_tcp_tunnel_is_closed_after_its_idle_timeout() -> None:
    from flynnp2p.router.proxy import ProxyConfig

    async def silent(stream: trio.SocketStream) -> None:  # a half-open peer: never a byte
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        backend = f"{LOCAL}:{await serve(nursery, silent)}"
        port = free_port()
        router, watched, _ = await start_router(nursery, RouteTable(), ProxyConfig(tunnel_idle_timeout=0.5))
        watched.set(tcp_table(port, [backend]))
        await wait_for(lambda: port in router.status()["listeners"]["tcp"])  # type: ignore[index]
        stream = await trio.open_tcp_stream(LOCAL, port)
        await stream.send_all(b"hello")  # moves once, then nothing either way
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # closed by the router
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_50_mb_tcp_transfer_is_spliced_intact_and_half_close_still_works() -> None:
    """Bulk goes through `os.splice` (counted), bytes intact both ways, and the
    client's half-close reaches the backend, whose answer still comes back."""
    import hashlib

    from flynnp2p.router import sock

    block = bytes(range(256)) * 4000  # 1,024,000 bytes
    size = 50 * len(block)
    got_up = hashlib.sha256()
    received = 0

    async def sink_then_answer(stream: trio.SocketStream) -> None:
        # reads to the client's end of stream (the half-close), then answers: the
        # answer can only arrive if EOF was passed on while our side stayed open
        nonlocal received
        while data := await stream.receive_some(1 << 16):
            got_up.update(data)
            received += len(data)
        await stream.send_all(b"got %d\n" % received)
        await stream.send_all(bytes(range(256)) * 4096 * 40)  # ~40 MiB back: spliced too
        await stream.send_eof()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        backend = f"{LOCAL}:{await serve(nursery, sink_then_answer)}"
        port = free_port()
        router, watched, _ = await start_router(nursery, RouteTable())
        watched.set(tcp_table(port, [backend]))
        await wait_for(lambda: port in router.status()["listeners"]["tcp"])  # type: ignore[index]
        before = sock.COUNTERS.spliced
        sent_up = hashlib.sha256()
        stream = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(60):
            for _ in range(50):
                await stream.send_all(block)
                sent_up.update(block)
            await stream.send_eof()
            back = bytearray()
            while data := await stream.receive_some(1 << 16):
                back += data
        await stream.aclose()
        answer, rest = bytes(back).split(b"\n", 1)
        assert answer == b"got %d" % size
        assert got_up.digest() == sent_up.digest()
        assert rest == bytes(range(256)) * 4096 * 40
        assert sock.COUNTERS.spliced - before > size  # both directions, less a first copied read
        nursery.cancel_scope.cancel()


async def test_a_small_message_tunnel_copies_and_never_splices() -> None:
    from flynnp2p.router import sock

    async with trio.open_nursery() as nursery:
        echo = f"{LOCAL}:{await serve(nursery, tcp_echo)}"
        port = free_port()
        router, watched, _ = await start_router(nursery, RouteTable())
        watched.set(tcp_table(port, [echo]))
        await wait_for(lambda: port in router.status()["listeners"]["tcp"])  # type: ignore[index]
        spliced, copied = sock.COUNTERS.spliced, sock.COUNTERS.copied
        stream = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(10):
            for i in range(50):
                await stream.send_all(b"ping %d\n" % i)
                expect = b"ping %d\n" % i
                got = b""
                while len(got) < len(expect):
                    got += await stream.receive_some(100)
                assert got == expect
        await stream.aclose()
        assert sock.COUNTERS.spliced == spliced
        assert sock.COUNTERS.copied - copied >= 2 * sum(len(b"ping %d\n" % i) for i in range(50))
        nursery.cancel_scope.cancel()
