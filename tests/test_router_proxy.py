"""The HTTP proxy on real loopback sockets: routing, headers, keep-alive, pipelining,
bodies both ways, balancing, retries, passive health, timeouts, WebSocket."""

from __future__ import annotations

import json

import httpx
import trio
import wsproto
import wsproto.events as ws

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
    ws_echo,
)  # fmt: skip

SVC = ("app1", "web")


async def test_routes_by_host_and_path_and_answers_404_and_503() -> None:
    async with trio.open_nursery() as nursery:
        web, api = HttpBackend("web"), HttpBackend("api")
        a_web, a_api = await web.start(nursery), await api.start(nursery)
        table = table_of(
            [route("r1", "hello.test"), route("r2", "hello.test", "/api", app="app2"),
             route("r3", "down.test", app="app3", app_name="downapp")],
            {SVC: [a_web], ("app2", "web"): [a_api]},
        )  # fmt: skip
        router, _, port = await start_router(nursery, table)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}") as client:
            r = await client.get("/", headers={"Host": "HELLO.test:8080"})
            assert (r.status_code, r.text) == (200, "hello from web")
            r = await client.get("/api/x", headers={"Host": "hello.test"})
            assert (r.status_code, r.text) == (200, "hello from api")
            r = await client.get("/", headers={"Host": "nope.test"})
            assert r.status_code == 404 and "nope.test" in r.text and "route add" in r.text
            r = await client.get("/", headers={"Host": "down.test"})
            assert r.status_code == 503 and "downapp" in r.text
        apps = router.status()["apps"]
        assert apps["app1"]["requests"]["2xx"] == 1  # type: ignore[index]
        assert apps["downapp"]["requests"]["5xx"] == 1  # type: ignore[index]
        nursery.cancel_scope.cancel()


async def test_forwarded_headers_request_id_and_hop_by_hop() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        _, _, port = await start_router(nursery, table)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}") as client:
            r = await client.get("/headers?q=1", headers={
                "Host": "h.test", "X-Forwarded-For": "10.0.0.9", "Keep-Alive": "timeout=5",
                "Connection": "keep-alive, X-Secret", "X-Secret": "drop me",
                "X-Request-Id": "short",  # too short to be kept
            })  # fmt: skip
            seen = json.loads(r.text)
            h = {n.lower(): v for n, v in seen["headers"]}
            assert seen["target"] == "/headers?q=1"
            assert h["x-forwarded-for"] == f"10.0.0.9, {LOCAL}"
            assert h["x-forwarded-proto"] == "http" and h["x-forwarded-port"] == str(port)
            assert h["x-request-start"].startswith("t=") and int(h["x-request-start"][2:]) > 0
            assert len(h["x-request-id"]) == 32 and h["x-request-id"] != "short"
            assert r.headers["x-request-id"] == h["x-request-id"]
            assert "keep-alive" not in h and "x-secret" not in h and "connection" not in h
            good = "abcdefghij0123456789-req"
            r = await client.get("/headers", headers={"Host": "h.test", "X-Request-Id": good})
            assert {n.lower(): v for n, v in json.loads(r.text)["headers"]}["x-request-id"] == good
            assert r.headers["x-request-id"] == good
        nursery.cancel_scope.cancel()


async def test_keep_alive_both_sides_and_pipelining_in_order() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        _, _, port = await start_router(nursery, table)
        reqs = b"".join(
            b"GET /headers?n=%d HTTP/1.1\r\nHost: h.test\r\n\r\n" % i for i in range(5)
        ) + b"GET /chunks/3/10 HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n"
        out = await raw_exchange(port, reqs)
        assert out.count(b"HTTP/1.1 200 OK") == 6
        positions = [out.index(b"/headers?n=%d" % i) for i in range(5)]
        assert positions == sorted(positions)
        assert out.endswith(b"a\r\nAAAAAAAAAA\r\na\r\nBBBBBBBBBB\r\na\r\nCCCCCCCCCC\r\n0\r\n\r\n")
        assert backend.connections == 1  # one pooled upstream connection served all six
        nursery.cancel_scope.cancel()


