"""Plain heads read without parser callbacks (flynnp2p/router/plainhead.py) against
the proxy's own httptools path (`proxy._ResponseSide`, `ClientConnection`'s parser):
for any bytes the fast path declines or agrees with it, and it declines what the
router must refuse or leave to the parser."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flynnp2p.router import plainhead
from flynnp2p.router.balance import Balancer
from flynnp2p.router.http1 import RequestHead, ResponseHead
from flynnp2p.router.proxy import (
    BODY,
    END,
    ERROR,
    HEAD,
    ClientConnection,
    Pool,
    ProxyConfig,
    Shared,
    _ResponseSide,
)
from flynnp2p.router.sock import Sock
from flynnp2p.router.stats import Stats
from flynnp2p.router.table import RouteTable
from flynnp2p.watch import Watched

CFG = ProxyConfig()


def pairs(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(name, value) of rendered header lines, however many per ``bytes``."""
    out = []
    for line in b"".join(lines).split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        out.append((name, value.lstrip(b" \t")))
    return out


def parsed_response(data: bytes) -> tuple[ResponseHead, bytes, int] | None:
    """What the httptools path makes of `data` as one whole response: its head, body
    and number of messages begun; None if it refuses it or does not finish it."""
    side = _ResponseSide()
    try:
        side.parser.feed_data(data)
    except Exception:  # HttpParserError, HttpParserUpgrade: not plain
        return None
    kinds = [k for k, _ in side.events]
    if not kinds or kinds[0] != HEAD or kinds[-1] != END or kinds.count(HEAD) != 1:
        return None
    body = b"".join(v for k, v in side.events if k == BODY)
    return side.events[0][1], body, side.messages


def response_head_ends_at(data: bytes) -> int:
    """Where the httptools path has the response head complete (bytes fed)."""
    side = _ResponseSide()
    for i in range(len(data)):
        side.parser.feed_data(data[i : i + 1])
        if side.events:
            return i + 1
    return -1


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    rng = random.Random(1)
    yield Shared(table=Watched(RouteTable.build([], {})), cfg=CFG, balancer=Balancer(rng),
                 pool=Pool(CFG), stats=Stats(), rng=rng, wall_ms=lambda: 0, now=time.monotonic)  # fmt: skip


def client_events(sh: Shared, data: bytes, step: int = 0) -> list[tuple[int, object]]:
    """The events a client connection's own parser queues for `data` (fed in one, or
    `step` bytes at a time)."""
    a, b = socket.socketpair()
    try:
        conn = ClientConnection(sh, Sock(a), "127.0.0.1", "http", 80)
        if step:
            for i in range(0, len(data), step):
                conn._feed(data[i : i + step])
        else:
            conn._feed(data)
        return list(conn.events)
    finally:
        a.close()
        b.close()


def check_response(data: bytes) -> ResponseHead | None:
    fast = plainhead.response(data)
    if fast is None:
        return None
    head, start = fast
    slow = parsed_response(data)
    assert slow is not None, "accepted what the parser refuses or does not finish"
    ref, body, messages = slow
    assert messages == 1
    assert (head.status, head.keep_alive, head.content_length, head.chunked, head.upgrade) == (
        ref.status, ref.keep_alive, ref.content_length, ref.chunked, ref.upgrade)  # fmt: skip
    assert pairs(head.lines) == pairs(ref.lines)
    assert data[start:] == body
    assert response_head_ends_at(data) == start
    return head


def check_request(sh: Shared, data: bytes) -> RequestHead | None:
    head = plainhead.request(data, CFG.max_request_line, CFG.max_header_bytes, CFG.max_headers)
    if head is None:
        return None
    events = client_events(sh, data)
    assert [k for k, _ in events] == [HEAD, END], (
        "accepted what the parser refuses or does not finish"
    )
    ref = events[0][1]
    assert isinstance(ref, RequestHead)
    fields = ("method", "target", "version", "keep_alive", "host", "content_length", "chunked", "upgrade",
              "expect_continue", "forwarded_for", "request_id", "has_body")  # fmt: skip
    assert [getattr(head, f) for f in fields] == [getattr(ref, f) for f in fields]
    assert pairs(head.lines) == pairs(ref.lines)
    assert all(line.count(b"\r\n") == 1 for line in head.lines)  # one line each (sticky reads them)
    # the head ends where the parser has it end: one byte short, no head yet
    assert HEAD not in [k for k, _ in client_events(sh, data[:-1])]
    return head


