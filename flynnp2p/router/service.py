"""The router service: HTTP and HTTPS listeners, the TCP route listeners kept in step
with the table.

`Router.run` binds the HTTP listener, reports its port through
``task_status.started``, then serves until cancelled. The agent owns the
`Watched[RouteTable]` and sets a new table whenever the state changes (built by
`flynnp2p.router.build.table_from_state`); each request reads
``table.value`` once, so a swap needs no lock and applies to the next request.

A reconciler task watches the table: it opens a listener for every TCP route
port that appears and closes the ones whose route went away (their open
connections are left to finish), and drops pooled connections to backends
that left the table. A TCP port that cannot be bound is reported in `status`
and tried again on the next table change.

In a router worker (`flynnp2p.router.worker`) the router binds nothing: the
agent holds the listening sockets and hands them over (`HandedListeners`), so
they outlive the worker; its TCP route listeners then follow the agent's
`TcpChange` messages, in order, instead of the table's ports.

The router's lines in apps' logs (`applog.RouterLog`) are written by a task of
the router's nursery; without a writer (``log=None``) they are not kept.
"""

from __future__ import annotations

import errno
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from flynnp2p.router.applog import RouterLog
from flynnp2p.router.balance import Balancer
from flynnp2p.router.lane import Lane
from flynnp2p.router.proxy import ClientConnection, Pool, ProxyConfig, Shared, connect_backend
from flynnp2p.router.sock import ConnectError, Sock, Stream, tunnel
from flynnp2p.router.stats import Stats
from flynnp2p.router.table import RouteTable, backends_status
from flynnp2p.router.tls import CertStore, TlsSock
from flynnp2p.watch import Watched

ACCEPT_BATCH = 64


