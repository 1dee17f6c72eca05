"""The router's lines in an app's log: Heroku-style ``key=value`` text (pure).

Theory of operation
-------------------
Every 5xx the router answers itself, and every retry on another backend, becomes
one line of the app's log on this node, with the job id ``router`` (so ``flynnp2p
log`` prints it as ``router[node]:``)::

    at=error code=H12 desc="Request timeout" method=GET path="/slow" host=shop.example
    request_id=4f… fwd=10.0.0.9 protocol=http backend=web-3f2a…@10.0.0.2:5001
    connect=1ms service=60000ms status=504 bytes=38

The codes are Heroku's (https://devcenter.heroku.com/articles/error-codes), mapped
onto this router's failures:

==== ====== =======================================================================
code status when
==== ====== =======================================================================
H10  503    the route's process type has no backend that takes traffic
H12  504    the backend sent no response head within ``response_header_timeout``
            or turned lost first (its host gone: desc "Backend lost", `lost`)
H13  502    the backend closed or reset the connection without a response
H17  502    the backend's response was not valid HTTP (or an unasked 101)
H18  502    the backend stopped reading the request before it was sent
H19  504    no backend could be connected to within ``connect_timeout``
H21  502    every backend tried refused the connection
==== ====== =======================================================================

A retry is an ``at=warning`` line with the code of the attempt that failed (H13
for one given up because its backend turned lost), the backend it failed on
(``backend=``) and the one tried next (``retry=``), and no status or bytes
(nothing was answered yet).

Values come from the request (method, path, host): a value that is not a plain
token is quoted, with ``"`` and ``\\`` escaped and every character outside printable
ASCII written as ``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN``, so a line is always one line of
printable ASCII and no request can forge a field or a line. `parse_line` reads a
line back into its fields (tests, and anyone grepping logs with a program).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SOURCE = "router"  # the job id of router lines in an app's log

DESCRIPTIONS = {
    "H10": "No backend is up",
    "H12": "Request timeout",
    "H13": "Connection closed without response",
    "H17": "Poorly formatted HTTP response",
    "H18": "Server request interrupted",
    "H19": "Backend connection timeout",
    "H21": "Backend connection refused",
}

_BARE = re.compile(r"[A-Za-z0-9_.:/@\[\]+-]+")
_FIELD = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]*)(?: |$)')
_ESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)')


@dataclass(frozen=True, slots=True)
class RouterEvent:
    """One failure or retry as the proxy saw it (text is made later, off the request path)."""

    code: str
    method: str
    path: str
    host: str
    request_id: str
    fwd: str
    protocol: str
    backend: str = ""  # "job@address" of the backend that failed ("" when none was tried)
    connect_ms: int = 0
    service_ms: int = 0
    status: int = 0  # 0: a retry (nothing answered yet)
    bytes: int = 0
    retry: str = ""  # "job@address" tried next
    desc: str = ""  # the description, when not the code's own (`DESCRIPTIONS`)


def quote(value: str) -> str:
    """`value` bare if it is a plain token, else double-quoted and escaped."""
    return value if _BARE.fullmatch(value) else always_quoted(value)


def always_quoted(value: str) -> str:
    out = []
    for ch in value:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


def format_line(e: RouterEvent) -> str:
    """The log text of `e` (one line of printable ASCII)."""
    fields: list[tuple[str, str]] = [
        ("at", "warning" if e.retry else "error"),
        ("code", e.code),
        ("desc", always_quoted((e.desc or DESCRIPTIONS.get(e.code, "Router error"))
                               + (", retrying" if e.retry else ""))),
        ("method", quote(e.method)),
        ("path", always_quoted(e.path)),
        ("host", quote(e.host)),
        ("request_id", quote(e.request_id)),
        ("fwd", quote(e.fwd)),
        ("protocol", quote(e.protocol)),
        ("backend", quote(e.backend) if e.backend else ""),
        ("connect", f"{e.connect_ms}ms"),
        ("service", f"{e.service_ms}ms"),
    ]
    if e.retry:
        fields.append(("retry", quote(e.retry)))
    else:
        fields += [("status", str(e.status)), ("bytes", str(e.bytes))]
    return " ".join(f"{k}={v}" for k, v in fields)


def _unescape(m: re.Match[str]) -> str:
    s = m.group(1)
    return chr(int(s[1:], 16)) if len(s) > 1 else s


def parse_line(text: str) -> dict[str, str]:
    """The fields of a router line, values unquoted; ValueError if it is not one."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _FIELD.match(text, pos)
        if m is None:
            raise ValueError(f"not a key=value field at {pos}: {text[pos:pos + 40]!r}")
        key, raw = m.group(1), m.group(2)
        if key in fields:
            raise ValueError(f"field {key!r} appears twice")
        fields[key] = _ESCAPE.sub(_unescape, raw[1:-1]) if raw.startswith('"') else raw
        pos = m.end()
    return fields