# -- generated heads: mostly plain, each piece sometimes off ---------------------------

NAMES = [b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection", b"Keep-Alive",
         b"Upgrade", b"Expect", b"Host", b"X-Request-Id", b"X-Forwarded-For", b"X-Forwarded-Proto",
         b"TE", b"Trailer", b"Server", b"Date", b"Content-Type", b"Set-Cookie", b"Cookie", b"X-A"]  # fmt: skip
odd = st.sampled_from([b"", b" ", b"\t", b"\r", b"\n", b"\x00", b"\x7f", b"\x80", b"\xff", b":", b";", b",",
                       b"\"", b"#", b"<", b"{", b"\\", b"^", b"`", b"|", b"~"])  # fmt: skip
text = st.one_of(st.sampled_from([b"", b"0", b"12", b"007", b"+1", b"-1", b" 5", b"5 ", b"1,1", b"close",
                                  b"keep-alive", b"Keep-Alive", b"chunked", b"gzip, chunked", b"upgrade",
                                  b"websocket", b"100-continue", b"a.test", b"A.test:80", b"x y",
                                  b"9" * 20, b"abcdefghijklmnopqrstuvwxyz"]),
                 st.binary(max_size=12), st.builds(bytes.__add__, st.binary(max_size=4), odd))  # fmt: skip
name = st.one_of(st.sampled_from(NAMES), st.builds(bytes.__add__, st.sampled_from(NAMES), odd),
                 st.binary(min_size=1, max_size=6))  # fmt: skip
sep = st.sampled_from([b":", b": ", b":  ", b":\t", b" :", b""])
eol = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\n ", b"\r\n\t", b" \r\n"])
odd_line = st.builds(lambda n, s, v, e: n + s + v + e, name, sep, text, eol)
plain_line = st.builds(lambda n, v: n + b": " + v + b"\r\n",
                       st.sampled_from([b"Server", b"Date", b"Content-Type", b"Set-Cookie", b"X-A",
                                        b"Connection", b"Keep-Alive", b"X-Request-Id", b"Cookie"]),
                       st.sampled_from([b"a", b"text/plain; charset=utf-8", b"keep-alive", b"close",
                                        b"x=1; Path=/", b"timeout=5", b"abcdefghij0123456789"]))  # fmt: skip
lines = st.lists(st.one_of(plain_line, plain_line, odd_line), max_size=5).map(b"".join)


def piece(
    draw: st.DrawFn,
    odd: set[str],
    part: str,
    plain: st.SearchStrategy[bytes],
    other: st.SearchStrategy[bytes],
) -> bytes:
    return draw(other if part in odd else plain)


