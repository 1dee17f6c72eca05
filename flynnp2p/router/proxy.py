"""The HTTP/1.1 reverse proxy: one task per client connection.

Theory of operation
-------------------
`ClientConnection.serve` reads the client's bytes into an ``httptools`` request
parser whose callbacks queue events (head, body piece, end, error). One
request at a time is taken off the queue and proxied; requests pipelined behind
it wait in the queue and in the kernel's buffer, so responses go out in order.
At most one receive (64 KiB) of parsed events is queued: memory per connection
is bounded, and bodies are streamed both ways with the sockets' own flow
control (a send waits until the peer has room).

For each request: route lookup → backend choice (`Balancer`, power of two
choices) → an idle pooled upstream connection or a new one → the rebuilt head
and the body → the upstream response parsed by a fresh ``httptools`` response
parser and re-framed to the client (``Content-Length`` passed on, otherwise
chunked, or close-delimited for HTTP/1.0 clients). A request body is uploaded
by a second task while the response is relayed, so a backend that answers
early or streams its answer back is never blocked behind the upload (a body
left unread then closes the client connection). The upstream connection goes
back to the pool only after a complete request and response that allow it.

Failure rules:

* connect refused/timed out: the backend is skipped on this node for
  ``skip_seconds`` and the request goes to another (``max_tries`` in all);
* the backend closed or reset before answering: retried on another only if the
  request is idempotent and bodiless, else 502. When that connection came from
  the pool, the connection failed, not the backend (it closed an idle connection
  as the request went out): the retry may go to the same backend, on a new
  connection. The fast lane hands such a failure of its own to the task path as
  the first attempt (`ClientConnection.failed_attempt`), so both write the same
  retry line;
* no response head in ``response_header_timeout``: 504 and close;
* the backend turned lost (a new table names it in `RouteTable.lost`: its host is
  gone) before any of its response came back: given up at once (`lost`); retried
  on another backend of the current table only if idempotent and bodiless
  (an H13 retry line), else 504 with an H12 line "Backend lost". A draining
  (``stopping``) backend only leaves the table: what it was sent, it answers;
* anything the parser refuses (ambiguous framing, bad chunk sizes, bare LF,
  obs-fold, oversize): 400/413/414/431 and close, upstream connection dropped
  if a head was already sent, so nothing smuggled reaches a backend.

Every 5xx the router answers itself, and every retry, is also a line in the app's
log (`logline` has the codes, `applog.RouterLog` writes them off this path).

Timeouts: each connection has one cancel scope and an ``expires_at`` time that it
moves as it goes from phase to phase; the router's sweeper task cancels the
scopes of expired connections every ``timer_tick``. (Moving a trio deadline, or
a scope per read, cost more than parsing the request.) When the scope is
cancelled, ``phase`` says what to answer.
"""

from __future__ import annotations

import math
import os
import random
import select
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httptools
import trio

from flynnp2p.router import http1, sticky
from flynnp2p.router.applog import RouterLog
from flynnp2p.router.balance import Balancer
from flynnp2p.router.http1 import RequestHead, ResponseHead, https_location
from flynnp2p.router.logline import RouterEvent
from flynnp2p.router.lost import InFlight
from flynnp2p.router.sock import ConnectError, Sock, Stream, connect, tunnel
from flynnp2p.router.stats import Stats
from flynnp2p.router.table import Backend, RouteSpec, RouteTable
from flynnp2p.watch import Watched

if TYPE_CHECKING:
    from flynnp2p.router.lane import Lane


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout: float = 5.0
    response_header_timeout: float = 60.0
    idle_timeout: float = 60.0  # keep-alive wait, and a stalled body in either direction
    header_timeout: float = 10.0  # first byte of a request to the end of its head
    tunnel_idle_timeout: float = 3600.0
    max_request_line: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_body: int = 1 << 34  # 16 GiB
    max_tries: int = 3
    skip_seconds: float = 5.0
    pool_idle_per_backend: int = 64
    pool_idle_seconds: float = 30.0
    max_connections: int = 20000
    timer_tick: float = 0.25  # timeouts fire up to this late


POOL_SWEEP_S = 0.005  # how often the pool looks for connections their backends closed
_READABLE = select.POLLIN | select.POLLPRI  # (POLLHUP and POLLERR come regardless)


