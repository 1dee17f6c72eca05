"""Health checks: the gate between a job's process running and the job being ``up``.

Theory of operation
-------------------
A ``HealthCheck`` (``flynnp2p.state.records``) says how to ask a job whether it is
serving: ``tcp`` means a TCP connect to the job's port succeeds; ``http`` means a
``GET`` of ``path`` answers 2xx or 3xx. ``probe`` asks once, bounded by
``timeout_ms``, and returns ``None`` on success or a short reason a person can read
in ``flynnp2p ps`` ("connection refused", "timed out after 2.0s", "HTTP 503 from
/health"). It never raises for anything the job does wrong.

``wait_healthy`` probes until ``threshold`` probes in a row pass. The first probe is
immediate (a job re-adopted after an agent restart is usually up already); after
that the wait between probe starts is 50 ms and doubles up to ``interval_ms``
(probes at 0, 0.05, 0.15, 0.35, 0.75 s, ...), so a job that binds its port 200 ms
after start is seen up at 350 ms, not at the first full interval, and a slow starter
is not probed more than once per interval for long. A caller that knows the job has
just started passes ``fast_for_s`` (the host passes ``FAST_FOR_S``): for that long
the wait stays 50 ms (a probe of a port nobody listens on yet is one refused
connect), and only then doubles. Without it, a job that binds its port at 1.6 s, as
a Flask app importing its modules for the first time does on a busy host, would be
seen up at the 3.15 s probe; with it, at 1.65 s. The whole wait is bounded by
``boot_timeout_s``: past it, ``HealthTimeout`` carries the last failure reason. When
the caller passes ``is_alive``, it is asked before every probe, after every probe and
at least every ``ALIVE_POLL_S`` while waiting, so a job that exits during boot is
reported as "process exited" at once rather than after ``boot_timeout_s``.

The HTTP exchange is h11 (sans-I/O) over any ``trio.abc.Stream``; only the response
status is read, and h11 bounds how many bytes that may take.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable

import h11
import trio

from flynnp2p.state.records import HealthCheck

FIRST_DELAY_S = 0.05  # wait after the first probe; doubles up to the check's interval
FAST_FOR_S = 10.0  # how long the host probes a job it just started every FIRST_DELAY_S
TCP_SETTLE_S = 0.05  # how long an accepted probe connection must stay open
ALIVE_POLL_S = 0.1  # how often ``is_alive`` is asked while waiting between probes
USER_AGENT = "flynnp2p-health/1"
_RECEIVE_BYTES = 4096

Prober = Callable[[HealthCheck, str, int], Awaitable[str | None]]
"""The shape of ``probe``; ``wait_healthy`` takes another one in tests."""


class HealthTimeout(Exception):
    """A job did not become healthy; ``reason`` says why, for the job's state.

    Raised by ``wait_healthy`` only; the host turns it into a failed job, so it never
    reaches the API and is not part of the ``flynnp2p.errors`` tree.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def probe(check: HealthCheck, host: str, port: int) -> str | None:
    """Probe ``host:port`` once as ``check`` says; ``None`` if healthy, else why not."""
    if check.type not in ("tcp", "http"):
        raise ValueError(f"health check type must be 'tcp' or 'http', got {check.type!r}")
    timeout_s = check.timeout_ms / 1000
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return describe_os_error(exc)
        async with stream:
            if check.type == "tcp":
                return await settled(stream)
            return await probe_http_stream(stream, host_header(host, port), check.path or "/")
    return f"timed out after {timeout_s}s"


async def settled(stream: trio.abc.Stream) -> str | None:
    """A connect alone can lie: Docker's userland proxy accepts on the published port
    and closes at once while nothing listens in the container yet.  A server that
    is up keeps the connection open (or greets): EOF within ``TCP_SETTLE_S`` fails."""
    with trio.move_on_after(TCP_SETTLE_S):
        try:
            data = await stream.receive_some(1)
        except trio.BrokenResourceError:
            return "connection reset at once"
        if not data:
            return "connection closed at once (nothing listening yet?)"
    return None


async def probe_http_stream(stream: trio.abc.Stream, host: str, path: str) -> str | None:
    """Send ``GET path`` with ``Host: host`` on ``stream``; ``None`` on a 2xx/3xx status."""
    conn = h11.Connection(our_role=h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[("Host", host), ("User-Agent", USER_AGENT), ("Connection", "close")],
    )
    head, end = conn.send(request), conn.send(h11.EndOfMessage())
    assert head is not None and end is not None  # only ConnectionClosed sends nothing
    try:
        await stream.send_all(head + end)
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                if 200 <= event.status_code < 400:
                    return None
                return f"HTTP {event.status_code} from {path}"
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_RECEIVE_BYTES)
                if not data:
                    return "connection closed before a response"
                conn.receive_data(bytes(data))
            # else an InformationalResponse (1xx): the final status follows
    except h11.RemoteProtocolError as exc:
        return f"bad HTTP response: {exc}"
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        return describe_os_error(cause) if isinstance(cause, OSError) else "connection broken"


async def wait_healthy(
    check: HealthCheck,
    host: str,
    port: int,
    *,
    boot_timeout_s: float = 60.0,
    is_alive: Callable[[], bool] | None = None,
    prober: Prober = probe,
    fast_for_s: float = 0.0,
) -> None:
    """Return once ``check.threshold`` probes in a row pass; see the module docstring.

    Raises ``HealthTimeout`` with the last failure reason after ``boot_timeout_s``,
    or with "process exited" as soon as ``is_alive()`` is false. For ``fast_for_s``
    from the start, probes start every ``FIRST_DELAY_S`` (then the back-off).
    """
    interval_s = check.interval_ms / 1000
    delay_s = min(FIRST_DELAY_S, interval_s)
    last_reason = f"no probe finished within {boot_timeout_s}s"
    passes = 0
    with trio.move_on_after(boot_timeout_s):
        next_at = trio.current_time()
        fast_until = next_at + fast_for_s
        while True:
            await _sleep_until(next_at, is_alive)
            started = trio.current_time()
            reason = await prober(check, host, port)
            # A dead process explains a failed probe better than "connection refused",
            # and a passing probe then is someone else's socket.
            if is_alive is not None and not is_alive():
                raise HealthTimeout("process exited")
            if reason is None:
                passes += 1
                if passes >= check.threshold:
                    return
            else:
                passes = 0
                last_reason = reason
            next_at = started + delay_s
            if next_at >= fast_until:  # past the fast start: back off to the interval
                delay_s = min(delay_s * 2, interval_s)
    raise HealthTimeout(last_reason)


async def _sleep_until(deadline: float, is_alive: Callable[[], bool] | None) -> None:
    if is_alive is None:
        await trio.sleep_until(deadline)
        return
    while True:
        await trio.sleep_until(min(deadline, trio.current_time() + ALIVE_POLL_S))
        if not is_alive():
            raise HealthTimeout("process exited")
        if trio.current_time() >= deadline:
            return


def host_header(host: str, port: int) -> str:
    """The ``Host`` header value for ``host:port`` (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_os_error(exc: OSError) -> str:
    """A short lower-case reason for a failed connect, send or receive."""
    cause = exc.__cause__
    if isinstance(cause, ExceptionGroup):
        # trio.open_tcp_stream wraps one error per address it tried.
        reasons = sorted({describe_os_error(e) for e in cause.exceptions if isinstance(e, OSError)})
        if reasons:
            return "; ".join(reasons)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return str(exc)
