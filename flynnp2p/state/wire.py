"""The peer protocol's encoding: msgpack envelopes, chunks, hints, and what cannot be sent.

Pure: no I/O here; `flynnp2p.state.replication` drives it and
`flynnp2p.api.internal` carries it over HTTP.

Messages (msgpack, strings as UTF-8, content type `MSGPACK`), each carrying the
wire version ``"v"``::

    push          {"v", "delta"}        an incomplete delta of fresh local writes
    push reply    {"applied": n}        (a stale replica answers 409 {"stale": true})
    sync request  {"v", "vv", "node"}   the puller's version vector and origin
    sync reply    {"v", "delta"} ...    concatenated, at most CHUNK_ENTRIES entries
                                        each; only the last is complete
    hint          "<origin> <seq>"      a serf user event payload (UTF-8 text)

A record whose strings are not valid Unicode cannot be encoded: the schema
refuses such strings, and `unencodable` checks a write exactly as it will be
sent, before it commits, so no replica holds what its peers cannot read.
`pack_delta` keeps a push or a pull from failing whole on an entry that slipped
through (it leaves the entry out, logged, and says how many it left out).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgpack

from flynnp2p.state.errors import RecordError
from flynnp2p.state.merge import Change, Delete, Delta, Entry, VersionVector, decode_vector

log = logging.getLogger(__name__)

# What msgpack raises for a value it cannot encode (a lone surrogate, an int
# beyond 64 bits, a type it does not know).
PACK_ERRORS = (UnicodeEncodeError, TypeError, ValueError, OverflowError)

WIRE_VERSION = 1
MSGPACK = "application/x-msgpack"
CHUNK_ENTRIES = 2000  # entries per sync chunk (and the most a push batches)


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


def pack_delta(delta: Delta) -> tuple[bytes, int]:
    """`delta`'s envelope as bytes, and how many entries it left out because they
    cannot be encoded (0 unless something slipped past `unencodable`)."""
    try:
        return pack(envelope(delta)), 0
    except PACK_ERRORS:
        good = tuple(packable(delta.entries))
        kept = Delta(good, delta.vv, delta.horizon, delta.complete)
        return pack(envelope(kept)), len(delta.entries) - len(good)


def chunked(delta: Delta, size: int = CHUNK_ENTRIES) -> list[Delta]:
    """A sync reply: `delta` cut into chunks of at most `size` entries (at least
    one chunk, even with no entries), of which only the last is complete."""
    entries = delta.entries
    return [
        Delta(entries[start : start + size], delta.vv, delta.horizon, start + size >= len(entries))
        for start in range(0, max(len(entries), 1), size)
    ]


def message_reader() -> msgpack.Unpacker:
    """Reassembles messages from a stream cut anywhere (a sync reply): feed it bytes,
    iterate it for the messages complete so far."""
    return msgpack.Unpacker(raw=False, max_buffer_size=256 << 20)


def sync_request(vv: VersionVector, node: str) -> bytes:
    return pack({"v": WIRE_VERSION, "vv": dict(vv), "node": node})


def open_sync_request(message: Any) -> tuple[VersionVector, str | None]:
    """The puller's vector and origin (None if it sent none); RecordError if malformed."""
    body = check_version(message)
    node = body.get("node")
    return decode_vector("vv", body.get("vv", {})), node if isinstance(node, str) else None


def complete_vector(message: Any) -> VersionVector | None:
    """The sender's vector, if `message` (an applied envelope) is a complete delta:
    the last chunk of a sync reply tells what the peer held when it answered."""
    delta = message.get("delta") if isinstance(message, dict) else None
    if isinstance(delta, dict) and delta.get("complete"):
        return dict(delta.get("vv", {}))
    return None


def hint(origin: str, seq: int) -> bytes:
    return f"{origin} {seq}".encode()


def open_hint(payload: bytes) -> tuple[str, int] | None:
    """(origin, seq) of a hint; None for anything else (hints are best effort)."""
    try:
        origin, seq_text = payload.decode().split(" ")
        return origin, int(seq_text)
    except ValueError:  # UnicodeDecodeError is one
        return None


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
