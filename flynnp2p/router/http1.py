"""HTTP/1.1 message heads as the proxy rewrites them (pure: bytes in, bytes out).

The proxy never forwards a head as received: it rebuilds it from the parsed
fields, so what reaches a backend or a client is one unambiguous framing chosen
here (``Content-Length`` as received, or ``chunked`` re-encoded by the proxy),
and hop-by-hop headers (RFC 9110 7.6.1, plus any the ``Connection`` header
names) never cross.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

Headers = list[tuple[bytes, bytes]]  # (name, value) as received

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
        b"content-length", b"expect",  # framing and 100-continue are the proxy's own
    }
)  # fmt: skip
ROUTER_SET = frozenset(
    {b"x-forwarded-proto", b"x-forwarded-port", b"x-request-start", b"x-request-id",
     b"x-forwarded-for"}
)  # fmt: skip
# Headers the parser callbacks set aside (by lowercase name) instead of rendering:
# everything the proxy drops, replaces or reads.
REQUEST_SPECIAL = HOP_BY_HOP | ROUTER_SET | {b"host"}
RESPONSE_SPECIAL = HOP_BY_HOP | {b"x-request-id"}
PLAIN_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade", b""})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# the parser's method bytes -> str, without a decode per request for the common ones
METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}
REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9+/=_.:-]{20,200}")
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class HeadersTooLarge(Exception):
    """Raised from a parser callback: the head is over a limit (stops the parser)."""


class HeadBuilder:
    """Collects a head's headers as the parser reports them: end-to-end ones are
    rendered at once (``name: value\r\n``), the special ones kept by lowercase name
    (repeated ones joined with ", ", as RFC 9110 5.3 allows for list headers; a
    repeated Content-Length never gets here, the parser refuses it)."""

    __slots__ = ("count", "error", "lines", "max_count", "max_size", "size", "special",
                 "special_names")  # fmt: skip

    def __init__(self, special_names: frozenset[bytes], max_size: int = 65536,
                 max_count: int = 256) -> None:  # fmt: skip
        self.special_names = special_names
        self.max_size = max_size
        self.max_count = max_count
        self.error: str | None = None
        self.reset()

    def reset(self) -> None:
        """Start the next head (new containers: a built head keeps the old ones)."""
        self.lines: list[bytes] = []
        self.special: dict[bytes, bytes] = {}
        self.size = 0
        self.count = 0

    def add(self, name: bytes, value: bytes) -> None:
        count = self.count = self.count + 1  # (once per header: kept lean)
        size = self.size = self.size + len(name) + len(value) + 4
        if size > self.max_size or count > self.max_count:
            self.error = (
                f"headers exceed {self.max_size} bytes" if size > self.max_size
                else f"more than {self.max_count} headers"
            )  # fmt: skip
            raise HeadersTooLarge(self.error)
        n = name.lower()
        if n in self.special_names:
            old = self.special.get(n)
            self.special[n] = value if old is None else old + b", " + value
        else:
            self.lines.append(name + b": " + value + b"\r\n")  # (faster than a format)

    def end_to_end(self) -> list[bytes]:
        """The rendered lines, without any the Connection header names (rare)."""
        conn = self.special.get(b"connection")
        if conn is None or conn.lower() in PLAIN_TOKENS:  # (the common "keep-alive")
            return self.lines
        tokens = {t.strip().lower() for t in conn.split(b",")} - PLAIN_TOKENS
        if not tokens:
            return self.lines
        return [line for line in self.lines if line.split(b":", 1)[0].lower() not in tokens]


def _tokens(value: bytes | None) -> frozenset[bytes]:
    return frozenset() if value is None else frozenset(t.strip().lower() for t in value.split(b","))


@dataclass(slots=True)
class RequestHead:
    """A parsed request head and what the proxy needs to know about its framing."""

    method: str
    target: bytes
    version: str  # "1.0" | "1.1" (others are refused)
    keep_alive: bool
    lines: list[bytes]  # end-to-end headers, rendered
    host: bytes
    content_length: int | None
    chunked: bool
    upgrade: bytes | None  # the protocol asked for, with Connection: upgrade
    expect_continue: bool
    forwarded_for: bytes | None
    request_id: bytes | None
    has_body: bool = False

    @classmethod
    def build(cls, method: str, target: bytes, version: str, keep_alive: bool,
              h: HeadBuilder) -> RequestHead:  # fmt: skip
        sp = h.special
        cl = sp.get(b"content-length")
        upgrade = sp.get(b"upgrade")
        if upgrade is not None and b"upgrade" not in _tokens(sp.get(b"connection")):
            upgrade = None
        expect = sp.get(b"expect")
        length = None if cl is None else int(cl)  # the parser checked it is one number
        chunked = b"transfer-encoding" in sp  # the parser refuses any other final coding
        return cls(
            method, target, version, keep_alive, h.end_to_end(), sp.get(b"host", b""),
            length, chunked, upgrade, expect is not None and expect.lower() == b"100-continue",
            sp.get(b"x-forwarded-for"), sp.get(b"x-request-id"), chunked or bool(length),
        )  # fmt: skip

    @property
    def path(self) -> str:
        raw = self.target.split(b"?", 1)[0]
        if raw.startswith(b"http://") or raw.startswith(b"https://"):  # absolute form
            rest = raw.split(b"//", 1)[1]
            slash = rest.find(b"/")
            raw = rest[slash:] if slash >= 0 else b"/"
        return raw.decode("latin-1")


@dataclass(slots=True)
class ResponseHead:
    status: int
    keep_alive: bool
    lines: list[bytes]
    content_length: int | None
    chunked: bool
    upgrade: bytes | None

    @classmethod
    def build(cls, status: int, keep_alive: bool, h: HeadBuilder) -> ResponseHead:
        sp = h.special
        cl = sp.get(b"content-length")
        te = sp.get(b"transfer-encoding")
        return cls(
            status, keep_alive, h.end_to_end(), None if cl is None else int(cl),
            te is not None and te.lower().rstrip().endswith(b"chunked"), sp.get(b"upgrade"),
        )  # fmt: skip


def valid_request_id(value: bytes) -> bool:
    return REQUEST_ID_RE.fullmatch(value) is not None


def upstream_request(
    head: RequestHead, *, client_ip: bytes, proto_port: bytes, request_id: bytes,
    start_ms: int,
) -> bytes:  # fmt: skip
    """The head sent to a backend: end-to-end headers, the router's, one framing.
    `proto_port` is the listener's pre-rendered X-Forwarded-Proto/Port lines."""
    xff = head.forwarded_for + b", " + client_ip if head.forwarded_for else client_ip
    if head.chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
    elif head.content_length is not None:
        framing = b"Content-Length: %d\r\n" % head.content_length
    else:
        framing = b""
    if head.upgrade is not None:
        framing += b"Connection: Upgrade\r\nUpgrade: " + head.upgrade + b"\r\n"
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%sX-Forwarded-For: %s\r\n%sX-Request-Id: %s\r\nX-Request-Start: t=%d\r\n%s\r\n" % (
        head.method.encode(), head.target, head.host, b"".join(head.lines), xff, proto_port,
        request_id, start_ms, framing,
    )  # fmt: skip


