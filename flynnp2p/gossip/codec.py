"""Sans-I/O codec for serf's msgpack RPC protocol (the agent's "IPC").

Theory of operation
-------------------
The wire is a bare sequence of msgpack objects on a TCP stream: no length
prefix, no framing. A request is a header ``{"Command", "Seq"}`` followed by a
body map when the command takes one. Every message from the agent starts with
a header ``{"Seq", "Error"}``; whether a body map follows is *not* in the header,
it depends on the command that ``Seq`` belongs to:

- ``HEADER`` commands (handshake, auth, event, tags, ...) answer with the
  header alone, error or not;
- ``BODY`` commands (members, join, stats, ...) always send one body, even with
  an error (``join`` reports ``{"Num": 0}`` next to its error text);
- ``STREAM`` commands (stream, monitor) answer with a bare header, then send
  every record as header-with-the-same-Seq plus body, until ``stop``;
- ``QUERY`` answers like a stream and ends with a ``{"Type": "done"}`` record.

Two errors precede command dispatch on the agent ("Handshake required",
"Authentication required") and come without a body whatever the command.

So the codec keeps, per connection, the command of every pending Seq and the
set of open streams. It allocates the Seqs itself (from 1, so a desynchronised
agent, which answers with Seq 0, is caught as a reply to nothing). A header whose
Seq is neither pending nor a stream cannot be decoded -- nobody knows whether a
body follows -- so the codec stops there with ``RemoteProtocolError`` and the
connection must be dropped. Records can still arrive after ``stop``: the codec
remembers stopped Seqs for the life of the connection and drops their records.

Use: ``seq, data = codec.send_request(command, body)`` and write ``data``;
``codec.receive_data(chunk)`` then call ``codec.next_event()`` until it returns
``None``. Events are ``Reply(seq, error, body | None)`` for the first answer to
a request and ``StreamRecord(seq, body)`` for stream and query records.

Errors
------
::

    SerfError (503)           root of everything the serf client raises
    ├── LocalProtocolError    this process misused the protocol (a bug here, 500):
    │                         unknown command, body missing or unexpected,
    │                         request before the handshake, stop of a non-stream
    └── RemoteProtocolError   the agent sent something the protocol does not
                              allow: undecodable msgpack, a header that is not
                              {"Seq": int, "Error": str}, a reply to nothing,
                              a body that is not a map. The codec is then
                              unusable; every later next_event() re-raises it.

``flynnp2p.gossip.rpc`` adds ``SerfConnectionError`` and ``SerfCommandError``
under the same root.  ``SerfError`` is a ``ClusterError`` of the one error tree
(`flynnp2p.errors`): serf not answering is the cluster being unavailable for
now, and the API answers 503 with no translation on the way.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import msgpack

from flynnp2p.errors import ClusterError, FlynnError

__all__ = [
    "COMMANDS",
    "CommandSpec",
    "Event",
    "LocalProtocolError",
    "Member",
    "QueryRecord",
    "RemoteProtocolError",
    "Reply",
    "ReplyShape",
    "SerfCodec",
    "SerfError",
    "StreamRecord",
    "decode_member",
    "decode_members",
    "decode_query_record",
    "decode_stream_event",
]

Body = dict[str, Any]


class SerfError(ClusterError):
    """Root of every error raised by the serf RPC client."""


class LocalProtocolError(SerfError):
    """This process tried to send something the protocol does not allow."""

    status = FlynnError.status  # a bug here, not the cluster being unavailable
    code = FlynnError.code


class RemoteProtocolError(SerfError):
    """The agent sent something the protocol does not allow."""


class ReplyShape(enum.Enum):
    HEADER = "header"  # header only
    BODY = "body"  # header, then exactly one body (even on error)
    STREAM = "stream"  # bare header, then records until stop
    QUERY = "query"  # bare header, then records until a "done" record


@dataclass(frozen=True, slots=True)
class CommandSpec:
    takes_body: bool
    reply: ReplyShape


_H, _B, _S, _Q = ReplyShape.HEADER, ReplyShape.BODY, ReplyShape.STREAM, ReplyShape.QUERY

# Serf 0.8/0.9 agent IPC (cmd/serf/command/agent/ipc.go). Newer serf masters
# answer force-leave with a body {"Exists"}; the packaged 0.9.4 does not.
COMMANDS: Final[Mapping[str, CommandSpec]] = MappingProxyType(
    {
        "handshake": CommandSpec(True, _H),
        "auth": CommandSpec(True, _H),
        "event": CommandSpec(True, _H),
        "force-leave": CommandSpec(True, _H),
        "join": CommandSpec(True, _B),
        "members": CommandSpec(False, _B),
        "members-filtered": CommandSpec(True, _B),
        "stream": CommandSpec(True, _S),
        "monitor": CommandSpec(True, _S),
        "stop": CommandSpec(True, _H),
        "leave": CommandSpec(False, _H),
        "install-key": CommandSpec(True, _B),
        "use-key": CommandSpec(True, _B),
        "remove-key": CommandSpec(True, _B),
        "list-keys": CommandSpec(False, _B),
        "tags": CommandSpec(True, _H),
        "query": CommandSpec(True, _Q),
        "respond": CommandSpec(True, _H),
        "stats": CommandSpec(False, _B),
        "get-coordinate": CommandSpec(True, _B),
    }
)

# Checked by the agent before dispatching the command: these never carry a body.
_PRE_DISPATCH_ERRORS: Final = frozenset({"Handshake required", "Authentication required"})


@dataclass(frozen=True, slots=True)
class Reply:
    """The first answer to request ``seq``; ``error`` is "" on success."""

    seq: int
    error: str
    body: Body | None


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One record of the stream or query opened by request ``seq``."""

    seq: int
    body: Body


