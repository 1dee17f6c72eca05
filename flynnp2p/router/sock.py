"""Non-blocking sockets driven directly by trio's readiness waits (the I/O seam).

Why not `trio.SocketStream`: each of its operations costs a trip through the
scheduler (a checkpoint even when the kernel has the bytes), and on the
router's per-request path that overhead, not parsing, is most of the CPU (see
FACTS.md). Here an operation first tries the system call and only waits
(`wait_readable`/`wait_writable`) when the kernel says it would block, so a
send to a socket with room in its buffer costs one system call. To stay fair to
other tasks and responsive to cancellation, a `Sock` that has not had to wait
for `FAIR_OPS` operations yields once with a checkpoint.

One task may receive and another send on the same `Sock` (a tunnel does); two
tasks must not receive at once (trio raises `BusyResourceError`).

Tunnels (TCP routes, upgraded HTTP connections) copy each direction with
`recv`/`sendall` until a single read brings `SPLICE_AFTER` bytes or more: that
direction is bulk, and if both ends are plain `Sock`s it goes on with
`os.splice` through a pipe of its own (socket → pipe → socket, no copy through
Python: about half the CPU per byte, FACTS.md). Small-message relays never pay
for the pipe; TLS ends (`TlsSock`) always copy. `COUNTERS` has the bytes moved
each way for the router's status and the tests.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

RECV_SIZE = 65536  # 64 KiB or less doubled body throughput against 256 KiB (FACTS.md)
FAIR_OPS = 16
SPLICE_AFTER = 32768  # a read this big marks a direction as bulk
SPLICE_CHUNK = 1 << 20  # bytes asked of one splice; the pipe is grown to match
_SPLICE = hasattr(os, "splice")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass
class TunnelCounters:
    """Bytes tunnels moved, by how (process-wide)."""

    copied: int = 0
    spliced: int = 0


COUNTERS = TunnelCounters()


class ConnectError(OSError):
    """Connecting to a backend failed (refused, unreachable) or timed out."""

    def __init__(self, address: str, why: str, timed_out: bool = False) -> None:
        super().__init__(f"connect to {address}: {why}")
        self.timed_out = timed_out


class Stream(Protocol):
    """What a connection is to the proxy: a `Sock`, or TLS over one
    (`flynnp2p.router.tls.TlsSock`)."""

    closed: bool

    async def recv(self, size: int = RECV_SIZE) -> bytes: ...

    async def sendall(self, data: bytes | bytearray | memoryview) -> None: ...

    def send_nowait(self, data: bytes) -> None: ...

    def shutdown_write(self) -> None: ...

    def close(self) -> None: ...


class Sock:
    """`parser`: whoever reads this connection may keep its parser here (the proxy
    keeps an upstream connection's response parser with it in the pool)."""

    __slots__ = ("_budget", "closed", "parser", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.closed = False
        self.parser: object | None = None
        self._budget = FAIR_OPS

    async def recv(self, size: int = RECV_SIZE) -> bytes:
        """Up to `size` bytes; b"" at end of stream. Raises OSError on a reset."""
        sock = self.sock
        while True:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                self._budget = FAIR_OPS
                await trio.lowlevel.wait_readable(sock)
                continue
            self._budget -= 1  # (inlined: this is the per-request path)
            if self._budget <= 0:
                self._budget = FAIR_OPS
                await trio.lowlevel.checkpoint()
            return data

    async def recv_later(self, size: int = RECV_SIZE) -> bytes:
        """`recv` for bytes that cannot be there yet (an answer to what was just
        sent): wait for readiness first, and save the system call and the
        BlockingIOError a first try would cost."""
        self._budget = FAIR_OPS
        await trio.lowlevel.wait_readable(self.sock)
        return await self.recv(size)

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)  # most sends take everything at once
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            view = memoryview(data)[sent:]
            while view:
                try:
                    sent = sock.send(view)
                except BlockingIOError:
                    self._budget = FAIR_OPS
                    await trio.lowlevel.wait_writable(sock)
                    continue
                view = view[sent:]
        self._budget -= 1
        if self._budget <= 0:
            self._budget = FAIR_OPS
            await trio.lowlevel.checkpoint()

    def send_nowait(self, data: bytes) -> None:
        """Best effort, never blocks (an error page on a connection being dropped)."""
        with contextlib.suppress(OSError):
            self.sock.send(data)

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


async def connect(host: str, port: int, address: str) -> Sock:
    """Connect to a numeric `host`:`port`, or raise ConnectError (the caller bounds the time)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    s = Sock(raw)
    try:
        err = raw.connect_ex((host, port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            await trio.lowlevel.wait_writable(raw)
            err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectError(address, errno.errorcode.get(err, str(err)))
    except BaseException:
        s.close()
        raise
    return s


async def pipe(src: Stream, dst: Stream, moved: Callable[[], None] = lambda: None) -> None:
    """Copy bytes from `src` to `dst` until end of stream, then half-close `dst`;
    `moved` is called after every chunk. A bulk direction between two `Sock`s
    goes on with `splice` (see the module's docstring)."""
    can_splice = _SPLICE and isinstance(src, Sock) and isinstance(dst, Sock)
    try:
        while True:
            data = await src.recv()
            if not data:
                return
            await dst.sendall(data)
            COUNTERS.copied += len(data)
            moved()
            if can_splice and len(data) >= SPLICE_AFTER:
                assert isinstance(src, Sock) and isinstance(dst, Sock)
                await splice(src, dst, moved)
                return
    finally:
        dst.shutdown_write()


async def splice(src: Sock, dst: Sock, moved: Callable[[], None] = lambda: None) -> None:
    """Move bytes from `src` to `dst` through a pipe until end of stream (the caller
    half-closes `dst`). Each round fills the empty pipe from `src` and drains it
    into `dst` completely, so the pipe is never read from and written to at
    once and a slow `dst` holds back `src` (flow control, as with a copy)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a bigger pipe is fewer system calls
            fcntl.fcntl(w, _F_SETPIPE_SZ, SPLICE_CHUNK)
        s_in, s_out = src.sock, dst.sock
        fd_in, fd_out = s_in.fileno(), s_out.fileno()
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        budget = FAIR_OPS
        while True:
            try:
                n = os.splice(fd_in, w, SPLICE_CHUNK, flags=flags)
            except BlockingIOError:
                budget = FAIR_OPS
                await trio.lowlevel.wait_readable(s_in)
                continue
            if n == 0:
                return
            left = n
            while left:
                try:
                    left -= os.splice(r, fd_out, left, flags=flags)
                except BlockingIOError:
                    budget = FAIR_OPS
                    await trio.lowlevel.wait_writable(s_out)
            COUNTERS.spliced += n
            moved()
            budget -= 1
            if budget <= 0:
                budget = FAIR_OPS
                await trio.lowlevel.checkpoint()
    finally:
        os.close(r)
        os.close(w)


async def tunnel(a: Stream, b: Stream, idle_s: float = math.inf) -> None:
    """Bytes both ways until both directions have ended (half-close is passed on),
    or until nothing has moved either way for `idle_s` (a half-open peer must not
    hold two sockets forever): every chunk moves the deadline on."""
    with trio.CancelScope(deadline=trio.current_time() + idle_s) as idle:

        def moved() -> None:
            idle.deadline = trio.current_time() + idle_s

        async def one_way(src: Stream, dst: Stream) -> None:
            try:
                await pipe(src, dst, moved)
            except OSError:  # a reset ends both directions
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_way, a, b)
            nursery.start_soon(one_way, b, a)
