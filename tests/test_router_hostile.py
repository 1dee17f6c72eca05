"""Hostile and malformed input: answered 4xx or closed, never a crash, nothing smuggled
to a backend, and other clients keep being served."""

from __future__ import annotations

import random
import re

import httpx
import pytest
import trio

from flynnp2p.router.proxy import ProxyConfig
from tests.test_router_helpers import (
    LOCAL,
    HttpBackend,
    raw_exchange,
    route,
    serve,
    start_router,
    table_of,
    wait_for,
)  # fmt: skip

SVC = ("app1", "web")
CFG = ProxyConfig(max_body=1000, max_request_line=200, max_header_bytes=1000, max_headers=20,
                  header_timeout=0.5)  # fmt: skip
H = b"Host: h.test\r\n"

CASES = {
    "bad request line": (b"GE T / HTTP/1.1\r\n" + H + b"\r\n", 400, False),
    "HTTP/0.9": (b"GET /\r\n\r\n", 505, False),
    "HTTP/2.0 as text": (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505, False),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400, False),
    "tls on the http port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400, False),
    "bare LF": (b"GET / HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"\n", 400, False),
    "obs-fold": (b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n  c\r\n\r\n", 400, False),
    "space before colon": (b"GET / HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n", 400, False),
    "NUL in a header": (b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n", 400, False),
    "CL and TE": (b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, False),
    "TE and CL": (b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                  b"Content-Length: 4\r\n\r\n0\r\n\r\n", 400, False),
    "duplicate CL": (b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
                     b"Content-Length: 3\r\n\r\nabc", 400, False),
    "conflicting CL": (b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
                       b"Content-Length: 5\r\n\r\nabcde", 400, False),
    "CL list": (b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400, False),
    "negative CL": (b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400, False),
    "TE not chunked": (b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc", 400, False),
    "invalid chunk size": (b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                           b"zz\r\nabc\r\n0\r\n\r\n", 400, True),
    "chunk size overflow": (b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                            b"fffffffffffffffffff\r\nabc\r\n", 400, True),
    "chunk without CR": (b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                         b"3\nabc\r\n0\r\n\r\n", 400, True),
    "long target": (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n" + H + b"\r\n", 414, False),
    "big headers": (b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 2000 + b"\r\n\r\n", 431, False),
    "many headers": (b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(30)) + b"\r\n", 431, False),
    "CL too big": (b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: 5000\r\n\r\n", 413, False),
    "chunked too big": (b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                        + b"3e8\r\n" + b"x" * 1000 + b"\r\n" + b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n",
                        413, True),
    "CONNECT": (b"CONNECT h.test:443 HTTP/1.1\r\n" + H + b"\r\n", 405, False),
    "no Host": (b"GET / HTTP/1.1\r\n\r\n", 400, False),
    "head cut short": (b"GET / HTTP/1.1\r\nHost: h.te", 400, False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_request_is_refused_and_the_router_keeps_serving(name: str) -> None:
    data, status, reaches_backend = CASES[name]
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        router, _, port = await start_router(nursery, table, CFG)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "h.test"}) as client:
            assert (await client.get("/")).status_code == 200  # a client that stays connected
            out = await raw_exchange(port, data)  # read until the router closes
            assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
            assert out.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in out
            if not reaches_backend:
                assert backend.hits == 1  # only the good client's request
            assert (await client.get("/")).status_code == 200
            assert backend.connections == 1 or reaches_backend  # the pooled connection survives
        await wait_for(lambda: router.connections == 0)
        nursery.cancel_scope.cancel()


async def test_a_refused_body_drops_the_upstream_connection() -> None:
    """A bad chunk after the head went upstream: 400, and the bytes after it never
    reach a backend as a request (the upstream connection is dropped, not pooled)."""
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        router, _, port = await start_router(nursery, table, CFG)
        stream = await trio.open_tcp_stream(LOCAL, port)
        await stream.send_all(b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await wait_for(lambda: backend.hits == 1)
        await stream.send_all(b"zz\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n")
        out = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(1000):
                out += chunk
        assert out.startswith(b"HTTP/1.1 400 ") and out.count(b"HTTP/1.1 ") == 1
        await wait_for(lambda: router.status()["pool"] == {})
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "h.test"}) as client:
            assert (await client.get("/")).status_code == 200
        assert [s["target"] for s in backend.seen] == ["/upload", "/"]
        assert backend.connections == 2
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_request_after_a_chunked_body_is_seen_alike_by_router_and_backend() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        _, _, port = await start_router(nursery, table, CFG)
        out = await raw_exchange(port, b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\n0\r\n\r\nGET /headers HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")  # fmt: skip
        assert out.count(b"HTTP/1.1 200 OK") == 2
        assert [s["target"] for s in backend.seen] == ["/upload", "/headers"]
        assert b"5 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" in out  # sha256("hello")
        nursery.cancel_scope.cancel()


async def test_slowloris_heads_time_out_while_a_normal_client_is_served() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        router, _, port = await start_router(nursery, table, CFG)
        slow = []
        for _ in range(100):
            s = await trio.open_tcp_stream(LOCAL, port)
            await s.send_all(b"GET / HTTP/1.1\r\nHost: h")  # and never the rest
            slow.append(s)
        await wait_for(lambda: router.connections == 100)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "h.test"}) as client:
            with trio.fail_after(2):
                for _ in range(20):
                    assert (await client.get("/")).status_code == 200
            await wait_for(lambda: router.connections == 1, timeout=3)  # the slow ones are gone
            assert (await client.get("/")).status_code == 200
        with trio.fail_after(2):
            reply = await slow[0].receive_some(1000)
        assert reply.startswith(b"HTTP/1.1 408 ")
        for s in slow:
            await s.aclose()
        nursery.cancel_scope.cancel()


async def test_idle_keep_alive_connections_are_closed() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        router, _, port = await start_router(nursery, table, ProxyConfig(idle_timeout=0.3))
        stream = await trio.open_tcp_stream(LOCAL, port)
        await stream.send_all(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        with trio.fail_after(3):
            out = b""
            while chunk := await stream.receive_some(1000):
                out += chunk
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"hello from b")
        assert router.connections == 0
        await stream.aclose()
        nursery.cancel_scope.cancel()


def raw_backend(reply: bytes):  # type: ignore[no-untyped-def]
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.receive_some(65536)
            await stream.send_all(reply)
        finally:
            await stream.aclose()

    return handler


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        (b"garbage\r\n\r\n", b"HTTP/1.1 502 "),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         b"HTTP/1.1 502 "),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", b"HTTP/1.1 502 "),
        (b"", b"HTTP/1.1 502 "),  # closed without a response
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", b"HTTP/1.1 200 OK"),  # cut short
    ],
)
async def test_a_misbehaving_backend_gets_502_or_a_closed_connection(reply: bytes, want: bytes) -> None:
    async with trio.open_nursery() as nursery:
        port_b = await serve(nursery, raw_backend(reply))
        table = table_of([route("r1", "h.test")], {SVC: [f"{LOCAL}:{port_b}"]})
        router, _, port = await start_router(nursery, table, CFG)
        out = await raw_exchange(port, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n")
        assert out.startswith(want), out
        if want.endswith(b"200 OK"):
            assert out.endswith(b"short")  # the router closed: the client sees the truncation
        await wait_for(lambda: router.connections == 0)
        nursery.cancel_scope.cancel()


SEEDS = [
    b"GET /a?b=1 HTTP/1.1\r\nHost: h.test\r\nAccept: */*\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: h.test\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /upload HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\nGET /headers HTTP/1.1\r\nHost: h.test\r\n\r\n",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(b) + 1)
        op = rng.randrange(4)
        if op == 0 and b:
            del b[min(i, len(b) - 1)]
        elif op == 1:
            b[i:i] = bytes([rng.choice(b"\r\n :\t\x00;,0aZ-/\x7f\xff")])
        elif op == 2 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        else:
            b[i:i] = rng.choice([b"\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b" "])
    return bytes(b)


async def test_fuzzed_requests_get_well_formed_answers_or_a_close_and_never_crash() -> None:
    rng = random.Random(20261201)  # seeded: a failure replays
    status_line = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] [^\r\n]*\r\n")
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        router, _, port = await start_router(nursery, table, CFG)
        for i in range(300):
            data = mutate(rng, SEEDS[i % len(SEEDS)])
            out = await raw_exchange(port, data)
            assert out == b"" or status_line.match(out), (data, out[:200])
        await wait_for(lambda: router.connections == 0)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "h.test"}) as client:
            assert (await client.get("/")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_connections_over_the_cap_are_closed_at_once() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        router, _, port = await start_router(nursery, table, ProxyConfig(max_connections=2))
        held = [await trio.open_tcp_stream(LOCAL, port) for _ in range(2)]
        await wait_for(lambda: router.connections == 2)
        extra = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(5):
            assert await extra.receive_some(100) == b""  # closed without a byte
        await held[0].send_all(b"GET / HTTP/1.1\r\n" + H + b"\r\n")  # the held ones still work
        with trio.fail_after(5):
            assert (await held[0].receive_some(1000)).startswith(b"HTTP/1.1 200 ")
        for s in [*held, extra]:
            await s.aclose()
        nursery.cancel_scope.cancel()