Event = Reply | StreamRecord


@dataclass(frozen=True, slots=True)
class _AwaitingReplyBody:
    seq: int
    error: str


@dataclass(frozen=True, slots=True)
class _AwaitingRecordBody:
    seq: int
    drop: bool


class SerfCodec:
    """Protocol state of one RPC connection. Not thread-safe, no I/O."""

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(raw=False)
        self._next_seq = 1
        self._handshake_sent = False
        self._pending: dict[int, str] = {}  # seq -> command awaiting its first reply
        self._open: dict[int, ReplyShape] = {}  # seq -> STREAM/QUERY producing records
        self._stopped: set[int] = set()  # stream seqs we sent stop for
        self._awaiting: _AwaitingReplyBody | _AwaitingRecordBody | None = None
        self._error: RemoteProtocolError | None = None

    # -- outgoing ---------------------------------------------------------

    def send_request(
        self, command: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, bytes]:
        """Allocate a Seq for ``command`` and return it with the bytes to write."""
        spec = COMMANDS.get(command)
        if spec is None:
            raise LocalProtocolError(
                f"unknown serf command {command!r}; known: {', '.join(sorted(COMMANDS))}"
            )
        if spec.takes_body and body is None:
            raise LocalProtocolError(f"serf command {command!r} needs a body")
        if not spec.takes_body and body is not None:
            raise LocalProtocolError(f"serf command {command!r} takes no body")
        if command == "handshake":
            if self._handshake_sent:
                raise LocalProtocolError("handshake already sent on this connection")
        elif not self._handshake_sent:
            raise LocalProtocolError(f"{command!r} before handshake: the agent would hang up")
        seq = self._next_seq
        data = _pack({"Command": command, "Seq": seq})
        if body is not None:
            try:
                data += _pack(dict(body))
            except (TypeError, ValueError, OverflowError) as exc:
                raise LocalProtocolError(f"{command!r} body cannot be encoded: {exc}") from exc
        if command == "stop":  # state changes only once nothing can fail
            assert body is not None
            self._mark_stopped(body.get("Stop"))
        self._next_seq += 1
        if command == "handshake":
            self._handshake_sent = True
        self._pending[seq] = command
        return seq, data

    def _mark_stopped(self, target: object) -> None:
        if not isinstance(target, int) or isinstance(target, bool):
            raise LocalProtocolError(f"stop needs {{'Stop': <stream seq>}}, got {target!r}")
        command = self._pending.get(target)
        if target in self._open:
            if self._open[target] is ReplyShape.QUERY:
                raise LocalProtocolError(
                    "a query cannot be stopped; it ends with its 'done' record"
                )
            del self._open[target]
        elif command is None or COMMANDS[command].reply is not ReplyShape.STREAM:
            raise LocalProtocolError(f"stop of seq {target}, which is not an open stream")
        self._stopped.add(target)

    # -- incoming ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the connection (any split, any size)."""
        try:
            self._unpacker.feed(data)
        except msgpack.UnpackException as exc:  # BufferFull: a message over 100 MiB
            self._error = RemoteProtocolError(f"serf sent an oversized message: {exc!r}")
            raise self._error from exc

    def next_event(self) -> Event | None:
        """Return the next complete event, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    @property
    def in_message(self) -> bool:
        """True while a header has been read and its body is still due."""
        return self._awaiting is not None

    def _next_event(self) -> Event | None:
        while True:
            try:
                obj = next(self._unpacker)
            except StopIteration:
                return None
            except (ValueError, msgpack.UnpackException) as exc:
                raise RemoteProtocolError(f"undecodable msgpack from serf: {exc}") from exc
            awaiting, self._awaiting = self._awaiting, None
            event: Event | None
            if awaiting is None:
                event = self._on_header(obj)
            elif isinstance(awaiting, _AwaitingReplyBody):
                event = Reply(awaiting.seq, awaiting.error, _as_body(obj))
            else:
                event = self._on_record(awaiting, _as_body(obj))
            if event is not None:
                return event

    def _on_header(self, obj: object) -> Reply | None:
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"expected a reply header map, got {type(obj).__name__}")
        seq, error = obj.get("Seq"), obj.get("Error", "")
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(error, str):
            raise RemoteProtocolError(f"malformed reply header {obj!r}")
        command = self._pending.pop(seq, None)
        if command is not None:
            shape = COMMANDS[command].reply
            if shape is ReplyShape.BODY and error not in _PRE_DISPATCH_ERRORS:
                self._awaiting = _AwaitingReplyBody(seq, error)
                return None
            opens = shape in (ReplyShape.STREAM, ReplyShape.QUERY) and not error
            if opens and seq not in self._stopped:
                self._open[seq] = shape
            return Reply(seq, error, None)
        if seq in self._open or seq in self._stopped:
            self._awaiting = _AwaitingRecordBody(seq, drop=seq in self._stopped)
            return None
        raise RemoteProtocolError(
            f"serf sent Seq {seq}, which matches no pending request and no open stream"
        )

    def _on_record(self, awaiting: _AwaitingRecordBody, body: Body) -> StreamRecord | None:
        if self._open.get(awaiting.seq) is ReplyShape.QUERY and body.get("Type") == "done":
            del self._open[awaiting.seq]
        if awaiting.drop:
            return None
        return StreamRecord(awaiting.seq, body)


def _pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _as_body(obj: object) -> Body:
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"expected a body map, got {type(obj).__name__}")
    return obj


# -- typed views of bodies (pure) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    addr: str
    port: int
    tags: dict[str, str] = field(hash=False)  # hash on the other fields
    status: str = ""


@dataclass(frozen=True, slots=True)
class QueryRecord:
    type: str  # "ack" | "response" | "done"
    from_: str
    payload: bytes


def decode_member(obj: object) -> Member:
    """Decode one entry of a "Members" list. ``Addr`` is 4 or 16 raw bytes."""
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"member is not a map: {obj!r}")
    try:
        ip = ipaddress.ip_address(bytes(obj["Addr"]))
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # Go's net.IP often carries IPv4 in 16 bytes
        tags = obj.get("Tags") or {}
        member = Member(
            name=str(obj["Name"]),
            addr=str(ip),
            port=int(obj["Port"]),
            tags={str(k): str(v) for k, v in tags.items()},
            status=str(obj["Status"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RemoteProtocolError(f"malformed member {obj!r}: {exc}") from exc
    return member


def decode_members(body: Body) -> list[Member]:
    members = body.get("Members") or []
    if not isinstance(members, list):
        raise RemoteProtocolError(f"'Members' is not a list: {members!r}")
    return [decode_member(m) for m in members]


def decode_query_record(body: Body) -> QueryRecord:
    kind, from_, payload = body.get("Type"), body.get("From") or "", body.get("Payload") or b""
    if kind not in ("ack", "response", "done") or not isinstance(from_, str):
        raise RemoteProtocolError(f"malformed query record {body!r}")
    if not isinstance(payload, bytes):
        raise RemoteProtocolError(f"query record payload is not bytes: {payload!r}")
    return QueryRecord(kind, from_, payload)


def decode_stream_event(body: Body) -> Body:
    """Normalise a stream record: members become ``Member``, a nil payload b""."""
    event = dict(body)
    if not isinstance(event.get("Event"), str):
        raise RemoteProtocolError(f"stream record without an 'Event': {body!r}")
    if "Members" in event:
        event["Members"] = decode_members(event)
    if "Payload" in event and event["Payload"] is None:
        event["Payload"] = b""
    return event
