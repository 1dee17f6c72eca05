"""100 MB streamed up and down through the router with bounded memory, and bytes that
arrive with an upgrade's head."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import trio

from tests.test_router_helpers import (
    LOCAL,
    HttpBackend,
    route,
    serve,
    start_router,
    table_of,
    ws_echo,
)

SIZE = 100 * 1024 * 1024
SVC = ("app1", "web")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@asynccontextmanager
async def peak_rss_growth() -> AsyncIterator[list[int]]:
    """Samples this process's RSS while the block runs; yields [growth] filled at exit."""
    base = rss_bytes()
    peak = [base]
    result = [0]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_bytes())
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        try:
            yield result
        finally:
            nursery.cancel_scope.cancel()
    result[0] = peak[0] - base


async def read_response(stream: trio.SocketStream) -> tuple[bytes, int, bytes]:
    """Head, the count of body bytes read until Content-Length, and the body's first KiB."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(65536)
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    got = len(body)
    while got < length:
        chunk = await stream.receive_some(65536)
        assert chunk
        got += len(chunk)
        if len(body) < 1024:
            body += chunk[:1024]
    return head, got, body[:1024]


async def test_100mb_upload_and_download_stream_with_bounded_memory() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        _, _, port = await start_router(nursery, table)
        stream = await trio.open_tcp_stream(LOCAL, port)
        piece = b"u" * 65536
        with trio.fail_after(120):
            async with peak_rss_growth() as growth:
                await stream.send_all(b"POST /upload HTTP/1.1\r\nHost: h.test\r\n"
                                      b"Content-Length: %d\r\n\r\n" % SIZE)  # fmt: skip
                for _ in range(SIZE // len(piece)):
                    await stream.send_all(piece)
                head, _, body = await read_response(stream)
                await stream.send_all(b"GET /download/%d HTTP/1.1\r\nHost: h.test\r\n\r\n" % SIZE)
                dhead, dgot, _ = await read_response(stream)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert body.split()[0] == str(SIZE).encode()  # the backend got every byte
        assert dhead.startswith(b"HTTP/1.1 200 ") and dgot == SIZE
        assert growth[0] < 20 * 1024 * 1024, f"RSS grew by {growth[0] / 2**20:.1f} MiB"
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_upgrade_bytes_right_behind_the_head_reach_the_backend() -> None:
    async with trio.open_nursery() as nursery:
        ws_port = await serve(nursery, ws_echo)
        table = table_of([route("r1", "ws.test")], {SVC: [f"{LOCAL}:{ws_port}"]})
        _, _, port = await start_router(nursery, table)
        key = base64.b64encode(b"0123456789abcdef")
        mask = b"\x01\x02\x03\x04"
        text = b"early"
        frame = b"\x81" + bytes([0x80 | len(text)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(text))  # fmt: skip
        stream = await trio.open_tcp_stream(LOCAL, port)
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n" + frame
        )  # fmt: skip
        out = b""
        with trio.fail_after(5):
            while b"echo: early" not in out:
                out += await stream.receive_some(65536)
        assert out.startswith(b"HTTP/1.1 101 ")
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_streamed_echo_is_full_duplex() -> None:
    """20 MB echoed while it is sent: the router relays the response as the body goes up
    (sending the whole body first would deadlock once the socket buffers fill)."""
    size = 20 * 1024 * 1024
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        _, _, port = await start_router(nursery, table)
        stream = await trio.open_tcp_stream(LOCAL, port)
        got = 0

        async def upload() -> None:
            await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: h.test\r\n"
                                  b"Content-Length: %d\r\n\r\n" % size)  # fmt: skip
            for _ in range(size // 65536):
                await stream.send_all(b"e" * 65536)

        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="POST", target="/echo",
                                headers=[("Host", "h.test"), ("Content-Length", str(size))]))  # fmt: skip
        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                inner.start_soon(upload)
                done = False
                while not done:
                    client.receive_data(await stream.receive_some(65536))
                    while (event := client.next_event()) is not h11.NEED_DATA:
                        if isinstance(event, h11.Data):
                            got += len(event.data)
                        elif isinstance(event, h11.EndOfMessage):
                            done = True
                            break
        assert got == size
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_early_response_reaches_the_client_while_it_is_still_sending() -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)  # the head (and some body), never the rest
        await stream.send_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n"
                              b"Connection: close\r\n\r\nbig!")  # fmt: skip
        await trio.sleep_forever()  # keep the connection open, reading nothing

    async with trio.open_nursery() as nursery:
        port_b = await serve(nursery, refuse)
        table = table_of([route("r1", "h.test")], {SVC: [f"{LOCAL}:{port_b}"]})
        _, _, port = await start_router(nursery, table)
        stream = await trio.open_tcp_stream(LOCAL, port)

        async def upload() -> None:
            await stream.send_all(b"PUT /f HTTP/1.1\r\nHost: h.test\r\nContent-Length: %d\r\n\r\n" % SIZE)
            # until the router stops reading, or closes (a reset here is allowed:
            # what matters is that the response got through)
            with trio.move_on_after(10), contextlib.suppress(trio.BrokenResourceError):
                for _ in range(SIZE // 65536):
                    await stream.send_all(b"p" * 65536)

        out = b""
        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(upload)
                while not out.endswith(b"big!"):
                    out += await stream.receive_some(65536)
                inner.cancel_scope.cancel()
        assert out.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in out
        await stream.aclose()
        nursery.cancel_scope.cancel()