class Pool:
    """Idle upstream connections per backend address (newest reused first).

    A connection its backend closed must not be taken: a request sent on it fails,
    and a POST cannot be retried. A backend closes idle connections after its
    keep-alive timeout, and all of them at once when it dies, however briefly they
    were idle. Asking each connection before reuse (a peek: a system call and an
    exception, ~9 us a request in the router bench) cost more than the rest of
    the pool; so `take_nowait` sweeps instead, at most every `POOL_SWEEP_S`: one
    poll(2) over every idle connection, and those with an end of stream, an error
    or stray bytes are closed (~3.5 us a request at wrk -c64, the sweep's cost
    shared by the requests of 5 ms). A connection closed within the last sweep
    interval can still go out once (a bodiless GET is then retried on a new
    connection; a POST is answered 502)."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.idle: dict[str, list[tuple[Sock, float]]] = {}
        # Addresses on hosts that stopped answering heartbeats (`RouteTable.silent`):
        # a cut-off host sends no FIN, so a connection to it looks idle and healthy,
        # and a request written on it would hang. Never reused while silent.
        self.silent: frozenset[str] = frozenset()
        self.swept_at = -math.inf

    def take_nowait(self, address: str, now: float) -> Sock | None:
        if address in self.silent:
            self.prune_address(address)
            return None
        if now - self.swept_at >= POOL_SWEEP_S:
            self.sweep(now)
        stack = self.idle.get(address)
        while stack:
            sock, since = stack.pop()
            if now - since < self.cfg.pool_idle_seconds:
                return sock
            sock.close()
        return None

    def sweep(self, now: float) -> None:
        """Close the idle connections their peers closed (or sent stray bytes on)."""
        self.swept_at = now
        poller = select.poll()
        count = 0
        for stack in self.idle.values():
            for sock, _ in stack:
                poller.register(sock.sock, _READABLE)
                count += 1
        if not count:
            return
        ready = {fd for fd, _ in poller.poll(0)}
        if not ready:
            return
        for address, stack in self.idle.items():
            keep = []
            for sock, since in stack:
                if sock.sock.fileno() in ready:
                    sock.close()
                else:
                    keep.append((sock, since))
            self.idle[address] = keep

    def put(self, address: str, sock: Sock, now: float) -> None:
        stack = self.idle.setdefault(address, [])
        if len(stack) >= self.cfg.pool_idle_per_backend:
            sock.close()
        else:
            stack.append((sock, now))

    def prune(self, keep: set[str], silent: frozenset[str] = frozenset()) -> None:
        """Close the idle connections to addresses not in `keep` or in `silent`, and
        reuse none to `silent` ones until the next prune."""
        self.silent = silent
        for address in [a for a in self.idle if a not in keep or a in silent]:
            self.prune_address(address)

    def prune_address(self, address: str) -> None:
        for sock, _ in self.idle.pop(address, ()):
            sock.close()

    def close_all(self) -> None:
        self.prune(set())

    def counts(self) -> dict[str, int]:
        return {a: len(s) for a, s in sorted(self.idle.items()) if s}


@dataclass
class Shared:
    """What every connection of one router reads: the table and this node's view."""

    table: Watched[RouteTable]
    cfg: ProxyConfig
    balancer: Balancer
    pool: Pool
    stats: Stats
    rng: random.Random
    wall_ms: Callable[[], int]
    now: Callable[[], float]  # monotonic seconds: timeouts, latencies, passive-health marks
    log: RouterLog = field(default_factory=RouterLog)  # router lines in apps' logs
    https_port: int | None = None  # where https_only routes redirect plain HTTP
    sticky_key: bytes = field(default_factory=lambda: os.urandom(32))  # one per cluster: see sticky
    # How long the fast lane may wait on its own epoll per turn (lane.py): 0 unless the
    # router has its process to itself (a router worker), never in the agent's loop.
    lane_burst: float = 0.0
    live: set[ClientConnection] = field(default_factory=set)  # for the timeout sweeper
    inflight: InFlight = field(default_factory=InFlight)  # by backend: given up if it is lost

    def new_request_id(self) -> bytes:
        return b"%032x" % self.rng.getrandbits(128)


