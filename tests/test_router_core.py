"""Pure parts of the proxy: head rewriting, the balancer, counters, the upstream pool."""

from __future__ import annotations

import random
import socket
from typing import Any, cast

import pytest

from flynnp2p.router import http1
from flynnp2p.router.balance import Balancer
from flynnp2p.router.proxy import POOL_SWEEP_S, Pool, ProxyConfig
from flynnp2p.router.sock import Sock
from flynnp2p.router.stats import Stats, percentile
from flynnp2p.router.table import Backend


def request(headers: list[tuple[bytes, bytes]], method: str = "GET", target: bytes = b"/x",
            version: str = "1.1") -> http1.RequestHead:  # fmt: skip
    h = http1.HeadBuilder(http1.REQUEST_SPECIAL)
    for n, v in headers:
        h.add(n, v)
    return http1.RequestHead.build(method, target, version, True, h)


def test_upstream_head_has_one_framing_the_router_headers_and_no_hop_by_hop() -> None:
    head = request([
        (b"Host", b"h.test"), (b"Accept", b"*/*"), (b"Connection", b"keep-alive, X-Drop"),
        (b"X-Drop", b"secret"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
        (b"X-Forwarded-For", b"10.0.0.1"), (b"X-Forwarded-For", b"10.0.0.2"),
        (b"X-Forwarded-Proto", b"https"), (b"Transfer-Encoding", b"chunked"),
        (b"Proxy-Authorization", b"x"), (b"X-Request-Start", b"t=1"),
    ], method="POST")  # fmt: skip
    out = http1.upstream_request(head, client_ip=b"127.0.0.9", request_id=b"r" * 20,
                                 proto_port=b"X-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\n",
                                 start_ms=1234)  # fmt: skip
    assert out == (
        b"POST /x HTTP/1.1\r\nHost: h.test\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 10.0.0.1, 10.0.0.2, 127.0.0.9\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\n"
        b"X-Request-Id: rrrrrrrrrrrrrrrrrrrr\r\nX-Request-Start: t=1234\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )


def test_content_length_and_upgrade_are_rendered_by_the_router() -> None:
    head = request([(b"Host", b"h"), (b"Content-Length", b"5")], method="PUT")
    assert head.content_length == 5 and head.has_body and not head.chunked
    out = http1.upstream_request(head, client_ip=b"1.2.3.4", proto_port=b"", request_id=b"i",
                                 start_ms=0)  # fmt: skip
    assert out.endswith(b"Content-Length: 5\r\n\r\n")
    ws = request([(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")])
    assert ws.upgrade == b"websocket"
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in http1.upstream_request(
        ws, client_ip=b"1", proto_port=b"", request_id=b"i", start_ms=0)  # fmt: skip
    # Upgrade without "Connection: upgrade" is not an upgrade (and is not forwarded)
    assert request([(b"Host", b"h"), (b"Upgrade", b"websocket")]).upgrade is None


def test_expect_and_absolute_form_target() -> None:
    head = request([(b"Host", b"h"), (b"Expect", b"100-Continue")],
                   target=b"http://h.test/a/b?q=1")  # fmt: skip
    assert head.expect_continue and head.path == "/a/b"
    assert request([(b"Host", b"h")], target=b"http://h.test").path == "/"


@pytest.mark.parametrize(
    ("size", "count", "headers"),
    [(100, 50, [(b"X-A", b"b" * 200)]), (10_000, 3, [(b"X-%d" % i, b"v") for i in range(4)])],
)
def test_head_builder_limits(size: int, count: int, headers: list[tuple[bytes, bytes]]) -> None:
    h = http1.HeadBuilder(http1.REQUEST_SPECIAL, max_size=size, max_count=count)
    with pytest.raises(http1.HeadersTooLarge):
        for n, v in headers:
            h.add(n, v)
    assert h.error is not None


def response(headers: list[tuple[bytes, bytes]], status: int = 200) -> http1.ResponseHead:
    h = http1.HeadBuilder(http1.RESPONSE_SPECIAL)
    for n, v in headers:
        h.add(n, v)
    return http1.ResponseHead.build(status, True, h)


@pytest.mark.parametrize(
    ("framing", "keep", "version", "want"),
    [
        ("length", True, "1.1", b"Content-Length: 2\r\n\r\n"),
        ("chunked", True, "1.1", b"Transfer-Encoding: chunked\r\n\r\n"),
        ("close", False, "1.0", b"Connection: close\r\n\r\n"),
        ("length", True, "1.0", b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\n"),
    ],
)
def test_client_response_framing(framing: str, keep: bool, version: str, want: bytes) -> None:
    resp = response([(b"Content-Length", b"2"), (b"Connection", b"keep-alive"),
                     (b"X-Request-Id", b"theirs"), (b"Server", b"s")])  # fmt: skip
    out = http1.client_response(resp, body_framing=framing, keep_alive=keep,
                                client_version=version, request_id=b"ours")  # fmt: skip
    assert out.startswith(b"HTTP/1.1 200 OK\r\nServer: s\r\nX-Request-Id: ours\r\n")
    assert out.endswith(want) and b"theirs" not in out


def test_chunked_response_detection_and_request_ids() -> None:
    assert response([(b"Transfer-Encoding", b"gzip, chunked")]).chunked
    assert http1.chunk(b"hello") == b"5\r\nhello\r\n"
    assert http1.valid_request_id(b"a" * 20) and not http1.valid_request_id(b"a" * 19)
    assert not http1.valid_request_id(b"a" * 19 + b"\n")


# -- balancer ------------------------------------------------------------------------

B = [Backend(f"j{i}", f"127.0.0.1:{i}") for i in range(1, 4)]


def test_p2c_prefers_the_less_loaded_of_two() -> None:
    bal = Balancer(random.Random(7))
    for _ in range(5):
        bal.acquire(B[0].address)
    picks = [bal.choose(B, 0.0) for _ in range(300)]
    assert B[0] not in picks  # it loses every pair it is drawn in
    assert {B[1], B[2]} <= set(picks)


def test_marked_backends_are_skipped_until_their_mark_passes() -> None:
    bal = Balancer(random.Random(1), skip_seconds=5.0)
    bal.mark_down(B[0].address, now=10.0)
    assert all(bal.choose(B, 12.0) != B[0] for _ in range(100))
    assert B[0] in {bal.choose(B, 15.0) for _ in range(100)}
    assert bal.status(12.0)["skipped"] == {B[0].address: 3.0}
    bal.expire(16.0)
    assert bal.down_until == {}


def test_all_marked_still_tries_one_and_exclusions_hold() -> None:
    bal = Balancer(random.Random(1))
    for b in B:
        bal.mark_down(b.address, 0.0)
    assert bal.choose(B, 1.0) in B
    assert bal.choose(B, 1.0, exclude=[b.address for b in B]) is None
    assert bal.choose(B[:2], 1.0, exclude=[B[0].address]) == B[1]
    bal.acquire("x")
    bal.release("x")
    assert bal.in_flight == {}


# -- counters ------------------------------------------------------------------------


def test_stats_classes_and_percentiles() -> None:
    stats = Stats()
    for i in range(100):
        stats.record("app", 200 if i < 90 else 503, (i + 1) / 1000, by_router=i >= 90)
    stats.retried("app")
    d = cast(dict[str, Any], stats.as_dict()["app"])
    assert d["requests"] == {"1xx": 0, "2xx": 90, "3xx": 0, "4xx": 0, "5xx": 10}
    assert d["router_errors"] == 10 and d["retries"] == 1
    assert d["latency_ms"] == {"p50": 51.0, "p90": 90.0, "p99": 99.0}
    assert percentile([], 0.5) == 0.0


# -- the upstream pool ---------------------------------------------------------------


def pair() -> tuple[Sock, socket.socket]:
    """A pooled connection (our end) and the backend's end of it."""
    ours, theirs = socket.socketpair()
    return Sock(ours), theirs


async def test_pool_reuses_newest_drops_stale_and_dead_and_caps() -> None:
    pool = Pool(ProxyConfig(pool_idle_per_backend=2, pool_idle_seconds=30.0))
    (a, _a), (b, _b), (c, _c) = pair(), pair(), pair()
    for s in (a, b, c):
        pool.put("x:1", s, now=0.0)
    assert c.closed and not a.closed  # over the cap
    assert pool.take_nowait("x:1", now=0.5) is b  # newest first
    dead, backend = pair()
    pool.put("x:1", dead, now=0.5)
    backend.close()  # the backend closed it (died, or its keep-alive timed out)
    # within the sweep interval it may still go out (a GET is then retried) ...
    assert pool.take_nowait("x:1", now=0.5 + POOL_SWEEP_S / 2) is dead
    pool.put("x:1", dead, now=0.5)
    # ... and the next sweep closes it, however briefly it was idle
    assert pool.take_nowait("x:1", now=0.5 + POOL_SWEEP_S) is a and dead.closed
    stray, backend2 = pair()
    pool.put("y:1", stray, now=1.0)
    backend2.send(b"HTTP/1.1 200 OK\r\n")  # bytes nobody asked for: not reusable
    assert pool.take_nowait("y:1", now=1.0 + POOL_SWEEP_S) is None and stray.closed
    pool.put("x:1", a, now=0.0)
    assert pool.take_nowait("x:1", now=31.0) is None and a.closed  # idle too long
    pool.put("y:1", b, now=0.0)
    pool.prune({"x:1"})
    assert b.closed and pool.counts() == {}
    for end in (_a, _b, _c, backend2):
        end.close()