async def test_bodies_content_length_and_chunked_both_ways() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        _, _, port = await start_router(nursery, table)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "h.test"}) as client:
            r = await client.post("/echo", content=b"hello body")
            assert r.content == b"hello body" and r.headers["transfer-encoding"] == "chunked"

            async def gen():  # type: ignore[no-untyped-def]
                for i in range(10):
                    yield bytes([48 + i]) * 1000

            r = await client.post("/upload", content=gen())  # chunked upload
            assert r.text.split()[0] == "10000"
            r = await client.get("/download/300000")
            assert r.headers["content-length"] == "300000" and len(r.content) == 300000
            r = await client.get("/chunks/50/1000")
            assert len(r.content) == 50_000
            r = await client.head("/download/1234")
            assert r.headers["content-length"] == "1234" and r.content == b""
            r = await client.get("/")  # the connection is still fine after a HEAD
            assert r.text == "hello from b"
        nursery.cancel_scope.cancel()


async def test_expect_continue_is_answered_by_the_router() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        _, _, port = await start_router(nursery, table)
        stream = await trio.open_tcp_stream(LOCAL, port)
        with trio.fail_after(5):
            await stream.send_all(b"POST /upload HTTP/1.1\r\nHost: h.test\r\nContent-Length: 5\r\n"
                                  b"Expect: 100-continue\r\n\r\n")  # fmt: skip
            assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            await stream.send_all(b"12345")
            out = b""
            while b"\r\n\r\n" not in out or not out.endswith(b"5 " + b"%s" % b"5994471abb01112afcc18159f6cc74b4f511b99806da59b3caf5a9c173cacfc5"):
                out += await stream.receive_some(1000)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_power_of_two_choices_spreads_and_failed_connects_are_retried_and_skipped() -> None:
    async with trio.open_nursery() as nursery:
        b1, b2 = HttpBackend("one"), HttpBackend("two")
        dead = trio.socket.socket()
        await dead.bind((LOCAL, 0))
        dead_addr = f"{LOCAL}:{dead.getsockname()[1]}"  # bound, never listening: refused
        addrs = [await b1.start(nursery), await b2.start(nursery), dead_addr]
        table = table_of([route("r1", "h.test")], {SVC: addrs})
        router, _, port = await start_router(nursery, table)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "h.test"}) as client:
            for _ in range(40):
                r = await client.get("/")
                assert r.status_code == 200
        assert b1.hits > 5 and b2.hits > 5 and b1.hits + b2.hits == 40
        skipped = router.status()["balancer"]["skipped"]  # type: ignore[index]
        assert dead_addr in skipped
        assert router.status()["apps"]["app1"]["retries"] == 1  # type: ignore[index]
        dead.close()
        nursery.cancel_scope.cancel()


async def test_reset_before_response_retries_idempotent_only() -> None:
    async with trio.open_nursery() as nursery:
        closer, good = HttpBackend("closer"), HttpBackend("good")

        async def always_close(stream: trio.SocketStream) -> None:
            closer.hits += 1
            await stream.receive_some(65536)
            await stream.aclose()

        a_close = f"{LOCAL}:{await serve(nursery, always_close)}"
        table = table_of([route("r1", "h.test")], {SVC: [a_close, await good.start(nursery)]})
        _, _, port = await start_router(nursery, table)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "h.test"}) as client:
            for _ in range(10):
                assert (await client.get("/")).status_code == 200
            assert closer.hits > 0
            posts = [(await client.post("/", content=b"")).status_code for _ in range(20)]
            assert set(posts) <= {200, 502} and 502 in posts  # a POST that reached a backend is not retried
        nursery.cancel_scope.cancel()


async def test_timeouts_connect_and_response_headers() -> None:
    cfg = ProxyConfig(response_header_timeout=0.3, connect_timeout=0.3)
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "h.test")], {SVC: [await backend.start(nursery)]})
        router, _, port = await start_router(nursery, table, cfg)
        with trio.fail_after(5):
            out = await raw_exchange(port, b"GET /slow/2 HTTP/1.1\r\nHost: h.test\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 504 ")
        assert router.status()["apps"]["app1"]["requests"]["5xx"] == 1  # type: ignore[index]
        nursery.cancel_scope.cancel()


