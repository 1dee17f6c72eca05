"""HTTP/1.1 message heads as the proxy rewrites them (pure: bytes in, bytes out).

The proxy never forwards a head as received: it rebuilds it from the parsed
fields, so what reaches a backend or a client is one unambiguous framing chosen
here (``Content-Length`` as received, or ``chunked`` re-encoded by the proxy),
and hop-by-hop headers (RFC 9110 7.6.1, plus any the ``Connection`` header
names) never cross.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from http import HTTPStatus

Headers = list[tuple[bytes, bytes]]

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
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9+/=_.:-]{20,200}")
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass(slots=True)
class RequestHead:
    """A parsed request head and what the proxy needs to know about its framing."""

    method: str
    target: bytes
    version: str  # "1.0" | "1.1"
    headers: Headers
    keep_alive: bool
    upgrade: bool = False
    host: bytes = b""
    content_length: int | None = None
    chunked: bool = False
    expect_continue: bool = False
    connection_tokens: frozenset[bytes] = frozenset()
    forwarded_for: bytes = b""
    request_id: bytes = b""
    upgrade_proto: bytes = b""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

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
    version: str
    headers: Headers
    keep_alive: bool
    content_length: int | None = None
    chunked: bool = False
    connection_tokens: frozenset[bytes] = field(default_factory=frozenset)


def classify_request(head: RequestHead) -> None:
    """Fill the framing and routing fields of `head` from its headers."""
    for name, value in head.headers:
        n = name.lower()
        if n == b"host":
            head.host = value
        elif n == b"content-length":
            head.content_length = int(value)  # the parser has checked it is one number
        elif n == b"transfer-encoding":
            head.chunked = True  # the parser refuses any other final coding
        elif n == b"connection":
            head.connection_tokens |= {t.strip().lower() for t in value.split(b",")}
        elif n == b"expect":
            head.expect_continue = value.lower() == b"100-continue"
        elif n == b"x-forwarded-for":
            head.forwarded_for = value
        elif n == b"x-request-id":
            head.request_id = value
        elif n == b"upgrade":
            head.upgrade_proto = value


def classify_response(head: ResponseHead) -> None:
    for name, value in head.headers:
        n = name.lower()
        if n == b"content-length":
            head.content_length = int(value)
        elif n == b"transfer-encoding":
            head.chunked = value.lower().rstrip().endswith(b"chunked")
        elif n == b"connection":
            head.connection_tokens |= {t.strip().lower() for t in value.split(b",")}


def valid_request_id(value: bytes) -> bool:
    return REQUEST_ID_RE.fullmatch(value) is not None


def _end_to_end(headers: Headers, tokens: frozenset[bytes], drop: frozenset[bytes]) -> list[bytes]:
    out = []
    for name, value in headers:
        n = name.lower()
        if n in HOP_BY_HOP or n in drop or n in tokens:
            continue
        out.append(name + b": " + value + b"\r\n")
    return out


def upstream_request(
    head: RequestHead, *, client_ip: str, proto: str, port: int, request_id: bytes,
    start_ms: int,
) -> bytes:  # fmt: skip
    """The head sent to a backend: end-to-end headers, the router's, one framing."""
    lines = [f"{head.method} ".encode() + head.target + b" HTTP/1.1\r\n"]
    lines += _end_to_end(head.headers, head.connection_tokens, ROUTER_SET)
    xff = (head.forwarded_for + b", " if head.forwarded_for else b"") + client_ip.encode()
    lines.append(
        b"X-Forwarded-For: " + xff + b"\r\nX-Forwarded-Proto: " + proto.encode()
        + b"\r\nX-Forwarded-Port: " + str(port).encode()
        + b"\r\nX-Request-Id: " + request_id
        + b"\r\nX-Request-Start: t=" + str(start_ms).encode() + b"\r\n"
    )  # fmt: skip
    if head.upgrade:
        lines.append(b"Connection: Upgrade\r\nUpgrade: " + head.upgrade_proto + b"\r\n")
    if head.chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif head.content_length is not None:
        lines.append(b"Content-Length: " + str(head.content_length).encode() + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def client_response(
    head: ResponseHead, *, body_framing: str, keep_alive: bool, client_version: str,
    request_id: bytes,
) -> bytes:  # fmt: skip
    """The head sent to the client. `body_framing`: "length", "chunked", "close" or
    "none" (HEAD, 1xx, 204, 304: the upstream's Content-Length is passed on as is)."""
    reason = _REASONS.get(head.status, b"Unknown")
    lines = [b"HTTP/1.1 " + str(head.status).encode() + b" " + reason + b"\r\n"]
    lines += _end_to_end(head.headers, head.connection_tokens, frozenset({b"x-request-id"}))
    lines.append(b"X-Request-Id: " + request_id + b"\r\n")
    if body_framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif body_framing in ("length", "none") and head.content_length is not None:
        lines.append(b"Content-Length: " + str(head.content_length).encode() + b"\r\n")
    if head.status == 101:
        lines.append(b"Connection: Upgrade\r\n")
        lines += [n + b": " + v + b"\r\n" for n, v in head.headers if n.lower() == b"upgrade"]
    elif not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif client_version == "1.0":
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


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
