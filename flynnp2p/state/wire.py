"""The peer protocol's encoding: msgpack envelopes, and what cannot be sent.

Every message between peers is msgpack (strings as UTF-8) carrying the wire
version.  A record whose strings are not valid Unicode cannot be encoded: the
schema refuses such strings, and `unencodable` checks a write exactly as it will
be sent, before it commits, so no replica holds what its peers cannot read.
`packable` keeps a pull from failing whole on an entry that slipped through.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgpack

from flynnp2p.state.errors import RecordError
from flynnp2p.state.merge import Change, Delete, Delta, Entry

log = logging.getLogger(__name__)

# What msgpack raises for a value it cannot encode (a lone surrogate, an int
# beyond 64 bits, a type it does not know).
PACK_ERRORS = (UnicodeEncodeError, TypeError, ValueError, OverflowError)

WIRE_VERSION = 1


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def envelope(delta: Delta) -> dict[str, Any]:
    """Every message between peers carries the wire version."""
    return {"v": WIRE_VERSION, "delta": delta.to_wire()}


def check_version(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RecordError("message", "expected a map")
    if message.get("v") != WIRE_VERSION:
        raise RecordError(
            "message.v", f"unsupported wire version {message.get('v')!r}; this node speaks {WIRE_VERSION}"
        )
    return message


def open_envelope(message: Any) -> Delta:
    try:
        return Delta.from_wire(check_version(message).get("delta"))
    except (TypeError, KeyError, AttributeError) as exc:  # e.g. an unhashable "kind"
        raise RecordError("message.delta", f"malformed: {str(exc) or type(exc).__name__}") from None


def unencodable(changes: Sequence[Change]) -> RecordError | None:
    """Why one of `changes` cannot be sent to peers, or None.

    The schema refuses what it knows to be unencodable; this is the last check,
    as the peer protocol itself encodes, so that nothing a peer cannot read commits."""
    for change in changes:
        if isinstance(change, Delete):
            continue
        try:
            pack(change.to_wire())
        except PACK_ERRORS as exc:
            return RecordError(change.KIND, f"cannot be sent to peers: {str(exc) or type(exc).__name__}")
    return None


def packable(entries: Sequence[Entry]) -> list[Entry]:
    """The entries that encode for peers (the others are logged)."""
    out = []
    for e in entries:
        try:
            pack(e.to_wire())
        except PACK_ERRORS as exc:
            log.error("entry %s/%s (%s #%d) cannot be encoded for peers, skipped: %s",
                      e.kind, e.key, e.origin, e.seq, exc)  # fmt: skip
            continue
        out.append(e)
    return out
