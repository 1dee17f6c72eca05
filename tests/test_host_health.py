from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial

import h11
import pytest
import trio
import trio.testing

from flynnp2p.host.health import (
    FAST_FOR_S,
    HealthTimeout,
    Prober,
    describe_os_error,
    host_header,
    probe,
    probe_http_stream,
    wait_healthy,
)
from flynnp2p.state.records import HealthCheck

LOCAL = "127.0.0.1"
TCP = HealthCheck(type="tcp", interval_ms=100, timeout_ms=5_000)

# Real-socket tests are bounded by this so a hang fails instead of stalling the run;
# it is far above anything they need, even on a loaded machine.
GUARD_S = 30


def http(path: str = "/health", timeout_ms: int = 5_000) -> HealthCheck:
    return HealthCheck(type="http", path=path, interval_ms=100, timeout_ms=timeout_ms)


@contextmanager
def bound_not_listening() -> Iterator[socket.socket]:
    """A port that refuses connections for as long as the test holds it."""
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        yield sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


# -- one probe, real sockets -------------------------------------------------------


async def test_tcp_probe_is_refused_by_a_port_nobody_listens_on() -> None:
    with trio.fail_after(GUARD_S), bound_not_listening() as sock:
        assert await probe(TCP, LOCAL, port_of(sock)) == "connection refused"