PARTS = ["start", "status", "reason", "length", "cl", "lines", "end", "target", "host"]


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """A plain response with up to three of its parts drawn from odd choices."""
    odd = draw(st.sets(st.sampled_from(PARTS), max_size=3))
    version = piece(draw, odd, "start", st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
                    st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11"]))  # fmt: skip
    status = piece(draw, odd, "status", st.sampled_from([b"200", b"404", b"503", b"302"]),
                   st.sampled_from([b"101", b"100", b"204", b"304", b"999", b"20", b"2000", b"abc", b"099"]))  # fmt: skip
    reason = piece(draw, odd, "reason", st.sampled_from([b" OK", b"", b" Not Found", b" "]),
                   st.builds(bytes.__add__, st.sampled_from([b" ", b"  ", b""]), st.binary(max_size=6)))  # fmt: skip
    body = draw(st.binary(max_size=8))
    length = piece(draw, odd, "length", st.just(len(body)), st.integers(0, 10))
    cl = piece(draw, odd, "cl", st.sampled_from([b"Content-Length: %d\r\n" % length, b"content-length:%d\r\n" % length]),
               st.sampled_from([b"", b"Content-Length: %d\r\n" % length * 2, b"Content-Length: %d \r\n" % length,
                                b"Content-Length:\t%d\r\n" % length, b"Content-Length: +%d\r\n" % length,
                                b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % length]))  # fmt: skip
    plain_lines = st.lists(plain_line, max_size=4).map(b"".join)
    some_odd = st.lists(st.one_of(plain_line, odd_line), min_size=1, max_size=4).map(b"".join)
    before = piece(draw, odd, "lines", plain_lines, some_odd)
    after = draw(plain_lines)
    end = piece(
        draw, odd, "end", st.just(b"\r\n"), st.sampled_from([b"\n", b"\r\n\r\n", b"", b"\r"])
    )
    return version + b" " + status + reason + b"\r\n" + before + cl + after + end + body


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A plain request with up to three of its parts drawn from odd choices."""
    odd = draw(st.sets(st.sampled_from(PARTS), max_size=3))
    method = piece(draw, odd, "status", st.sampled_from([b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"]),
                   st.sampled_from([b"POST", b"CONNECT", b"get", b"GETX", b"PATCH", b"G"]))  # fmt: skip
    target = piece(draw, odd, "target", st.sampled_from([b"/", b"/a/b?c=d&e", b"/%41", b"//", b"/~:@!$&'()*+,;=[]"]),
                   st.one_of(st.sampled_from([b"*", b"http://a.test/x", b"/a#f", b"/a b", b""]),
                             st.builds(bytes.__add__, st.just(b"/"), st.binary(max_size=6))))  # fmt: skip
    version = piece(draw, odd, "start", st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
                    st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1"]))  # fmt: skip
    host = piece(draw, odd, "host", st.sampled_from([b"Host: a.test\r\n", b"host:a.test\r\n", b"HOST: a.test:80 \r\n"]),
                 st.sampled_from([b"", b"Host: a.test\r\nHost: b.test\r\n", b"Host: a\x00\r\n",
                                  b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n"]))  # fmt: skip
    plain_lines = st.lists(plain_line, max_size=4).map(b"".join)
    some_odd = st.lists(st.one_of(plain_line, odd_line), min_size=1, max_size=4).map(b"".join)
    before = piece(draw, odd, "lines", plain_lines, some_odd)
    after = draw(plain_lines)
    end = piece(draw, odd, "end", st.just(b"\r\n"),
                st.sampled_from([b"\n", b"\r\n\r\n", b"", b"\r\nGET / HTTP/1.1\r\n\r\n"]))  # fmt: skip
    return method + b" " + target + b" " + version + b"\r\n" + before + host + after + end


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses())
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok")
def test_a_generated_response_is_declined_or_read_as_the_parser_reads_it(data: bytes) -> None:
    check_response(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80))
def test_any_bytes_as_a_response_are_declined_or_read_as_the_parser_reads_them(data: bytes) -> None:
    check_response(b"HTTP/1.1 200 OK\r\n" + data)
    check_response(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
@example(b"GET / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
def test_a_generated_request_is_declined_or_read_as_the_parser_reads_it(
    shared: Shared, data: bytes
) -> None:
    check_request(shared, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80))
def test_any_bytes_as_a_request_are_declined_or_read_as_the_parser_reads_them(
    shared: Shared, data: bytes
) -> None:
    check_request(shared, b"GET / HTTP/1.1\r\n" + data)
    check_request(shared, data)


# -- what is read, and what must be declined -----------------------------------------

NGINX = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 17:40:00 GMT\r\n"
         b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n")  # fmt: skip


def test_common_heads_are_read_with_their_framing_and_lines(shared: Shared) -> None:
    head = check_response(NGINX)
    assert head is not None and (head.status, head.keep_alive, head.content_length) == (
        200,
        True,
        12,
    )
    assert head.lines == [
        b"Server: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 17:40:00 GMT\r\nContent-Type: text/plain\r\n"
    ]
    head = check_response(
        b"HTTP/1.0 404 Not Found\r\ncontent-length:0\r\nX-Request-Id: theirs\r\n\r\n"
    )
    assert head is not None and (head.status, head.keep_alive, head.lines) == (404, False, [b""])
    req = check_request(shared, b"GET /a?b HTTP/1.1\r\nHost: a.test\r\nCookie: x=1\r\nAccept: */*\r\n"
                                b"X-Request-Id: abcdefghij0123456789\r\nConnection: keep-alive\r\n\r\n")  # fmt: skip
    assert req is not None and (req.method, req.target, req.host, req.keep_alive) == (
        "GET",
        b"/a?b",
        b"a.test",
        True,
    )
    assert req.lines == [b"Cookie: x=1\r\n", b"Accept: */*\r\n"]
    assert req.request_id == b"abcdefghij0123456789"
    req = check_request(shared, b"HEAD / HTTP/1.0\r\nhost: a.test\r\n\r\n")
    assert req is not None and (req.method, req.version, req.keep_alive) == ("HEAD", "1.0", False)


@pytest.mark.parametrize("data", [
    NGINX.replace(b"Content-Length: 12\r\n", b"Content-Length: 12\r\nContent-Length: 12\r\n"),
    NGINX.replace(b"Content-Length: 12\r\n", b"Content-Length: 12\r\ncontent-length: 13\r\n"),
    NGINX.replace(b"Content-Length: 12\r\n", b"Content-Length: 12\r\nTransfer-Encoding: chunked\r\n"),
    NGINX.replace(b"Content-Length: 12", b"Content-Length: +12"),
    NGINX.replace(b"Content-Length: 12", b"Content-Length: 1 2"),
    NGINX.replace(b"Content-Length: 12", b"Content-Length : 12"),
    NGINX.replace(b"Server: nginx/1.22.1\r\n", b"Server: nginx\r\n 1.22.1\r\n"),  # obs-fold
    NGINX.replace(b"Server: nginx/1.22.1\r\n", b"Server: nginx/1.22.1\n"),  # bare LF
    NGINX.replace(b"Server: nginx/1.22.1\r\n", b"Server: nginx\x00\r\n"),
    NGINX.replace(b"HTTP/1.1 200 OK", b"HTTP/1.1 20 OK"),
    NGINX.replace(b"HTTP/1.1 200 OK", b"HTTP/2 200 OK"),
    NGINX.replace(b"HTTP/1.1 200 OK", b"HTTP/1.1 101 Switching Protocols"),
    NGINX.replace(b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content"),
    NGINX.replace(b"Connection: keep-alive", b"Connection: keep-alive, X-A"),
    NGINX.replace(b"Connection: keep-alive", b"Upgrade: h2c"),
    NGINX[:-1],  # the body is not all there
    NGINX + b"HTTP/1.1 200 OK\r\n",  # something after it
    NGINX.replace(b"Content-Length: 12\r\n", b""),  # close-delimited
])  # fmt: skip
def test_a_response_that_is_not_plain_is_declined(data: bytes) -> None:
    assert plainhead.response(data) is None


REQ = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"


@pytest.mark.parametrize("data", [
    REQ.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
    REQ.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n"),
    REQ.replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
    REQ.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"),
    REQ.replace(b"\r\n\r\n", b"\r\nHost: b.test\r\n\r\n"),
    REQ.replace(b"\r\n\r\n", b"\r\nX-A: 1\r\n 2\r\n\r\n"),  # obs-fold
    REQ.replace(b"Host: a.test\r\n", b"Host: a.test\n"),  # bare LF
    REQ.replace(b"Host:", b"Host :"),
    REQ.replace(b"GET", b"POST"),
    REQ.replace(b"GET /", b"GET http://a.test/"),
    REQ.replace(b"HTTP/1.1", b"HTTP/1.2"),
    REQ[:-2],  # not all there
    REQ + REQ,  # pipelined: the parser queues both
])  # fmt: skip
def test_a_request_that_is_not_plain_is_declined(data: bytes) -> None:
    assert plainhead.request(data) is None


def test_a_request_over_the_proxys_limits_is_declined_for_the_parser_to_answer(
    shared: Shared,
) -> None:
    long_target = b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n"
    assert plainhead.request(long_target, max_target=100) is None
    assert plainhead.request(long_target, max_target=101) is not None
    many = b"GET / HTTP/1.1\r\nHost: a.test\r\n" + b"X-A: 1\r\n" * 10 + b"\r\n"
    assert plainhead.request(many, max_count=10) is None
    assert plainhead.request(many, max_count=11) is not None
    assert plainhead.request(many, max_bytes=60) is None
    # where the fast path reads a head, the parser with the same limits accepts it
    cfg = ProxyConfig(max_header_bytes=200, max_headers=30)
    data = b"GET / HTTP/1.1\r\nHost: a.test\r\n" + b"X-Header: value\r\n" * 7 + b"\r\n"
    assert (
        plainhead.request(data, cfg.max_request_line, cfg.max_header_bytes, cfg.max_headers)
        is not None
    )
    sh = Shared(table=shared.table, cfg=cfg, balancer=shared.balancer, pool=shared.pool, stats=Stats(),
                rng=shared.rng, wall_ms=lambda: 0, now=time.monotonic)  # fmt: skip
    assert [k for k, _ in client_events(sh, data)] == [HEAD, END]
    assert ERROR not in [k for k, _ in client_events(sh, data, step=7)]
