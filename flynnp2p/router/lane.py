"""The HTTP fast lane: plain-HTTP keep-alive requests served by one reactor task.

Theory of operation
-------------------
A trio task per connection pays trio's scheduling on every wait: an epoll
registration change, a task switch and a resume through the coroutine chain,
twice per proxied request (FACTS.md measured that overhead, not parsing, as
what bounds a trio proxy). Here one task owns a private ``select.epoll``: it
waits with one `trio.lowlevel.wait_readable` on the epoll's own fd, takes
every ready socket of the batch with ``poll(0)`` and runs plain callbacks.
Sockets are registered edge-triggered; a read that fills less than its buffer
has drained the socket (the next byte brings a new edge), so no read ends in
EAGAIN on the common path.

The lane serves only the common case and hands everything else to the task
path (`proxy.ClientConnection.serve`), which has every feature: a request that
has a body, is not idempotent, asks for an upgrade or 100-continue, or whose
route redirects, is
sticky, has no backend, or whose chosen backend has no idle pooled connection;
any refusal or error of the parser; a backend that fails before its response
head reached the client (the task path then retries it, as it would its own).
A handed-off connection comes back to the lane when the task path has answered
its request and nothing of the next one is read (`adopt`).

What the lane does for a request it keeps is what `ClientConnection` does, with
the same code where it can: the connection's own httptools parser and event
queue, the upstream connection's `_ResponseSide`, `http1` for the heads, the
balancer and the pool, `Stats`. A response the client cannot take at once is
held (one pending buffer) and the upstream is not read until the client has
taken it: flow control as on the task path.

A head that is plain and all there in one read (a request the lane can serve,
a response with its whole ``Content-Length`` body) is read by `plainhead` in
one pass, without a parser callback per header; the parser has then seen none
of that message, as if it had read it. Anything else is fed to the parser as
it always was, which accepts or refuses it.

A wakeup through trio costs more Python than a small request (its run loop,
the coroutine chain, an ``epoll_ctl`` to re-arm): at one request at a time
each request would pay two (the request, then the response). So after a batch
the lane waits on its own epoll (``poll`` with a timeout: the kernel sleeps,
no CPU is spent) for up to `BURST_SECONDS` from the trio wakeup and runs what
comes, and only then gives trio its turn back: the ping-pong of a keep-alive
client and its backend is served by one trio wakeup per burst. The price is
bounded: other tasks of the router wait at most `BURST_SECONDS` (plus one
batch) longer for their turn. That is only for a router that has its process
to itself (a router worker sets `Shared.lane_burst`): in the agent's process
(``--router-workers 0``) the lane never blocks the loop the API, the state
service and serf share, and gives trio its turn back after every batch.

A backend that turns lost (`lost`) has the lane's request to it, if none of
its response came back yet, handed to the task path as a failed attempt, as
when the backend closes the connection: the task path retries it elsewhere.

Timeouts stay with the router's sweeper: a lane connection's ``timer`` is a
`_Timer` whose ``cancel`` (what the sweeper calls at ``expires_at``) answers
like the task path (408 in a head, 504 with a router log line while waiting
for a response head) and closes.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable

import trio

from flynnp2p.router import http1, plainhead
from flynnp2p.router.http1 import IDEMPOTENT, REQUEST_ID_RE
from flynnp2p.router.proxy import (
    BODY,
    END,
    HEAD,
    LOST,
    ClientConnection,
    Shared,
    _ResponseSide,
)  # fmt: skip
from flynnp2p.router.sock import RECV_SIZE, Sock
from flynnp2p.router.table import BY_PATH, Backend, RouteSpec, Target

_IN = select.EPOLLIN | select.EPOLLOUT | select.EPOLLET
_READ = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
BURST_SECONDS = 0.001  # how long one turn of the lane may wait on its own epoll
_SLOW = object()  # `_start`'s answer for a request the task path must serve


class _Timer:
    """What the sweeper cancels for a connection in the lane, and what its request
    in flight is registered as (`lost.InFlight`) while it waits on a backend."""

    __slots__ = ("lane", "st")

    def __init__(self, lane: Lane, st: _State) -> None:
        self.lane, self.st = lane, st

    def cancel(self) -> None:
        self.lane.expired(self.st)

    def backend_lost(self, address: str) -> None:
        self.lane.backend_lost(self.st)


class _State:
    """A client connection in the lane, and its request in flight, if any."""

    __slots__ = (
        "backend",
        "conn",
        "fd",
        "framing",
        "fresh",
        "head",
        "interim",
        "keep",
        "pending",
        "readable",
        "resp",
        "rid",
        "route",
        "side",
        "start",
        "timer",
        "up",
        "up_fd",
        "up_readable",
    )  # fmt: skip

    def __init__(self, conn: ClientConnection, fd: int) -> None:
        self.conn = conn
        self.fd = fd
        self.readable = True  # not known to be drained (edge-triggered)
        self.up: Sock | None = None
        self.up_fd = -1
        self.up_readable = False
        self.side: _ResponseSide | None = None
        self.head: http1.RequestHead | None = None
        self.resp: http1.ResponseHead | None = None
        self.backend: Backend | None = None
        self.route: RouteSpec | None = None
        self.rid = b""  # the request id, and when the request started (monotonic seconds)
        self.start = 0.0
        self.framing = "none"
        self.keep = False
        self.fresh = False  # nothing of the response read yet (see `plainhead`)
        self.pending: memoryview | None = None  # response bytes the client has not taken
        self.interim = 0  # 1xx responses before this one
        self.timer: _Timer | None = None


class Lane:
    """The reactor. `handoff(conn)` must start the task path for `conn` (the
    router's nursery); `closed()` is called once per connection the lane closes."""

    def __init__(self, sh: Shared, handoff: Callable[[ClientConnection], None]) -> None:
        self.sh = sh
        self.handoff_to_task = handoff
        self.ep = select.epoll()
        self.clients: dict[int, _State] = {}
        self.uploads: dict[int, _State] = {}  # upstream fd -> the state waiting on it
        self.kept = 0  # requests the lane proxied itself
        self.handed = 0  # requests handed to the task path
        self.turns = 0  # trio wakeups of the lane
        self.bursts = 0  # waits on the lane's own epoll within them (`Shared.lane_burst`)

    @property
    def count(self) -> int:
        """Client connections in the lane now."""
        return len(self.clients)

    def status(self) -> dict[str, int]:
        return {"connections": self.count, "kept": self.kept, "handed": self.handed,
                "turns": self.turns, "bursts": self.bursts}  # fmt: skip

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        ep = self.ep
        clients, uploads = self.clients, self.uploads
        clock = time.monotonic
        try:
            while True:
                await trio.lowlevel.wait_readable(ep.fileno())
                self.turns += 1
                burst = self.sh.lane_burst
                until = clock() + burst
                events = ep.poll(0, 256)
                while events:
                    for fd, ev in events:
                        st = clients.get(fd)
                        if st is not None:
                            if ev & select.EPOLLOUT and st.pending is not None:
                                self._flush(st)
                            if ev & _READ:
                                st.readable = True
                                self._read_client(st)
                            continue
                        st = uploads.get(fd)
                        if st is not None:
                            st.up_readable = True
                            if st.pending is None:
                                self._read_upstream(st)
                    if burst <= 0:
                        break  # (trio wakes the lane again while its epoll has events)
                    left = until - clock()
                    if left <= 0:
                        break
                    self.bursts += 1
                    events = ep.poll(left, 256)  # the burst: see the module's docstring
        finally:
            for st in list(clients.values()):
                self._close(st)
            ep.close()

    # -- client connections ------------------------------------------------------------

    def add(self, raw: socket.socket, client_ip: str, port: int) -> None:
        """Take a newly accepted plain-HTTP connection."""
        conn = ClientConnection(self.sh, Sock(raw), client_ip, "http", port)
        conn.lane = self
        self.sh.live.add(conn)
        self.adopt(conn)

    def adopt(self, conn: ClientConnection) -> None:
        """Take (back) a connection that has no request in flight."""
        sock = conn.sock
        assert isinstance(sock, Sock)
        fd = sock.sock.fileno()
        st = _State(conn, fd)
        conn.timer = st.timer = _Timer(self, st)  # type: ignore[assignment]
        conn.phase, conn.expires_at = "idle", self.sh.now() + conn.cfg.idle_timeout
        self.clients[fd] = st
        self.ep.register(fd, _IN)
        if conn.events:
            self._dispatch(st)
        else:
            self._read_client(st)

    def _read_client(self, st: _State) -> None:
        conn = st.conn
        raw = conn.sock.sock  # type: ignore[attr-defined]
        while st.readable and st.up is None and st.fd in self.clients:
            try:
                data = raw.recv(RECV_SIZE)
            except BlockingIOError:
                st.readable = False
                return
            except OSError:
                self._close(st)
                return
            if len(data) < RECV_SIZE:
                st.readable = False
            if not data:
                if conn.begun or conn.events:
                    self._handoff(st)  # the task path answers an early end (it reads EOF again)
                else:
                    self._close(st)
                return
            if not conn.begun and not conn.events and not conn.dead:
                # A plain head, all there, is read without parser callbacks
                # (`plainhead`); the parser has seen none of it, as if it had.
                cfg = conn.cfg
                head = plainhead.request(
                    data, cfg.max_request_line, cfg.max_header_bytes, cfg.max_headers
                )
                if head is not None:
                    if self._start(st, head) is _SLOW:
                        conn.events.append((HEAD, head))
                        conn.events.append((END, None))
                        self._handoff(st)
                        return
                    continue
                now = conn.begun_at = self.sh.now()
            else:
                now = self.sh.now()
            conn._feed(data)
            if conn.begun:  # a head under way: the header timeout runs
                conn.phase = "head"
                conn.expires_at = (conn.begun_at or now) + conn.cfg.header_timeout
            self._dispatch(st)

    def _dispatch(self, st: _State) -> None:
        """Start the next queued request, or hand the connection off."""
        conn = st.conn
        while conn.events and st.up is None and st.fd in self.clients:
            kind, head = conn.events[0]
            if (
                kind != HEAD or conn.dead or head.has_body or head.upgrade is not None
                or head.expect_continue or head.version not in ("1.0", "1.1")
                or len(conn.events) < 2 or conn.events[1][0] != END
            ):  # fmt: skip
                self._handoff(st)
                return
            if self._start(st, head) is _SLOW:
                self._handoff(st)
                return
            conn.events.popleft()
            conn.events.popleft()

    def _handoff(self, st: _State) -> None:
        """The task path serves this connection from its queued events on."""
        self.handed += 1
        conn = st.conn
        self._forget(st)
        conn.timer = trio.CancelScope()
        self.handoff_to_task(conn)

    def _forget(self, st: _State) -> None:
        if self.clients.pop(st.fd, None) is not None:
            with contextlib.suppress(OSError):
                self.ep.unregister(st.fd)

    def _close(self, st: _State) -> None:
        conn = st.conn
        if st.up is not None:
            self._drop_upstream(st)
        if st.fd in self.clients:
            self._forget(st)
        self.sh.live.discard(conn)
        conn.sock.close()

    # -- one request -------------------------------------------------------------------

    def _start(self, st: _State, head: http1.RequestHead) -> object:
        sh = self.sh
        if not head.host or head.method not in IDEMPOTENT:
            return _SLOW  # (a failed attempt is tried again: only requests that allow it)
        table = sh.table.value
        target = table.by_host(head.host)
        if target is BY_PATH:
            target = table.lookup_http(head.host.decode("latin-1"), head.path)
        if target is None:
            return _SLOW
        assert isinstance(target, Target)
        route, backends = target.route, target.backends
        if route.https_only or route.sticky or not backends:
            return _SLOW
        now = sh.now()
        backend = sh.balancer.choose(backends, now)
        if backend is None:
            return _SLOW
        up = sh.pool.take_nowait(backend.address, now)
        if up is None:
            return _SLOW  # the task path connects (and pools the connection after)
        rid = head.request_id
        if rid is None or REQUEST_ID_RE.fullmatch(rid) is None:
            rid = sh.new_request_id()
        conn = st.conn
        up_head = http1.upstream_request(
            head, client_ip=conn.ip, proto_port=conn.proto_port, request_id=rid,
            start_ms=sh.wall_ms(),
        )  # fmt: skip
        raw = up.sock
        try:
            sent = raw.send(up_head)
        except OSError:
            sent = -1
        if sent != len(up_head):  # a pooled connection the backend closed: the task path retries
            up.close()
            conn.failed_attempt = ("H13", backend, 0.0, 0.0)
            return _SLOW
        side = up.parser
        if not isinstance(side, _ResponseSide):
            side = up.parser = _ResponseSide()
        side.messages = 0
        fd = side.lane_fd
        if fd < 0:  # registered once for the connection's life
            fd = side.lane_fd = raw.fileno()
            self.ep.register(fd, select.EPOLLIN | select.EPOLLET)
        st.up, st.up_fd, st.side, st.head, st.backend, st.route = up, fd, side, head, backend, route
        st.resp, st.up_readable, st.interim, st.rid, st.start = None, False, 0, rid, now
        st.fresh = head.method != "HEAD"  # (a response to HEAD has no body: the parser's)
        self.uploads[fd] = st
        sh.balancer.acquire(backend.address)
        assert st.timer is not None
        sh.inflight.add(backend.address, st.timer)
        conn.phase = "response-head"
        conn.expires_at = now + conn.cfg.response_header_timeout
        self.kept += 1
        return None

    def _read_upstream(self, st: _State) -> None:
        """Read the response while the client takes it (one receive at a time)."""
        side = st.side
        while st.up is not None and st.up_readable and st.pending is None:
            assert side is not None
            raw = st.up.sock
            try:
                data = raw.recv(RECV_SIZE)
            except BlockingIOError:
                st.up_readable = False
                break
            except OSError:
                self._upstream_failed(st) if st.resp is None else self._close(st)
                return
            if len(data) < RECV_SIZE:
                st.up_readable = False
            if st.fresh:
                st.fresh = False
                got = plainhead.response(data)
                if got is not None:
                    self._relay_plain(st, got[0], data, got[1])
                    return
            if not data:
                resp = st.resp
                if resp is None:
                    self._upstream_failed(st)
                    return
                if st.framing not in ("close", "chunked") or resp.chunked or resp.content_length is not None:
                    self._close(st)  # truncated: close the client's connection too
                    return
                side.events.append((END, None))
            else:
                try:
                    side.parser.feed_data(data)
                except Exception:  # httptools.HttpParserError, an upgrade nobody asked for
                    side.events.clear()
                    self._upstream_failed(st, "H17") if st.resp is None else self._close(st)
                    return
            out = bytearray()
            done = False
            for kind, value in side.events:
                if kind == HEAD:
                    if 100 <= value.status < 200:
                        if value.status == 101:  # no upgrade was asked for (see _dispatch)
                            side.events.clear()
                            self._upstream_failed(st, "H17")
                            return
                        st.interim += 1
                        continue  # interim responses stop here
                    st.resp = value
                    assert st.head is not None
                    st.framing, st.keep = st.conn._framing(st.head, value)
                    out += http1.client_response(
                        value, body_framing=st.framing, keep_alive=st.keep,
                        client_version=st.head.version, request_id=st.rid,
                    )  # fmt: skip
                    st.conn.phase = "response-body"
                    if st.framing == "none":
                        done = True
                        break
                elif st.resp is None:
                    continue
                elif kind == BODY:
                    out += http1.chunk(value) if st.framing == "chunked" else value
                else:
                    if st.framing == "chunked":
                        out += http1.LAST_CHUNK
                    done = True
                    break
            side.events.clear()
            if out and not self._send_client(st, out):
                return
            if done:
                resp, head = st.resp, st.head
                assert resp is not None and head is not None
                self._finish(st, (
                    resp.keep_alive and head.method != "HEAD" and side.messages == 1 + st.interim
                    and (resp.chunked or resp.content_length is not None or resp.status in (204, 304))
                ))  # fmt: skip
                return
            st.conn.expires_at = self.sh.now() + st.conn.cfg.idle_timeout

    def _relay_plain(self, st: _State, resp: http1.ResponseHead, data: bytes, body: int) -> None:
        """A whole response read in one, its head plain (`plainhead`): out at once."""
        head = st.head
        assert head is not None
        st.resp, st.framing, st.keep = resp, "length", head.keep_alive
        out = http1.client_response(
            resp, body_framing="length", keep_alive=head.keep_alive, client_version=head.version,
            request_id=st.rid,
        ) + data[body:]  # fmt: skip
        if self._send_client(st, out):
            self._finish(st, resp.keep_alive)

    def _send_client(self, st: _State, out: bytes | bytearray) -> bool:
        """Send what can go now; hold the rest (the upstream is then not read).
        False if the client is gone (closed)."""
        raw = st.conn.sock.sock  # type: ignore[attr-defined]
        try:
            sent = raw.send(out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(st)
            return False
        if sent < len(out):
            st.pending = memoryview(out)[sent:]
        return True

    def _flush(self, st: _State) -> None:
        raw = st.conn.sock.sock  # type: ignore[attr-defined]
        view = st.pending
        assert view is not None
        try:
            sent = raw.send(view)
        except BlockingIOError:
            return
        except OSError:
            self._close(st)
            return
        if sent < len(view):
            st.pending = view[sent:]
            return
        st.pending = None
        st.conn.expires_at = self.sh.now() + st.conn.cfg.idle_timeout
        if st.up is not None:  # the response goes on
            self._read_upstream(st)
        elif not st.keep or st.conn.dead:
            self._close(st)
        else:
            self._dispatch(st)
            self._read_client(st)

    def _finish(self, st: _State, reusable: bool) -> None:
        """The response is complete (maybe not all sent yet: `pending`); `reusable`:
        the upstream connection may go back to the pool."""
        sh, conn, resp, route = self.sh, st.conn, st.resp, st.route
        assert resp is not None and route is not None
        now = sh.now()
        sh.stats.record(route.app_name or route.app_id, resp.status, now - st.start)
        self._drop_upstream(st, reusable, now)
        if not st.keep or conn.dead:
            if st.pending is None:
                self._close(st)
            else:
                st.keep = False  # closed once the pending bytes are sent
            return
        conn.phase, conn.expires_at = "idle", now + conn.cfg.idle_timeout
        if st.pending is None:  # (each call only when it has something to do)
            if conn.events:
                self._dispatch(st)
            if st.readable:
                self._read_client(st)

    def _drop_upstream(self, st: _State, reuse: bool = False, now: float = 0.0) -> None:
        up, backend = st.up, st.backend
        assert up is not None and backend is not None
        self.uploads.pop(st.up_fd, None)
        self.sh.balancer.release(backend.address)
        assert st.timer is not None
        self.sh.inflight.discard(backend.address, st.timer)
        if reuse:
            self.sh.pool.put(backend.address, up, now)
        else:
            up.close()
        st.up, st.up_fd, st.side, st.backend = None, -1, None, None

    def _upstream_failed(self, st: _State, code: str = "H13") -> None:
        """Before anything reached the client: the task path tries again, this as its
        first attempt (`code` as `logline` names it, or `proxy.LOST`: its retry line
        says so)."""
        conn, head, backend = st.conn, st.head, st.backend
        assert backend is not None
        conn.failed_attempt = (code, backend, 0.0, self.sh.now() - st.start)
        self._drop_upstream(st)
        assert head is not None
        conn.events.appendleft((END, None))
        conn.events.appendleft((HEAD, head))
        self._handoff(st)

    def backend_lost(self, st: _State) -> None:
        """The backend of the request in flight is lost (`lost`): before any of its
        response came back, the task path tries it again (the lane's requests are all
        idempotent and bodiless), this as its first attempt; after, it goes on."""
        if st.fd in self.clients and st.up is not None and st.resp is None:
            self._upstream_failed(st, LOST)

    def expired(self, st: _State) -> None:
        if st.fd not in self.clients:
            return
        conn, route = st.conn, st.route
        if st.up is not None and st.resp is None and route is not None and st.head is not None:
            # what the task path keeps for its timeout's answer and log line
            assert st.backend is not None
            conn.current = (route.app_name or route.app_id, st.start, st.rid)
            conn.attempt = (st.head, route.app_name, st.backend, 0.0, st.start)
        conn._timed_out()  # 408 in a head, 504 (and its log line) awaiting a response
        self._close(st)