async def test_websocket_upgrade_passes_through() -> None:
    async with trio.open_nursery() as nursery:
        ws_port = await serve(nursery, ws_echo)
        table = table_of([route("r1", "ws.test")], {SVC: [f"{LOCAL}:{ws_port}"]})
        _, _, port = await start_router(nursery, table)
        stream = await trio.open_tcp_stream(LOCAL, port)
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        got: list[object] = []
        with trio.fail_after(5):
            await stream.send_all(client.send(ws.Request(host="ws.test", target="/ws")))
            while not got:
                client.receive_data(await stream.receive_some(65536))
                got += list(client.events())
            await stream.send_all(client.send(ws.Message(data="hi")))
            while not any(isinstance(e, ws.TextMessage) for e in got):
                client.receive_data(await stream.receive_some(65536))
                got += list(client.events())
            assert isinstance(got[0], ws.AcceptConnection)
            assert [e.data for e in got if isinstance(e, ws.TextMessage)] == ["echo: hi"]
            await stream.send_all(client.send(ws.Message(data="again")))
            while not any(isinstance(e, ws.TextMessage) and e.data == "echo: again" for e in got):
                client.receive_data(await stream.receive_some(65536))
                got += list(client.events())
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_table_swap_applies_to_the_next_request() -> None:
    async with trio.open_nursery() as nursery:
        b1, b2 = HttpBackend("one"), HttpBackend("two")
        a1, a2 = await b1.start(nursery), await b2.start(nursery)
        _, watched, port = await start_router(nursery, table_of([route("r1", "h.test")], {SVC: [a1]}))
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "h.test"}) as client:
            assert (await client.get("/")).text == "hello from one"
            watched.set(table_of([route("r1", "h.test")], {SVC: [a2]}))
            assert (await client.get("/")).text == "hello from two"  # same client connection
            watched.set(table_of([route("r1", "h.test")], {}))
            assert (await client.get("/")).status_code == 503
        nursery.cancel_scope.cancel()


async def test_wait_for_helper_fails_on_deadline() -> None:
    try:
        await wait_for(lambda: False, timeout=0.05)
    except trio.TooSlowError:
        return
    raise AssertionError("wait_for returned on a false predicate")


async def test_connect_timeout_answers_504_and_skips_the_backend() -> None:
    """A listener whose accept queue is full drops SYNs: connects to it hang."""
    cfg = ProxyConfig(connect_timeout=0.3)
    async with trio.open_nursery() as nursery:
        full = trio.socket.socket()
        await full.bind((LOCAL, 0))
        full.listen(0)
        address = f"{LOCAL}:{full.getsockname()[1]}"
        fillers = []
        for _ in range(3):  # fill the accept queue (what fits, without waiting on the rest)
            s = trio.socket.socket()
            with trio.move_on_after(0.2):
                await s.connect(full.getsockname())
            fillers.append(s)
        table = table_of([route("r1", "h.test")], {SVC: [address]})
        router, _, port = await start_router(nursery, table, cfg)
        with trio.fail_after(5):
            out = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 504 ") and b"timed out" in out
        assert address in router.status()["balancer"]["skipped"]  # type: ignore[index]
        for s in fillers:
            s.close()
        full.close()
        nursery.cancel_scope.cancel()


async def test_https_only_route_redirects_plain_http() -> None:
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        table = table_of([route("r1", "secure.test", https_only=True)], {SVC: [await backend.start(nursery)]})
        _, _, port = await start_router(nursery, table)
        out = await raw_exchange(port, b"GET /a?b=1 HTTP/1.1\r\nHost: secure.test:8080\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 308 ") and b"Location: https://secure.test/a?b=1\r\n" in out
        assert backend.hits == 0
        nursery.cancel_scope.cancel()