def client_response(
    head: ResponseHead, *, body_framing: str, keep_alive: bool, client_version: str,
    request_id: bytes, extra: bytes = b"",
) -> bytes:  # fmt: skip
    """The head sent to the client. `body_framing`: "length", "chunked", "close" or
    "none" (HEAD, 1xx, 204, 304: the upstream's Content-Length is passed on as is)."""
    if body_framing == "chunked":
        framing = b"Transfer-Encoding: chunked\r\n"
    elif body_framing != "close" and head.content_length is not None:
        framing = b"Content-Length: %d\r\n" % head.content_length
    else:
        framing = b""
    if head.status == 101:
        framing += b"Connection: Upgrade\r\nUpgrade: " + (head.upgrade or b"") + b"\r\n"
    elif not keep_alive:
        framing += b"Connection: close\r\n"
    elif client_version == "1.0":
        framing += b"Connection: keep-alive\r\n"
    return b"HTTP/1.1 %d %s\r\n%s%sX-Request-Id: %s\r\n%s\r\n" % (
        head.status, _REASONS.get(head.status, b"Unknown"), b"".join(head.lines), extra,
        request_id, framing,
    )  # fmt: skip


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def simple_response(
    status: int, body: str, *, close: bool, request_id: bytes = b"",
    extra: Headers = (),  # type: ignore[assignment]
) -> bytes:  # fmt: skip
    """A response the router makes itself (errors, redirects), text/plain."""
    payload = body.encode()
    reason = _REASONS.get(status, b"Unknown")
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(payload),
        b"Cache-Control: no-store\r\n",
    ]
    if request_id:
        lines.append(b"X-Request-Id: " + request_id + b"\r\n")
    lines += [n + b": " + v + b"\r\n" for n, v in extra]
    if close:
        lines.append(b"Connection: close\r\n")
    return b"".join(lines) + b"\r\n" + payload


def not_found_page(host: str) -> str:
    return (
        f"404 Not Found: no app is routed at {host or '(no Host header)'}.\n\n"
        "Each app answers at <app>.<cluster domain>; add other domains with\n"
        "  flynnp2p route add http <domain> -a <app>\n"
        "and list them with `flynnp2p route -a <app>`.\n"
    )


def unavailable_page(app: str, process_type: str) -> str:
    return (
        f"503 Service Unavailable: no {process_type} process of app {app} is up.\n\n"
        f"Check `flynnp2p ps -a {app}`, and scale with `flynnp2p scale {process_type}=1 -a {app}`.\n"
    )


def https_location(host: bytes, target: bytes, https_port: int | None) -> bytes:
    """Where an https_only route sends a plain-HTTP request: the same host (its port
    replaced by the router's HTTPS port, left out when it is 443) and target."""
    if host.startswith(b"["):
        end = host.find(b"]")
        name = host[: end + 1] if end >= 0 else host
    else:
        name = host.rsplit(b":", 1)[0] if b":" in host else host
    port = b"" if https_port in (None, 443) else b":%d" % https_port
    return b"https://" + name + port + target
