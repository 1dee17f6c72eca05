"""Plain message heads read in one pass over the bytes, without a parser callback per
header (pure).

Theory of operation
-------------------
On the fast lane (`lane`), most of what parsing costs is not llhttp but the
Python callbacks ``httptools`` makes for each header, the head and the end of a
message. Most heads are plain, though: a request line or status line, a few
well-formed header lines, nothing ambiguous. `request` and `response` read such
a head with two compiled regular expressions (a whole-head grammar, then the
lines the proxy must read or drop, found case-insensitively) and build the same
`http1.RequestHead`/`ResponseHead` the callbacks would.

They *decline* (return None) whatever is not plainly simple, and the caller then
feeds the very same bytes to the ``httptools`` parser, which accepts or refuses
them as it always has: so this path accepts only a subset of what llhttp accepts,
and refuses nothing itself. Declined: an incomplete head or a message that is not
exactly the bytes given (a partial body, a pipelined request behind); obs-fold,
bare LF, any byte outside printable ASCII (and tab inside values), whitespace
before a colon or at the end of a value; a status line or request line of any
other shape (only origin-form targets; only the idempotent methods the lane
serves); a repeated header the proxy reads or drops; ``Transfer-Encoding``,
``Upgrade``, ``Expect``; a ``Content-Length`` on a request, or on a response any
but plain digits; ``Connection`` other than ``keep-alive`` or ``close``; 1xx,
204 and 304 responses; a head over the caller's limits. The property test
(tests/test_router_plainhead.py) checks with Hypothesis that for any bytes this
either declines or agrees with ``httptools`` on status or request line, framing,
keep-alive, the head's length and the headers the proxy passes on.

End-to-end header lines are passed on as received (one ``bytes`` per line for a
request, where `sticky` reads the cookie line by line; runs of lines between the
removed ones for a response), not re-rendered: the header's whitespace after
the colon is kept as the peer sent it.
"""

from __future__ import annotations

import re

from flynnp2p.router.http1 import REQUEST_SPECIAL, RESPONSE_SPECIAL, RequestHead, ResponseHead

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# The header lines, each as "\n" + line + "\r" (the status or request line's "\r" is
# left out before them, the last "\n" kept): the shape `_special` splits on.
# Printable ASCII only: no tab, CTL or obs-text; no empty name, no space before a colon.
_LINES = rb"\r(\n(?:" + _TOKEN + rb":[ -~]*+\r\n)*+)\r\n"
# origin-form target: RFC 3986 characters, no fragment
_TARGET = rb"/[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]*+"
_RESPONSE = re.compile(rb"HTTP/1\.([01]) ([2-5][0-9][0-9])(?: [ -~]*+)?" + _LINES)
_REQUEST = re.compile(
    rb"(GET|HEAD|PUT|DELETE|OPTIONS|TRACE) (" + _TARGET + rb") HTTP/1\.([01])" + _LINES
)


def _special(names: frozenset[bytes]) -> re.Pattern[bytes]:
    """Header lines by any of `names`, case-insensitively; ``split`` gives the runs of
    other lines between them, then each name and its value (leading spaces stripped,
    as llhttp does; the head matched the grammar above first, so the value is exact)."""
    alternatives = b"|".join(re.escape(n) for n in sorted(names, key=lambda n: (-len(n), n)))
    return re.compile(rb"\n(" + alternatives + rb"):[ ]*([^\r]*)\r", re.I)


_RESPONSE_SPECIAL = _special(RESPONSE_SPECIAL)
_REQUEST_SPECIAL = _special(REQUEST_SPECIAL)
_LINE = re.compile(rb"[^\r\n]++\r\n")
_MAX_DIGITS = 15
_METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE")}
_VERSIONS = {b"0": "1.0", b"1": "1.1"}
_REFUSED = (b"transfer-encoding", b"upgrade", b"expect")  # the parser decides these


def _specials(parts: list[bytes]) -> dict[bytes, bytes] | None:
    """name -> value from `split`'s parts; None if a name repeats or must be declined."""
    seen: dict[bytes, bytes] = {}
    for i in range(1, len(parts), 3):
        name = parts[i].lower()
        if name in seen:
            return None
        seen[name] = parts[i + 1]
    for name in _REFUSED:
        if name in seen:
            return None
    return seen


def _keep_alive(minor: bytes, connection: bytes | None) -> bool | None:
    """llhttp's rule for a self-delimited message; None for a Connection value this
    path does not read (the parser then decides)."""
    if connection is None:
        return minor == b"1"
    c = connection.lower()
    if c == b"close":
        return False
    if c == b"keep-alive":
        return True
    return None


def _lines(parts: list[bytes]) -> bytes:
    """The lines other than the special ones, each ending in CRLF."""
    return (parts[0] if len(parts) == 1 else b"".join(parts[::3]))[1:]


def _over(block: bytes, max_bytes: int, max_count: int) -> bool:
    """Whether `HeadBuilder` might refuse these lines: more than `max_count`, or the
    names and values over `max_bytes` as it counts them (each line as received
    is at least as long as its name and value plus 3, so 5/4 of the block bounds it)."""
    if 5 * len(block) > 4 * max_bytes:
        return True
    return len(block) > 4 * max_count and block.count(b"\n") - 1 > max_count  # (lines >= 4 bytes)


def response(
    data: bytes, max_bytes: int = 65536, max_count: int = 256
) -> tuple[ResponseHead, int] | None:
    """The head of the one complete response that is `data` (a ``Content-Length``
    body, all there) and where its body starts; None: declined (module docstring).
    The head's `lines` is one ``bytes`` with every end-to-end line."""
    m = _RESPONSE.match(data)
    if m is None:
        return None
    block = m.group(3)
    if _over(block, max_bytes, max_count):
        return None
    parts = _RESPONSE_SPECIAL.split(block)
    seen = _specials(parts) if len(parts) > 1 else {}
    if seen is None:
        return None
    end = m.end()
    cl = seen.get(b"content-length")
    if cl is None or not cl.isdigit() or len(cl) > _MAX_DIGITS or len(data) - end != int(cl):
        return None
    keep = _keep_alive(m.group(1), seen.get(b"connection"))
    status = int(m.group(2))
    if keep is None or status == 204 or status == 304:
        return None
    return ResponseHead(status, keep, [_lines(parts)], len(data) - end, False, None), end


def request(
    data: bytes, max_target: int = 8192, max_bytes: int = 32768, max_count: int = 100
) -> RequestHead | None:
    """The head of the one bodiless request that is `data`; None: declined (module
    docstring). The limits are the proxy's: over any of them the parser answers.
    The head's `lines` has one ``bytes`` per end-to-end line (`sticky` reads them)."""
    m = _REQUEST.match(data)
    if m is None or m.end() != len(data):
        return None
    target = m.group(2)
    block = m.group(4)
    if len(target) > max_target or _over(block, max_bytes, max_count):
        return None
    parts = _REQUEST_SPECIAL.split(block)
    seen = _specials(parts) if len(parts) > 1 else {}
    if seen is None or b"content-length" in seen:
        return None
    minor = m.group(3)
    keep = _keep_alive(minor, seen.get(b"connection"))
    if keep is None:
        return None
    text = _lines(parts)
    lines = _LINE.findall(text) if text else []
    return RequestHead(
        _METHODS[m.group(1)], target, _VERSIONS[minor], keep, lines, seen.get(b"host", b""),
        None, False, None, False, seen.get(b"x-forwarded-for"), seen.get(b"x-request-id"),
    )  # fmt: skip