def listen_socket(address: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket on `address`:`port` (0: any free port)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # router workers: the kernel spreads connections over their listeners
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((address, port))
        s.listen(1024)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


@dataclass(frozen=True)
class TcpChange:
    """Stop accepting on the `close` ports, then serve the `open` listeners."""

    close: Sequence[int]
    open: Mapping[int, socket.socket]


@dataclass(frozen=True)
class HandedListeners:
    """Listening sockets bound by the agent, for a router in a worker (module doc).

    The router owns these descriptors (it closes them when done with them);
    every `TcpChange` sent on `tcp` is applied, in order."""

    http: socket.socket
    https: socket.socket | None
    tcp: trio.MemoryReceiveChannel[TcpChange]


class Router:
    """HTTP and TCP routes of the cluster, served on `address`.

    `table`: the route table, swapped by its owner (the agent) at any time.
    `log`: where the router's lines for apps' logs go.
    `http_port`: 0 picks a free port (tests); the bound port is what
    ``await nursery.start(router.run)`` returns.
    `reuse_port`: bind every listener with SO_REUSEPORT, so that several router
    processes can share the ports.
    `handed`: serve these listeners instead of binding any (see the module doc).
    `fast_lane`: plain-HTTP connections are served by `lane.Lane` (one reactor
    task) and handed to a task per connection only for what the lane leaves out.
    """

    def __init__(
        self,
        table: Watched[RouteTable],
        *,
        address: str = "127.0.0.1",
        http_port: int = 8080,
        config: ProxyConfig | None = None,
        seed: int | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        log: RouterLog | None = None,
        https_port: int | None = None,
        certs: CertStore | None = None,
        sticky_key: bytes | None = None,
        reuse_port: bool = False,
        fast_lane: bool = True,
        handed: HandedListeners | None = None,
    ) -> None:
        self.table = table
        self.handed = handed
        self.reuse_port = reuse_port
        self.address = address
        self.http_port = http_port
        # HTTPS when both are given: `certs` picks each handshake's certificate by SNI.
        self.https_port = https_port if certs is not None else None
        self.certs = certs
        self.config = config or ProxyConfig()
        rng = random.Random(seed)
        self.shared = Shared(
            table=table, cfg=self.config, balancer=Balancer(rng, self.config.skip_seconds),
            pool=Pool(self.config), stats=Stats(), rng=rng,
            wall_ms=lambda: int(wall_clock() * 1000), now=clock,
            log=log or RouterLog(wall_ms=lambda: int(wall_clock() * 1000)),
        )  # fmt: skip
        if sticky_key is not None:  # the cluster's: a cookie is good on every node
            self.shared.sticky_key = sticky_key
        self.by_tasks = 0  # connections served by a task (the fast lane counts its own)
        self.tcp_listeners: dict[int, trio.CancelScope] = {}
        self.tcp_errors: dict[int, str] = {}
        self.bound_port: int | None = None
        self.bound_https_port: int | None = None
        self.tls_failures = 0  # handshakes that failed or timed out
        self.failed = "http"
        self.lane: Lane | None = None
        self.fast_lane = fast_lane

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self.failed = "http"  # which listener a bind error (OSError) is about
        handed = self.handed
        listener = handed.http if handed else listen_socket(self.address, self.http_port, self.reuse_port)
        secure = None
        try:
            self.bound_port = listener.getsockname()[1]
            if self.https_port is not None:
                self.failed = "https"
                secure = handed.https if handed else listen_socket(self.address, self.https_port, self.reuse_port)
                assert secure is not None, "an HTTPS port without its handed listener"
                https_port: int = secure.getsockname()[1]
                self.bound_https_port = self.shared.https_port = https_port
            async with trio.open_nursery() as nursery:
                await nursery.start(self.shared.log.run)
                nursery.start_soon(self._serve_http, listener, "http", self.bound_port)
                if secure is not None:
                    nursery.start_soon(self._serve_http, secure, "https", https_port)
                nursery.start_soon(self._reconcile_tcp, nursery)
                if handed is not None:
                    nursery.start_soon(self._follow_handed_tcp, handed.tcp, nursery)
                nursery.start_soon(self._sweep_timeouts)
                task_status.started(self.bound_port)
        finally:
            for sock in (listener, secure):
                if sock is not None:
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
            self.shared.pool.close_all()

    async def current_status(self) -> dict[str, object]:
        """`status`, as `/v1/router/status` asks for it (workers answer over a pipe)."""
        return self.status()

    def status(self) -> dict[str, object]:
        """What `/v1/router/status` will show for this node."""
        now = self.shared.now()
        table = self.table.value
        return {
            "listeners": {
                "http": self.bound_port, "https": self.bound_https_port, "tcp": sorted(self.tcp_listeners)
            },
            "tls": {
                **(self.certs.status() if self.certs is not None else {}),
                "handshake_failures": self.tls_failures,
            },
            "tcp_errors": dict(sorted(self.tcp_errors.items())),
            "connections": self.connections,
            "lane": self.lane.status() if self.lane is not None else None,
            "routes": len(table.routes),
            **backends_status(table),
            "balancer": self.shared.balancer.status(now),
            "pool": self.shared.pool.counts(),
            "apps": self.shared.stats.as_dict(),
            "log": self.shared.log.status(),
        }

    async def _sweep_timeouts(self) -> None:
        live = self.shared.live
        while True:
            await trio.sleep(self.config.timer_tick)
            now = self.shared.now()
            for conn in [c for c in live if c.expires_at <= now]:
                conn.timer.cancel()
            self.shared.balancer.expire(now)

    # -- accepting -----------------------------------------------------------------------

    async def _accept_loop(
        self, listener: socket.socket, handle: Callable[[socket.socket, str], Awaitable[None]],
        nursery: trio.Nursery, take: Callable[[socket.socket, str], None] | None = None,
    ) -> None:  # fmt: skip
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, peer = listener.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        await trio.sleep(0.05)  # out of descriptors: let connections finish
                        break
                    if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue
                    raise
                if self.connections >= self.config.max_connections:
                    conn.close()
                    continue
                if take is not None:
                    take(conn, peer[0])
                else:
                    nursery.start_soon(handle, conn, peer[0])
            await trio.lowlevel.checkpoint()

    async def _serve_http(self, listener: socket.socket, proto: str, port: int) -> None:
        async def handle(conn: socket.socket, peer_ip: str) -> None:
            self.by_tasks += 1
            try:
                stream: Stream = Sock(conn)
                if proto == "https":
                    assert self.certs is not None
                    stream = TlsSock(Sock(conn), self.certs.default)
                    try:
                        await stream.handshake()
                    except (ssl.SSLError, OSError, trio.TooSlowError):
                        self.tls_failures += 1  # a scanner, plain HTTP, a wrong name: not ours
                        stream.close()
                        return
                await ClientConnection(self.shared, stream, peer_ip, proto, port).serve()
            finally:
                self.by_tasks -= 1

        async def by_task(conn: ClientConnection) -> None:  # handed off by the lane
            self.by_tasks += 1
            try:
                await conn.serve()
            finally:
                self.by_tasks -= 1

        async with trio.open_nursery() as nursery:
            if proto == "http" and self.fast_lane:
                lane = self.lane = Lane(self.shared, lambda c: nursery.start_soon(by_task, c))
                nursery.start_soon(lane.run)
                await self._accept_loop(listener, handle, nursery,
                                        lambda conn, ip: lane.add(conn, ip, port))  # fmt: skip
            else:
                await self._accept_loop(listener, handle, nursery)

    @property
    def connections(self) -> int:
        """Client connections open now, HTTP, HTTPS and TCP."""
        return self.by_tasks + (self.lane.count if self.lane is not None else 0)

    # -- TCP routes ----------------------------------------------------------------------

    async def _reconcile_tcp(self, nursery: trio.Nursery) -> None:
        version = -1
        while True:
            version, table = await self.table.wait_change(version)
            if self.handed is None:  # (handed listeners follow the agent's messages)
                self._bind_tcp(table.tcp_ports, nursery)
            keep = {b.address for bs in table.backends.values() for b in bs}
            self.shared.pool.prune(keep, table.silent)  # (silent hosts: see `Pool.silent`)
            self.shared.inflight.prune(keep)
            self.shared.inflight.abort_lost(table)  # what waits on a lost job: given up (lost.py)

    def _bind_tcp(self, wanted: frozenset[int], nursery: trio.Nursery) -> None:
        for port in sorted(set(self.tcp_listeners) - wanted):
            self.tcp_listeners.pop(port).cancel()
        self.tcp_errors = {p: e for p, e in self.tcp_errors.items() if p in wanted}
        for port in sorted(wanted - set(self.tcp_listeners)):
            try:
                listener = listen_socket(self.address, port, self.reuse_port)
            except OSError as e:
                self.tcp_errors[port] = str(e)
                continue
            self.tcp_errors.pop(port, None)
            self._start_tcp(listener, port, nursery)

    def _start_tcp(self, listener: socket.socket, port: int, nursery: trio.Nursery) -> None:
        scope = trio.CancelScope()
        self.tcp_listeners[port] = scope
        nursery.start_soon(self._serve_tcp, listener, port, scope)

    async def _follow_handed_tcp(
        self, changes: trio.MemoryReceiveChannel[TcpChange], nursery: trio.Nursery
    ) -> None:
        async for change in changes:
            for port in change.close:
                scope = self.tcp_listeners.pop(port, None)
                if scope is not None:
                    scope.cancel()
            for port, listener in change.open.items():
                if (old := self.tcp_listeners.pop(port, None)) is not None:
                    old.cancel()  # (the agent closes a port first: this is for safety)
                listener.setblocking(False)
                self._start_tcp(listener, port, nursery)

    async def _serve_tcp(self, listener: socket.socket, port: int, scope: trio.CancelScope) -> None:
        async def handle(conn: socket.socket, peer_ip: str) -> None:
            self.by_tasks += 1
            try:
                await self._proxy_tcp(Sock(conn), port)
            finally:
                self.by_tasks -= 1

        try:
            async with trio.open_nursery() as conns:
                with scope:
                    await self._accept_loop(listener, handle, conns)
                # the route went away: stop accepting, let open connections finish
                trio.lowlevel.notify_closing(listener)
                listener.close()
        finally:
            if self.tcp_listeners.get(port) is scope:
                del self.tcp_listeners[port]
            if listener.fileno() != -1:
                trio.lowlevel.notify_closing(listener)
                listener.close()

    async def _proxy_tcp(self, client: Sock, port: int) -> None:
        sh = self.shared
        tried: list[str] = []
        try:
            for _ in range(self.config.max_tries):
                target = self.table.value.lookup_tcp(port)
                if target is None:
                    return
                backend = sh.balancer.choose(target.backends, self.shared.now(), tried)
                if backend is None:
                    return
                tried.append(backend.address)
                try:
                    up = await connect_backend(sh, backend)
                except ConnectError:
                    continue
                sh.balancer.acquire(backend.address)
                try:
                    await tunnel(client, up, self.config.tunnel_idle_timeout)
                finally:
                    sh.balancer.release(backend.address)
                    up.close()
                return
        finally:
            client.close()
