"""Tiny loopback backends and clients for the router's component tests (no tests here).

The backends speak HTTP through h11 and WebSocket through wsproto, parsers
independent of the router's httptools, so both sides of the proxy are checked
by a different implementation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import h11
import trio
import wsproto
import wsproto.events as ws

from flynnp2p.router.proxy import ProxyConfig
from flynnp2p.router.service import Router
from flynnp2p.router.table import Backend, RouteSpec, RouteTable
from flynnp2p.watch import Watched

LOCAL = "127.0.0.1"


async def serve(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOCAL))
    return int(listeners[0].socket.getsockname()[1])


async def answer_one_then_drop(stream: trio.SocketStream) -> None:
    """A backend connection handler: answers one request as if keep-alive, then drops
    the connection unanswered when the next request arrives on it (a backend dying
    with that request on the wire: the router sees a closed idle connection in its
    pool and never sends on it)."""
    for answer in (True, False):
        data = b""
        while b"\r\n\r\n" not in data:
            if not (got := await stream.receive_some(65536)):
                return
            data += got
        if answer:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await stream.aclose()


@dataclass
class HttpBackend:
    """An h11 app server. Paths: / (hello), /headers (JSON), /echo (body streamed back
    chunked), /chunks/N/SIZE, /download/SIZE, /upload (count and sha256),
    /slow/SECONDS, /close (drops the connection unanswered)."""

    name: str
    hits: int = 0
    connections: int = 0
    seen: list[dict[str, object]] = field(default_factory=list)

    async def start(self, nursery: trio.Nursery) -> str:
        port = await serve(nursery, self.handle)
        return f"{LOCAL}:{port}"

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next(conn, stream)
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request), event
                self.hits += 1
                keep = await self.respond(conn, stream, event)
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def respond(
        self, conn: h11.Connection, stream: trio.SocketStream, req: h11.Request
    ) -> bool:
        path = req.target.decode()
        parts = path.split("?")[0].strip("/").split("/")
        headers = [(n.decode(), v.decode()) for n, v in req.headers]
        self.seen.append({"method": req.method.decode(), "target": path, "headers": headers})

        async def send(*events: h11.Event) -> None:
            for e in events:
                data = conn.send(e)
                if data:
                    await stream.send_all(data)

        if parts[0] == "close":
            return False
        if parts[0] == "slow":
            await trio.sleep(float(parts[1]))
        if parts[0] == "echo":
            await send(h11.Response(status_code=200, headers=[("X-Backend", self.name)]))
            while True:
                e = await _next(conn, stream)
                if isinstance(e, h11.Data):
                    await send(h11.Data(data=e.data))
                else:
                    break
            await send(h11.EndOfMessage())
            return True
        count, digest = 0, hashlib.sha256()
        while True:  # read the whole request body
            e = await _next(conn, stream)
            if isinstance(e, h11.Data):
                count += len(e.data)
                digest.update(e.data)
            else:
                break
        if parts[0] == "upload":
            body = f"{count} {digest.hexdigest()}".encode()
        elif parts[0] == "headers":
            body = json.dumps(self.seen[-1]).encode()
        elif parts[0] == "chunks":
            n, size = int(parts[1]), int(parts[2])
            await send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
            for i in range(n):
                await send(h11.Data(data=bytes([65 + i % 26]) * size))
            await send(h11.EndOfMessage())
            return True
        elif parts[0] == "download":
            size = int(parts[1])
            await send(h11.Response(status_code=200, headers=[("Content-Length", str(size))]))
            if req.method == b"HEAD":
                await send(h11.EndOfMessage())
                return True
            piece = b"x" * 65536
            left = size
            while left:
                await send(h11.Data(data=piece[: min(left, len(piece))]))
                left -= min(left, len(piece))
            await send(h11.EndOfMessage())
            return True
        else:
            body = f"hello from {self.name}".encode()
        await send(
            h11.Response(status_code=200, headers=[("Content-Length", str(len(body))),
                                                   ("X-Backend", self.name)]),
            h11.Data(data=body), h11.EndOfMessage(),
        )  # fmt: skip
        return True


async def _next(conn: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        assert not isinstance(event, type(h11.PAUSED))
        return event  # type: ignore[return-value]


async def ws_echo(stream: trio.SocketStream) -> None:
    """A WebSocket echo server (wsproto does the handshake too)."""
    conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    try:
        while True:
            data = await stream.receive_some(65536)
            conn.receive_data(data or None)
            for event in conn.events():
                if isinstance(event, ws.Request):
                    await stream.send_all(conn.send(ws.AcceptConnection()))
                elif isinstance(event, ws.TextMessage):
                    await stream.send_all(conn.send(ws.Message(data="echo: " + event.data)))
                elif isinstance(event, ws.CloseConnection):
                    await stream.send_all(conn.send(event.response()))
                    return
            if not data:
                return
    finally:
        await stream.aclose()


async def tcp_echo(stream: trio.SocketStream) -> None:
    """Echo bytes until end of stream, then half-close our side too."""
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


def route(id: str, domain: str, path: str = "/", app: str = "app1", **kw: object) -> RouteSpec:
    return RouteSpec(id=id, app_id=app, type="http", domain=domain, path=path,
                     app_name=kw.pop("app_name", app), **kw)  # type: ignore[arg-type]  # fmt: skip


def table_of(routes: list[RouteSpec], backends: dict[tuple[str, str], list[str]]) -> RouteTable:
    return RouteTable.build(
        routes,
        {svc: [Backend(f"job-{i}-{a}", a) for i, a in enumerate(addrs)] for svc, addrs in backends.items()},
    )  # fmt: skip


async def start_router(
    nursery: trio.Nursery, table: RouteTable, config: ProxyConfig | None = None
) -> tuple[Router, Watched[RouteTable], int]:
    watched = Watched(table)
    router = Router(watched, address=LOCAL, http_port=0, config=config, seed=1)
    port = await nursery.start(router.run)
    return router, watched, port


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send `data`, half-close, and read until the router closes (or `timeout`)."""
    stream = await trio.open_tcp_stream(LOCAL, port)
    out = bytearray()
    with trio.fail_after(timeout):
        await stream.send_all(data)
        try:
            await stream.send_eof()
            while chunk := await stream.receive_some(65536):
                out += chunk
        except trio.BrokenResourceError:
            pass
    await stream.aclose()
    return bytes(out)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a state predicate until it holds, failing after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 -- polls plain state that has no event to wait on
            await trio.sleep(0.005)