HEAD, BODY, END, ERROR, EOF = range(5)
Event = tuple[int, Any]


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing (the reason is in `error`)."""


class _ClientGone(Exception):
    pass


async def connect_backend(sh: Shared, backend: Backend) -> Sock:
    """A connection to `backend` within the connect timeout; on failure it is marked
    down on this node (skipped for a while) and ConnectError raised."""
    host, port = backend.host_port
    try:
        with trio.move_on_after(sh.cfg.connect_timeout):
            return await connect(host, port, backend.address)
        raise ConnectError(backend.address, "timed out", timed_out=True)
    except ConnectError:
        sh.balancer.mark_down(backend.address, sh.now())
        raise


def _done(uploaded: bool | Callable[[], bool]) -> bool:
    """Whether the request (head and body) has been sent upstream completely."""
    return uploaded() if callable(uploaded) else uploaded


class _UpstreamFailed(Exception):
    """The backend failed this request; `code` is the log's name for how (`logline`)."""

    def __init__(self, why: str, code: str = "H13") -> None:
        super().__init__(why)
        self.why = why
        self.code = code


# An attempt given up because its backend is lost (`lost`): its retry line is an H13's,
# its error line (504) an H12 with this description.
LOST, LOST_DESC = "lost", "Backend lost"


def _label(backend: Backend) -> str:
    return f"{backend.job_id}@{backend.address}"


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class _ResponseSide:
    """Callbacks of one upstream connection's response parser. It lives as long as
    the connection (``Sock.parser``, pooled with it): a connection goes back to the
    pool only after a complete response, where the parser is ready for the next."""

    __slots__ = ("_head", "events", "lane_fd", "messages", "on_header", "parser")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lane_fd = -1  # the fd registered with the fast lane's epoll (lane.py), if any
        self.messages = 0
        self._head = http1.HeadBuilder(http1.RESPONSE_SPECIAL)
        self.on_header = self._head.add
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.messages += 1  # (more than one in an exchange: interim 1xx responses)
        self._head.reset()

    def on_headers_complete(self) -> None:
        p = self.parser
        head = ResponseHead.build(p.get_status_code(), p.should_keep_alive(), self._head)
        self.events.append((HEAD, head))

    def on_body(self, body: bytes) -> None:
        self.events.append((BODY, body))

    def on_message_complete(self) -> None:
        self.events.append((END, None))


