"""Which requests have a body length that can be read more than one way.

Theory of operation
-------------------
HTTP/1.1 frames a request body by ``Transfer-Encoding: chunked`` or by
``Content-Length``.  A request carrying both, two Content-Lengths, or a length
that is not a plain decimal number is read one way by this server and possibly
another way by a proxy in front of it: the rest of the bytes then become a second,
smuggled request.  RFC 9112 §6.3 lets a server refuse such a message and close
the connection, which is what the API does, before the app sees it.

h11 (under hypercorn) already refuses a malformed number, conflicting lengths
and unknown transfer codings itself (400 or 501, empty body); this check is the
one that also covers what it lets through (both headers at once, identical
duplicate lengths) and gives every refusal a reason.  A length over the
endpoint's limit is answered 413 at once, without reading any of the body.

The decoded request path is checked here too (`target_problem`): no name, id or
digest the API takes holds a control character, and a path with one (``%00``)
cannot even be forwarded to the leader (httpx refuses to build such a URL).

Both checks are pure: the raw ASGI headers or path in, the refusal (if any) out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str


def framing_problem(headers: Iterable[tuple[bytes, bytes]], limit: int) -> Refusal | None:
    """Why this request's body framing is refused, or None if it is unambiguous."""
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding":
            codings.append(value)
    if lengths and codings:
        return _bad("the request has both Content-Length and Transfer-Encoding: send one of them")
    if len(lengths) > 1:
        return _bad(f"the request has {len(lengths)} Content-Length headers: send one")
    if len(codings) > 1:
        return _bad(f"the request has {len(codings)} Transfer-Encoding headers: send one")
    if codings and codings[0].strip().lower() != b"chunked":
        return _bad(f"Transfer-Encoding {_show(codings[0])} is not accepted: only 'chunked' is")
    if lengths:
        text = lengths[0].strip()
        # Only ASCII digits: int() would also take "+5" and "5_0".
        if not text or not all(0x30 <= c <= 0x39 for c in text):
            return _bad(
                f"Content-Length {_show(lengths[0])} is not accepted: "
                "expected a non-negative decimal integer"
            )
        # Twenty digits and more are over any limit (and int() refuses thousands).
        if len(text) >= 20 or int(text) > limit:
            return Refusal(
                413,
                "request_entity_too_large",
                f"a body of {text[:30].decode()} bytes is over this endpoint's limit of {limit} bytes",
            )
    return None


def _bad(message: str) -> Refusal:
    return Refusal(400, "bad_request", message)


def _show(value: bytes) -> str:
    text = repr(value.decode("latin-1"))
    return text if len(text) <= 40 else text[:37] + "..."


def target_problem(path: str) -> Refusal | None:
    """Why the (percent-decoded) request path is refused, or None."""
    for i, char in enumerate(path):
        if char < " " or char == "\x7f":
            return _bad(
                f"the request path has the control character {char!r} at {i}: "
                "names, ids and digests are printable"
            )
    return None