async def test_tcp_probe_passes_once_the_port_listens() -> None:
    with trio.fail_after(GUARD_S), bound_not_listening() as sock:
        sock.listen()
        assert await probe(TCP, LOCAL, port_of(sock)) is None


Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """Run ``handler`` for every connection to a loopback port; yield the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOCAL))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def http_server(status: int, requests: list[h11.Request]) -> Handler:
    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(4096)))
        assert isinstance(event, h11.Request)
        requests.append(event)
        response = h11.Response(status_code=status, headers=[("Content-Length", "0")])
        await stream.send_all(conn.send(response) or b"")
        await stream.aclose()

    return handle


async def test_tcp_probe_fails_on_a_proxy_that_accepts_and_closes_at_once() -> None:
    async def close_at_once(stream: trio.SocketStream) -> None:  # docker-proxy, nothing behind
        await stream.aclose()

    async def greet(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 hello\r\n")
        await stream.aclose()

    with trio.fail_after(GUARD_S):
        async with serving(close_at_once) as port:
            reason = await probe(TCP, LOCAL, port)
            assert reason is not None and "at once" in reason
        async with serving(greet) as port:
            assert await probe(TCP, LOCAL, port) is None


@pytest.mark.parametrize(
    ("status", "expected"), [(200, None), (302, None), (503, "HTTP 503 from /health")]
)
async def test_http_probe_passes_on_2xx_and_3xx_only(status: int, expected: str | None) -> None:
    requests: list[h11.Request] = []
    with trio.fail_after(GUARD_S):
        async with serving(http_server(status, requests)) as port:
            got = await probe(http("/health"), LOCAL, port)
    assert got == expected
    [request] = requests
    assert (request.method, request.target) == (b"GET", b"/health")
    assert (b"host", f"{LOCAL}:{port}".encode()) in list(request.headers)


async def test_http_probe_times_out_on_a_server_that_never_answers() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(GUARD_S):
        async with serving(silent) as port:
            assert await probe(http(timeout_ms=100), LOCAL, port) == "timed out after 0.1s"
            # The same server passes a tcp check: it accepts.
            assert await probe(TCP, LOCAL, port) is None


# -- the HTTP exchange, memory streams ---------------------------------------------


async def exchange(response: list[bytes], path: str = "/ready") -> tuple[str | None, bytes]:
    """Run ``probe_http_stream`` against a peer that sends ``response`` in chunks."""
    client, server = trio.testing.memory_stream_pair()
    seen = bytearray()

    async def peer() -> None:
        while b"\r\n\r\n" not in seen:
            seen.extend(await server.receive_some())
        for chunk in response:
            await server.send_all(chunk)
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        reason = await probe_http_stream(client, "app.local:8080", path)
    return reason, bytes(seen)


async def test_http_request_is_a_get_with_host_header() -> None:
    reason, request = await exchange([b"HTTP/1.1 204 No Content\r\n\r\n"])
    assert reason is None
    lines = request.decode().split("\r\n")
    assert lines[0] == "GET /ready HTTP/1.1"
    assert "Host: app.local:8080" in lines


async def test_http_status_split_across_many_reads() -> None:
    raw = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
    reason, _ = await exchange([raw[i : i + 1] for i in range(len(raw))])
    assert reason == "HTTP 500 from /ready"


async def test_http_informational_response_is_skipped() -> None:
    reason, _ = await exchange([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\n\r\n"])
    assert reason == "HTTP 404 from /ready"


async def test_http_garbage_is_a_bad_response() -> None:
    reason, _ = await exchange([b"SSH-2.0-OpenSSH_9.6\r\n\r\n"])
    assert reason is not None and reason.startswith("bad HTTP response")


@pytest.mark.parametrize("response", [[], [b"HTTP/1.1 20"]])
async def test_http_close_before_a_full_status_line(response: list[bytes]) -> None:
    reason, _ = await exchange(response)
    assert reason == "connection closed before a response"


def test_host_header_brackets_ipv6() -> None:
    assert host_header("10.0.0.1", 80) == "10.0.0.1:80"
    assert host_header("::1", 8080) == "[::1]:8080"


def test_describe_os_error() -> None:
    assert describe_os_error(ConnectionResetError(104, "x")) == "connection reset by peer"
    group = OSError("all attempts failed")
    group.__cause__ = ExceptionGroup("all", [ConnectionRefusedError(111, "a")])
    assert describe_os_error(group) == "connection refused"
    assert describe_os_error(OSError("plain")) == "plain"
    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe_os_error(unknown) == "cannot resolve host: Name or service not known"


# -- wait_healthy, virtual time ----------------------------------------------------


class FakeProber:
    """Answers from a script (the last answer repeats) and records virtual probe times."""

    def __init__(self, *answers: str | None) -> None:
        self.answers = list(answers)
        self.times: list[float] = []
        self.t0 = trio.current_time()

    async def __call__(self, check: HealthCheck, host: str, port: int) -> str | None:
        self.times.append(trio.current_time() - self.t0)
        await trio.lowlevel.checkpoint()
        return self.answers[min(len(self.times), len(self.answers)) - 1]


def slow(interval_ms: int = 1_000, threshold: int = 1) -> HealthCheck:
    return HealthCheck(type="tcp", interval_ms=interval_ms, timeout_ms=500, threshold=threshold)


async def test_probes_back_off_from_50ms_to_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    prober = FakeProber(*["connection refused"] * 7, None)
    await wait_healthy(slow(1_000), LOCAL, 1, prober=prober)
    assert prober.times == pytest.approx([0, 0.05, 0.15, 0.35, 0.75, 1.55, 2.55, 3.55])
    assert trio.current_time() - prober.t0 == pytest.approx(3.55)


async def test_a_healthy_job_is_up_at_the_first_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    prober = FakeProber(None)
    await wait_healthy(slow(), LOCAL, 1, prober=prober)
    assert prober.times == [0]


async def test_a_slow_probe_delays_the_next_one_no_further(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times: list[float] = []
    t0 = trio.current_time()

    async def takes_300ms(check: HealthCheck, host: str, port: int) -> str | None:
        times.append(trio.current_time() - t0)
        await trio.sleep(0.3)
        return None if len(times) == 4 else "timed out after 0.3s"

    await wait_healthy(slow(), LOCAL, 1, prober=takes_300ms)
    # Gaps are measured start to start: 0.05 and 0.1 have passed when a probe ends.
    assert times == pytest.approx([0, 0.3, 0.6, 0.9])


async def test_threshold_counts_consecutive_passes_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    prober = FakeProber("refused", None, None, "HTTP 503 from /", None, None, None)
    await wait_healthy(slow(threshold=3), LOCAL, 1, prober=prober)
    assert len(prober.times) == 7


async def test_boot_timeout_carries_the_last_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    prober = FakeProber("first", "second", "third", "fourth", "fifth", "sixth", "seventh")
    with pytest.raises(HealthTimeout) as info:
        await wait_healthy(slow(1_000), LOCAL, 1, boot_timeout_s=2.0, prober=prober)
    # Probes at 0, .05, .15, .35, .75, 1.55; the next would be at 2.55.
    assert info.value.reason == "sixth"
    assert str(info.value) == "sixth"
    assert trio.current_time() - prober.t0 == pytest.approx(2.0)


async def test_boot_timeout_with_no_finished_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def hangs(check: HealthCheck, host: str, port: int) -> str | None:
        await trio.sleep_forever()

    with pytest.raises(HealthTimeout, match=r"no probe finished within 1\.5s"):
        await wait_healthy(slow(), LOCAL, 1, boot_timeout_s=1.5, prober=hangs)


async def test_a_process_that_exits_while_waiting_stops_the_wait_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    alive = True
    prober = FakeProber("connection refused")

    async def exit_at_1s() -> None:
        nonlocal alive
        await trio.sleep(1.0)
        alive = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_at_1s)
        with pytest.raises(HealthTimeout, match="process exited"):
            await wait_healthy(
                slow(5_000), LOCAL, 1, boot_timeout_s=60, is_alive=lambda: alive, prober=prober
            )
    # Probes at 0 .. 0.75; the exit is seen at the first 100 ms poll after 1.0 s.
    assert len(prober.times) == 5
    assert 1.0 <= trio.current_time() - prober.t0 <= 1.0 + 0.1 + 1e-9


async def test_a_failed_probe_of_a_dead_process_says_it_exited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    def alive_until_probed() -> bool:
        return calls == 0

    async def refused(check: HealthCheck, host: str, port: int) -> str | None:
        nonlocal calls
        calls += 1
        await trio.lowlevel.checkpoint()
        return "connection refused"

    with pytest.raises(HealthTimeout, match="process exited"):
        await wait_healthy(slow(), LOCAL, 1, is_alive=alive_until_probed, prober=refused)
    assert calls == 1


async def test_a_dead_process_is_not_probed(autojump_clock: trio.testing.MockClock) -> None:
    prober = FakeProber(None)
    with pytest.raises(HealthTimeout, match="process exited"):
        await wait_healthy(slow(), LOCAL, 1, is_alive=lambda: False, prober=prober)
    assert prober.times == []


# -- wait_healthy, real sockets ----------------------------------------------------


def recording(into: list[str | None], first_failure: trio.Event) -> Prober:
    async def record(check: HealthCheck, host: str, port: int) -> str | None:
        reason = await probe(check, host, port)
        into.append(reason)
        if reason is not None:
            first_failure.set()
        return reason

    return record


async def test_wait_healthy_sees_a_listener_that_starts_late() -> None:
    reasons: list[str | None] = []
    refused_once = trio.Event()

    async def listen_after_a_refusal(sock: socket.socket) -> None:
        await refused_once.wait()
        await trio.sleep(0.2)
        sock.listen()

    with trio.fail_after(GUARD_S), bound_not_listening() as sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen_after_a_refusal, sock)
            await wait_healthy(TCP, LOCAL, port_of(sock), prober=recording(reasons, refused_once))
    assert reasons[0] == "connection refused"
    assert reasons[-1] is None
    assert None not in reasons[:-1]


async def test_wait_healthy_times_out_on_a_refusing_port() -> None:
    with (
        trio.fail_after(GUARD_S),
        bound_not_listening() as sock,
        pytest.raises(HealthTimeout, match="connection refused"),
    ):
        await wait_healthy(TCP, LOCAL, port_of(sock), boot_timeout_s=1.0)


async def test_wait_healthy_over_http_needs_a_good_status() -> None:
    requests: list[h11.Request] = []
    with trio.fail_after(GUARD_S):
        async with serving(http_server(503, requests)) as port:
            with pytest.raises(HealthTimeout, match="HTTP 503 from /health"):
                await wait_healthy(http(), LOCAL, port, boot_timeout_s=1.0)
        async with serving(http_server(200, requests)) as port:
            await wait_healthy(http(), LOCAL, port, boot_timeout_s=GUARD_S)
    assert len(requests) >= 2


async def test_a_job_just_started_is_probed_every_50ms_then_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    prober = FakeProber(*["connection refused"] * 11, None)
    await wait_healthy(slow(1_000), LOCAL, 1, prober=prober, fast_for_s=0.32)
    # Every 50 ms while the fast start lasts (to 0.32 s), then 0.1, 0.2, 0.4, 0.8, 1 s.
    fast = [0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert prober.times == pytest.approx([*fast, 0.35, 0.45, 0.65, 1.05, 1.85])


async def test_the_fast_start_sees_a_late_binder_within_50ms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A port that starts listening at 1.6 s is seen at the next 50 ms probe, not at
    3.15 s as the back-off alone would see it."""
    t0 = trio.current_time()

    async def listens_at_1600ms(check: HealthCheck, host: str, port: int) -> str | None:
        await trio.lowlevel.checkpoint()
        return None if trio.current_time() - t0 >= 1.6 else "connection refused"

    await wait_healthy(slow(5_000), LOCAL, 1, prober=listens_at_1600ms, fast_for_s=FAST_FOR_S)
    assert 1.6 <= trio.current_time() - t0 <= 1.65 + 1e-9