class ClientConnection:
    def __init__(self, shared: Shared, sock: Stream, client_ip: str, proto: str, port: int) -> None:
        self.sh = shared
        self.cfg = shared.cfg
        self.sock = sock
        self.client_ip = client_ip
        self.proto = proto
        self.port = port
        self.events: deque[Event] = deque()
        self.dead = False  # the parser stopped: error, end of stream or upgrade
        self.error: tuple[int, str] | None = None
        self.upgrade_extra = b""
        self.lane: Lane | None = None  # the fast lane this connection goes back to (lane.py)
        self.answered = False  # a response went out and nothing of the next request is read
        self._recv_later = sock.recv_later if isinstance(sock, Sock) else sock.recv
        self.begun = False  # a request has begun and its head is not complete
        self.begun_at: float | None = None
        self.timer = trio.CancelScope()  # cancelled by the router's sweeper at expires_at
        self.expires_at = float("inf")
        self.phase = "idle"
        self.current: tuple[str, float, bytes] | None = None  # app, start, request id
        # the request in flight and its backend, for a timeout's log line:
        # head, app name, backend, connect seconds, when the request was sent
        self.attempt: tuple[RequestHead, str, Backend, float, float] | None = None
        self.upstream: Sock | None = None
        self.attempt_scope: trio.CancelScope | None = None  # an attempt `backend_lost` may give up
        # an attempt of the fast lane's that failed before anything reached the client:
        # code, backend, connect seconds, failed after (seconds); the task path retries it
        self.failed_attempt: tuple[str, Backend, float, float] | None = None
        self.set_cookie = b""  # a sticky route's Set-Cookie line for this response
        self.proto_port = b"X-Forwarded-Proto: %s\r\nX-Forwarded-Port: %d\r\n" % (proto.encode(), port)
        self.ip = client_ip.encode()
        self._url = b""
        self._head = http1.HeadBuilder(http1.REQUEST_SPECIAL, self.cfg.max_header_bytes,
                                       self.cfg.max_headers)  # fmt: skip
        self.on_header = self._head.add  # the parser calls it directly: no wrapper on the hot path
        self.parser = httptools.HttpRequestParser(self)  # last: it looks its callbacks up now

    # -- parser callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._head.reset()
        self.begun = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.cfg.max_request_line:
            self.error = (414, "the request target is too long")
            raise _Refused

    def on_headers_complete(self) -> None:
        p = self.parser
        method = p.get_method()
        head = RequestHead.build(http1.METHODS.get(method) or method.decode("ascii"), self._url,
                                 p.get_http_version(), p.should_keep_alive(), self._head)  # fmt: skip
        self.begun = False
        self.begun_at = None
        self.events.append((HEAD, head))

    def on_body(self, body: bytes) -> None:
        self.events.append((BODY, body))

    def on_message_complete(self) -> None:
        self.events.append((END, None))

    # -- reading -----------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgrade_extra = data[e.args[0] :]
            self.dead = True
        except httptools.HttpParserError as e:
            if self._head.error is not None:
                self.error = (431, f"request {self._head.error}")
            self.events.append((ERROR, self.error or (400, f"malformed request: {e}")))
            self.dead = True

    async def _next(self, phase: str) -> Event:
        recv = self.sock.recv
        while not self.events:
            if self.dead:
                return EOF, None
            now = self.sh.now()
            if phase != "head":
                self.expires_at = now + self.cfg.idle_timeout
            elif not self.begun:
                self.phase, self.expires_at = "idle", now + self.cfg.idle_timeout
                if self.answered:  # a keep-alive client sends its next request after our answer
                    self.answered = False
                    recv = self._recv_later
            else:
                if self.begun_at is None:
                    self.begun_at = now
                self.phase = "head"
                self.expires_at = self.begun_at + self.cfg.header_timeout
            try:
                data = await recv()
            except OSError:
                raise _ClientGone from None
            recv = self.sock.recv
            if not data:
                self.dead = True
                if self.begun or phase != "head":
                    return ERROR, (400, "the request ended early")
                return EOF, None
            self._feed(data)
        return self.events.popleft()

    async def _send(self, data: bytes | bytearray) -> None:
        try:
            await self.sock.sendall(data)
        except OSError:
            raise _ClientGone from None

    # -- the connection ----------------------------------------------------------------

    async def serve(self) -> None:
        self.sh.live.add(self)
        back = False
        try:
            with self.timer:
                back = await self._serve()
            if self.timer.cancelled_caught:
                self._timed_out()
        except _ClientGone:
            pass
        finally:
            if not back:
                self.sh.live.discard(self)
                if self.upstream is not None:
                    self.upstream.close()
                self.sock.close()
        if back:
            assert self.lane is not None
            self.lane.adopt(self)

    async def _serve(self) -> bool:
        """Serve requests until the connection ends; True when it goes back to the
        fast lane instead (`lane`: answered, nothing of the next request read)."""
        while True:
            kind, value = await self._next("head")
            if kind == EOF:
                return False
            if kind == ERROR:
                status, why = value
                await self._send(http1.simple_response(status, f"{status}: {why}\n", close=True))
                self.sh.stats.record("-", status, 0.0, by_router=True)
                return False
            if value.version not in ("1.0", "1.1"):
                await self._send(http1.simple_response(
                    505, "505: this router speaks HTTP versions 1.0 and 1.1 only\n", close=True))  # fmt: skip
                return False
            # the parser may have refused the body's framing right after the head:
            # answer that before anything reaches a backend
            # (an ERROR is queued only by a parser that stopped: `dead`)
            error = next((v for k, v in self.events if k == ERROR), None) if self.dead else None
            if error is not None and all(k in (BODY, ERROR) for k, _ in self.events):
                status, why = error
                await self._send(http1.simple_response(status, f"{status}: {why}\n", close=True))
                self.sh.stats.record("-", status, 0.0, by_router=True)
                return False
            if not value.has_body and self.events and self.events[0][0] == END:
                self.events.popleft()  # a bodiless request ends with its head
            if not await self._handle(value) or (self.dead and not self.events):
                return False
            self.answered = True
            if self.lane is not None and not self.events and not self.begun and self.upstream is None:
                return True

    def backend_lost(self, address: str) -> None:
        """The backend of the attempt in flight is lost (`lost`): give the attempt up
        unless a response has begun to come back (its head relayed: "response-body"),
        or the attempt has already failed (its upstream dropped)."""
        scope = self.attempt_scope
        if scope is not None and (
            self.phase == "connect"
            or (self.upstream is not None and self.phase in ("request-body", "response-head"))
        ):
            scope.cancel()

    def _timed_out(self) -> None:
        if self.phase == "head":
            self.sock.send_nowait(http1.simple_response(408, "408: the request head took too long\n", close=True))  # fmt: skip
        elif self.phase == "response-head" and self.current is not None:
            app, start, rid = self.current
            text = "504: the app did not answer in time\n"
            self.sock.send_nowait(http1.simple_response(504, text, close=True, request_id=rid))
            now = self.sh.now()
            self.sh.stats.record(app, 504, now - start, by_router=True)
            if self.attempt is not None:
                head, name, backend, connect_s, sent_at = self.attempt
                self._log(head, name, rid, "H12", backend, connect_s, now - sent_at, 504, len(text))

    def _log(
        self, head: RequestHead, app_name: str, rid: bytes, code: str, backend: Backend | None,
        connect_s: float = 0.0, service_s: float = 0.0, status: int = 0, nbytes: int = 0,
        retry: Backend | None = None, desc: str = "",
    ) -> None:  # fmt: skip
        """A router line for the app's log (queued: never blocks)."""
        if app_name:
            self.sh.stats.logged(app_name, code)
        self.sh.log.emit_nowait(app_name, RouterEvent(
            code, head.method, head.target.decode("latin-1"), head.host.decode("latin-1"),
            rid.decode("latin-1"), self.client_ip, self.proto,
            _label(backend) if backend is not None else "", _ms(connect_s), _ms(service_s),
            status, nbytes, _label(retry) if retry is not None else "", desc,
        ))  # fmt: skip

    async def _reply(
        self, head: RequestHead, app: str, start: float, rid: bytes, status: int, text: str,
        extra: http1.Headers = (),  # type: ignore[assignment]
        close: bool = False,
    ) -> bool:  # fmt: skip
        """A response of the router's own; the connection is kept only if nothing of
        the request is left unread."""
        keep = head.keep_alive and not close and not head.has_body and head.upgrade is None
        await self._send(http1.simple_response(status, text, close=not keep, request_id=rid, extra=extra))  # fmt: skip
        self.sh.stats.record(app, status, self.sh.now() - start, by_router=status >= 500)
        return keep

    async def _handle(self, head: RequestHead) -> bool:
        sh, cfg = self.sh, self.cfg
        failed, self.failed_attempt = self.failed_attempt, None  # (this request's only)
        start = self.sh.now()
        rid = head.request_id if head.request_id and http1.valid_request_id(head.request_id) \
            else sh.new_request_id()  # fmt: skip
        host = head.host.decode("latin-1")
        if head.method == "CONNECT":
            return await self._reply(head, "-", start, rid, 405, "405: CONNECT is not supported\n", close=True)  # fmt: skip
        if not host and head.version != "1.0":
            return await self._reply(head, "-", start, rid, 400, "400: a Host header is required\n", close=True)  # fmt: skip
        table = sh.table.value
        route = table.route_http(host, head.path)
        if route is None:
            return await self._reply(head, "-", start, rid, 404, http1.not_found_page(host))
        app = route.app_name or route.app_id
        if route.https_only and self.proto == "http":
            location = https_location(head.host, head.target, sh.https_port)
            return await self._reply(head, app, start, rid, 308, "308: this app is served over HTTPS\n",
                                     extra=[(b"Location", location)])  # fmt: skip
        if head.content_length is not None and head.content_length > cfg.max_body:
            return await self._reply(head, app, start, rid, 413, f"413: the body exceeds {cfg.max_body} bytes\n", close=True)  # fmt: skip
        backends = table.backends.get(route.service, ())
        if not backends and (failed is None or failed[0] != LOST):  # (lost: _proxy answers it)
            page = http1.unavailable_page(app, route.process_type)
            self._log(head, route.app_name, rid, "H10", None, status=503, nbytes=len(page.encode()))
            return await self._reply(head, app, start, rid, 503, page)
        self.current = (app, start, rid)
        up_head = http1.upstream_request(
            head, client_ip=self.ip, proto_port=self.proto_port, request_id=rid,
            start_ms=sh.wall_ms(),
        )  # fmt: skip
        return await self._proxy(head, route, backends, up_head, app, start, rid, failed)

    async def _proxy(
        self, head: RequestHead, route: RouteSpec, backends: tuple[Backend, ...], up_head: bytes,
        app: str, start: float, rid: bytes, failed: tuple[str, Backend, float, float] | None = None,
    ) -> bool:  # fmt: skip
        """`failed`: the fast lane's attempt, on a pooled connection, if it made one
        (see the module's docstring); it counts as the first of the tries."""
        sh, cfg = self.sh, self.cfg
        tried: list[str] = []
        renew: set[str] = set()  # backends whose pooled connection just failed: connect anew
        why = "no backend could be reached"
        timed_out = False
        # the attempt that failed last: code, backend, connect seconds, failed after (seconds)
        tries = cfg.max_tries
        if failed is not None:
            tries -= 1
            (renew.add if failed[0] == "H13" else tried.append)(failed[1].address)
            if failed[0] == LOST:
                why = f"{failed[1].address}: the backend is lost"
        pinned = sticky.job_of(head.lines, sh.sticky_key, route.id) if route.sticky else None
        for _ in range(tries):
            now = self.sh.now()
            backend = None
            if pinned is not None and not tried:  # the cookie's job, while it takes traffic
                backend = next(
                    (b for b in backends if b.job_id == pinned and sh.balancer.usable(b.address, now)),
                    None,
                )
            if backend is None:
                backend = sh.balancer.choose(backends, now, tried)
            if backend is None:
                break
            self.set_cookie = (
                sticky.set_cookie(sh.sticky_key, route.id, backend.job_id, self.proto == "https")
                if route.sticky and backend.job_id != pinned else b""
            )  # fmt: skip
            if failed is not None:
                sh.stats.retried(app)
                self._log(head, route.app_name, rid, "H13" if failed[0] == LOST else failed[0],
                          failed[1], failed[2], failed[3], retry=backend)  # fmt: skip
            address = backend.address
            tried.append(address)
            up = sh.pool.take_nowait(address, now) if address not in renew else None
            pooled = up is not None
            connect_s, sent_at = 0.0, now  # (a pooled connection: no second clock read)
            # What follows may be given up at once if the backend turns lost (`lost`):
            # `backend_lost` cancels this scope while nothing of a response came back.
            scope = self.attempt_scope = trio.CancelScope()
            sh.inflight.add(address, self)
            try:
                with scope:
                    if up is None:
                        self.phase = "connect"
                        self.expires_at = float("inf")
                        try:
                            up = await connect_backend(sh, backend)
                        except ConnectError as e:
                            why, timed_out = str(e), e.timed_out
                            failed = ("H19" if e.timed_out else "H21", backend, self.sh.now() - now, 0.0)
                            continue
                        sent_at = self.sh.now()
                        connect_s = sent_at - now
                    self.upstream = up
                    self.attempt = (head, route.app_name, backend, connect_s, sent_at)
                    sh.balancer.acquire(address)
                    try:
                        return await self._exchange(head, up_head, up, address, start, rid, app)
                    except _UpstreamFailed as e:
                        self.upstream = None
                        up.close()
                        why, timed_out = f"{address}: {e.why}", False
                        if self.dead and self.events and self.events[-1][0] == ERROR:
                            status, reason = self.events[-1][1]
                            return await self._reply(head, app, start, rid, status, f"{status}: {reason}\n", close=True)  # fmt: skip
                        failed = (e.code, backend, connect_s, self.sh.now() - sent_at)
                        if head.method not in http1.IDEMPOTENT or head.has_body:
                            break
                        if pooled and e.code == "H13":  # the connection failed, not the backend
                            tried.remove(address)
                            renew.add(address)
                        continue
                    finally:
                        sh.balancer.release(address)
            finally:
                sh.inflight.discard(address, self)
                self.attempt_scope = None
            # the scope was cancelled: the backend is lost (nothing of a response came back)
            assert scope.cancelled_caught
            self.upstream = None
            if up is not None:
                up.close()
            if self.phase == "response-body":  # (a head relayed as the cancel came): only closing is left
                raise _ClientGone
            why, timed_out = f"{address}: the backend is lost", False
            failed = (LOST, backend, connect_s, self.sh.now() - sent_at)
            if head.method not in http1.IDEMPOTENT or head.has_body:
                break
            backends = sh.table.value.backends.get(route.service, ())  # (the lost one has left)
        lost = failed is not None and failed[0] == LOST
        status = 504 if timed_out or lost else 502
        text = f"{status}: {why}\n"
        if failed is not None:
            code, backend, connect_s, service_s = failed
            self._log(head, route.app_name, rid, "H12" if lost else code, backend, connect_s,
                      service_s, status, len(text.encode()), desc=LOST_DESC if lost else "")  # fmt: skip
        return await self._reply(head, app, start, rid, status, text, close=head.has_body)

    async def _send_request(self, head: RequestHead, up_head: bytes, up: Sock) -> None:
        """Send the head and stream the body; raise _UpstreamFailed if the request
        cannot be completed (the reason for the client is then queued as ERROR)."""
        if not head.has_body:
            try:
                await up.sendall(up_head)
            except OSError as e:
                raise _UpstreamFailed(f"send: {e}") from None  # (H13: the head alone was lost)
            return
        self.phase = "request-body"
        out = bytearray(up_head)
        sent = 0
        chunked = head.chunked
        while True:
            # take what is already parsed without waiting, so small bodies go in one send
            while self.events and self.events[0][0] in (BODY, END) and len(out) < 65536:
                kind, value = self.events.popleft()
                if kind == END:
                    break
                sent += len(value)
                out += http1.chunk(value) if chunked else value
            else:
                kind = BODY
            if sent > self.cfg.max_body:
                self.events.append((ERROR, (413, f"the body exceeds {self.cfg.max_body} bytes")))
                self.dead = True
                raise _UpstreamFailed("request body too large")
            if kind == END and chunked:
                out += http1.LAST_CHUNK
            if out:
                try:
                    await up.sendall(out)
                except OSError as e:
                    raise _UpstreamFailed(f"send: {e}", "H18") from None
                out = bytearray()
            if kind == END:
                return
            ev = await self._next("body")
            if ev[0] in (ERROR, EOF):
                if ev[0] == EOF:
                    raise _ClientGone
                self.events.append(ev)
                raise _UpstreamFailed("the request body was refused")
            self.events.appendleft(ev)

    async def _exchange(
        self, head: RequestHead, up_head: bytes, up: Sock, address: str, start: float,
        rid: bytes, app: str,
    ) -> bool:  # fmt: skip
        """One request to `up` and its response back; whether the client connection stays."""
        if not head.has_body:
            await self._send_request(head, up_head, up)
            return await self._relay_response(head, up, address, start, rid, app, True)
        # A body is sent while the response is relayed: a backend may answer before it
        # has read it all (401, 413) or stream it back (echo), and must never wait on us.
        if head.expect_continue:
            await self._send(http1.CONTINUE)
        uploaded = False
        refused = client_gone = False

        async def upload() -> None:
            nonlocal uploaded, refused, client_gone
            try:
                await self._send_request(head, up_head, up)
                uploaded = True
                if self.phase != "response-body":  # a response already streaming keeps its idle timer
                    self.phase = "response-head"
                    self.expires_at = self.sh.now() + self.cfg.response_header_timeout
            except _UpstreamFailed:
                if self.dead and self.events and self.events[-1][0] == ERROR:
                    refused = True  # the client's body is bad: drop the exchange
                    nursery.cancel_scope.cancel()
                # else the backend stopped reading: its response, or its absence, decides
            except _ClientGone:
                client_gone = True
                nursery.cancel_scope.cancel()

        failure: Exception | None = None
        keep = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            try:
                keep = await self._relay_response(head, up, address, start, rid, app,
                                                  lambda: uploaded)  # fmt: skip
            except (_UpstreamFailed, _ClientGone) as e:
                failure = e
            nursery.cancel_scope.cancel()  # the response is complete: stop uploading
        if client_gone:
            raise _ClientGone
        if refused:
            if self.phase == "response-body":
                raise _ClientGone  # the response had begun: only closing is left
            raise _UpstreamFailed("the request body was refused")
        if failure is not None:
            raise failure
        return keep and uploaded  # a body left unread closes the client connection

    async def _relay_response(
        self, head: RequestHead, up: Sock, address: str, start: float, rid: bytes, app: str,
        uploaded: bool | Callable[[], bool],
    ) -> bool:  # fmt: skip
        cfg = self.cfg
        side = up.parser
        if not isinstance(side, _ResponseSide):
            side = up.parser = _ResponseSide()
        side.messages = 0
        self.phase = "response-head"
        self.expires_at = self.sh.now() + cfg.response_header_timeout
        resp: ResponseHead | None = None
        framing = "none"
        keep = False
        done = False
        interim = 0
        extra = b""
        out = bytearray()
        recv = up.recv_later  # nothing can be there before the backend has read the request
        while not done:
            try:
                data = await recv()
                recv = up.recv
            except OSError as e:
                if resp is None:
                    raise _UpstreamFailed(f"recv: {e}") from None
                raise _ClientGone from None  # cut mid-body: the client sees a short response
            if not data:
                if resp is None:
                    raise _UpstreamFailed("closed the connection without a response")
                if framing not in ("close", "chunked") or resp.chunked or resp.content_length is not None:
                    raise _ClientGone  # truncated: close the client's connection too
                side.events.append((END, None))  # a close-delimited body ends here
            else:
                try:
                    side.parser.feed_data(data)
                except httptools.HttpParserUpgrade as e:
                    extra = data[e.args[0] :]
                except httptools.HttpParserError as e:
                    if resp is None:
                        raise _UpstreamFailed(f"invalid response: {e}", "H17") from None
                    raise _ClientGone from None
            for kind, value in side.events:
                if kind == HEAD:
                    if 100 <= value.status < 200 and value.status != 101:
                        interim += 1
                        continue  # interim responses stop here (the router sent its own 100)
                    if value.status == 101 and (head.upgrade is None or not _done(uploaded)):
                        # Only an upgrade the client asked for, once its request is sent:
                        # a tunnel cannot share the client socket with a running upload.
                        raise _UpstreamFailed("answered 101 to a request that asked for no upgrade", "H17")
                    resp = value
                    framing, keep = self._framing(head, value)
                    if not _done(uploaded):
                        keep = False  # the client's body will be left unread: say so now
                    out += http1.client_response(
                        value, body_framing=framing, keep_alive=keep,
                        client_version=head.version, request_id=rid, extra=self.set_cookie,
                    )  # fmt: skip
                    self.phase = "response-body"
                    if framing == "none":
                        done = True
                        break
                elif resp is None:
                    continue  # the end of an interim response
                elif kind == BODY:
                    out += http1.chunk(value) if framing == "chunked" else value
                else:
                    if framing == "chunked":
                        out += http1.LAST_CHUNK
                    done = True
                    break
            side.events.clear()
            if out:
                await self._send(out)
                out = bytearray()
            self.expires_at = self.sh.now() + cfg.idle_timeout
        assert resp is not None
        self.sh.stats.record(app, resp.status, self.sh.now() - start)
        self.upstream = None
        self.current = None
        if resp.status == 101:
            await self._tunnel(up, extra)
            return False
        # Reused only after a complete, self-delimited response and nothing after it
        # (a second message would mean the backend sent more than it was asked).
        reusable = (
            resp.keep_alive and head.method != "HEAD" and side.messages == 1 + interim
            and (resp.chunked or resp.content_length is not None or resp.status in (204, 304))
        )  # fmt: skip
        if reusable and _done(uploaded):
            self.sh.pool.put(address, up, self.sh.now())
        else:
            up.close()
        return keep and not self.dead

    def _framing(self, head: RequestHead, resp: ResponseHead) -> tuple[str, bool]:
        """How the body goes to the client, and whether the connection stays open."""
        keep = head.keep_alive and head.upgrade is None
        if resp.status == 101:
            return "none", False
        if head.method == "HEAD" or resp.status in (204, 304):
            return "none", keep
        if resp.chunked:
            return "chunked", keep
        if resp.content_length is not None:
            return "length", keep
        if head.version == "1.1":
            return "chunked", keep
        return "close", False

    async def _tunnel(self, up: Sock, upstream_extra: bytes) -> None:
        """After a 101: the bytes that came with the heads, then both ways until done."""
        self.phase = "tunnel"
        self.expires_at = float("inf")
        try:
            if self.upgrade_extra:
                await up.sendall(self.upgrade_extra)
            if upstream_extra:
                await self.sock.sendall(upstream_extra)
            await tunnel(self.sock, up, self.cfg.tunnel_idle_timeout)
        except OSError:
            pass
        finally:
            up.close()
