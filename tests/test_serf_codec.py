"""Unit tests of the sans-I/O serf RPC codec: synchronous, bytes in, events out.

The agent side of every conversation is packed here the way serf's Go encoder
writes it (str as msgpack str, []byte as msgpack bin), as measured against
serf 0.9.4 (`serf version` 0.8.2-dev).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flynnp2p.gossip.codec import (
    COMMANDS,
    Event,
    LocalProtocolError,
    Member,
    QueryRecord,
    RemoteProtocolError,
    Reply,
    ReplyShape,
    SerfCodec,
    SerfError,
    StreamRecord,
    decode_member,
    decode_members,
    decode_query_record,
    decode_stream_event,
)


def pack(*objs: object) -> bytes:
    return b"".join(msgpack.packb(o, use_bin_type=True) for o in objs)


def hdr(seq: int, error: str = "") -> dict[str, Any]:
    return {"Seq": seq, "Error": error}


def drain(codec: SerfCodec) -> list[Event]:
    events = []
    while (event := codec.next_event()) is not None:
        events.append(event)
    return events


def feed_chunks(codec: SerfCodec, chunks: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        codec.receive_data(chunk)
        events.extend(drain(codec))
    return events


def ready_codec() -> SerfCodec:
    codec = SerfCodec()
    seq, _ = codec.send_request("handshake", {"Version": 1})
    codec.receive_data(pack(hdr(seq)))
    assert drain(codec) == [Reply(seq, "", None)]
    return codec


MEMBER_WIRE = {
    "Name": "n1",
    "Addr": b"\x7f\x00\x00\x0b",
    "Port": 7946,
    "Tags": {"role": "x"},
    "Status": "alive",
    "ProtocolMin": 1,
    "ProtocolMax": 5,
    "ProtocolCur": 2,
    "DelegateMin": 2,
    "DelegateMax": 5,
    "DelegateCur": 4,
}


# -- requests -----------------------------------------------------------------


def test_requests_are_header_then_body_with_fresh_seqs() -> None:
    codec = SerfCodec()
    seq1, data1 = codec.send_request("handshake", {"Version": 1})
    seq2, data2 = codec.send_request("members")
    seq3, data3 = codec.send_request(
        "event", {"Name": "d", "Payload": b"\x00\xff", "Coalesce": False}
    )
    assert (seq1, seq2, seq3) == (1, 2, 3)
    assert data1 == pack({"Command": "handshake", "Seq": 1}, {"Version": 1})
    assert data2 == pack({"Command": "members", "Seq": 2})
    objs = list(msgpack.Unpacker(io.BytesIO(data3), raw=False))
    assert objs == [
        {"Command": "event", "Seq": 3},
        {"Name": "d", "Payload": b"\x00\xff", "Coalesce": False},
    ]
    assert data3.count(b"\xc4\x02\x00\xff") == 1  # payload travels as msgpack bin8


@pytest.mark.parametrize(
    ("command", "body", "message"),
    [
        ("bogus", None, "unknown serf command 'bogus'"),
        ("join", None, "needs a body"),
        ("members", {}, "takes no body"),
        ("handshake", {"Version": 1}, "handshake already sent"),
        ("stop", {"Stop": 99}, "not an open stream"),
        ("stop", {"Stop": "1"}, "stop needs"),
        ("event", {"Name": "x", "Payload": object()}, "cannot be encoded"),
    ],
)
def test_local_misuse_is_refused(command: str, body: dict[str, Any] | None, message: str) -> None:
    codec = ready_codec()
    with pytest.raises(LocalProtocolError, match=message):
        codec.send_request(command, body)


def test_nothing_before_handshake() -> None:
    with pytest.raises(LocalProtocolError, match="before handshake"):
        SerfCodec().send_request("members")


def test_a_query_cannot_be_stopped() -> None:
    codec = ready_codec()
    seq, _ = codec.send_request("query", {"Name": "q", "Payload": b""})
    codec.receive_data(pack(hdr(seq)))
    drain(codec)
    with pytest.raises(LocalProtocolError, match="query cannot be stopped"):
        codec.send_request("stop", {"Stop": seq})


def test_errors_share_one_root() -> None:
    assert issubclass(LocalProtocolError, SerfError)
    assert issubclass(RemoteProtocolError, SerfError)


# -- reply shapes ---------------------------------------------------------------


# handshake (once per connection) and stop (needs a stream) are covered elsewhere
HEADER_COMMANDS = sorted(
    c
    for c, s in COMMANDS.items()
    if s.reply is ReplyShape.HEADER and c not in ("handshake", "stop")
)
BODY_COMMANDS = sorted(c for c, s in COMMANDS.items() if s.reply is ReplyShape.BODY)


@pytest.mark.parametrize("command", HEADER_COMMANDS)
def test_header_only_replies(command: str) -> None:
    codec = ready_codec()
    seq, _ = codec.send_request(command, {} if COMMANDS[command].takes_body else None)
    codec.receive_data(pack(hdr(seq, "boom"), hdr(seq + 1000)))
    assert codec.next_event() == Reply(seq, "boom", None)
    with pytest.raises(RemoteProtocolError):  # the next header is not swallowed as a body
        codec.next_event()


@pytest.mark.parametrize("command", BODY_COMMANDS)
def test_body_replies_always_carry_a_body(command: str) -> None:
    codec = ready_codec()
    seq, _ = codec.send_request(command, {} if COMMANDS[command].takes_body else None)
    codec.receive_data(pack(hdr(seq, "some error"), {"X": 1}))
    assert drain(codec) == [Reply(seq, "some error", {"X": 1})]


def test_members_reply_decodes_members() -> None:
    codec = ready_codec()
    seq, _ = codec.send_request("members")
    codec.receive_data(pack(hdr(seq), {"Members": [MEMBER_WIRE]}))
    [reply] = drain(codec)
    assert isinstance(reply, Reply) and reply.body is not None
    assert decode_members(reply.body) == [Member("n1", "127.0.0.11", 7946, {"role": "x"}, "alive")]


def test_join_error_comes_with_a_body() -> None:
    codec = ready_codec()
    seq, _ = codec.send_request("join", {"Existing": ["127.0.0.99:1"], "Replay": False})
    error = "1 error occurred:\n\t* Failed to join 127.0.0.99: connection refused\n\n"
    members_seq, _ = codec.send_request("members")
    codec.receive_data(pack(hdr(seq, error), {"Num": 0}, hdr(members_seq), {"Members": []}))
    assert drain(codec) == [Reply(seq, error, {"Num": 0}), Reply(members_seq, "", {"Members": []})]


@pytest.mark.parametrize("error", ["Authentication required", "Handshake required"])
def test_pre_dispatch_errors_have_no_body_even_for_body_commands(error: str) -> None:
    codec = ready_codec()
    seq, _ = codec.send_request("members")
    seq2, _ = codec.send_request("stats")
    codec.receive_data(pack(hdr(seq, error), hdr(seq2), {"serf": {}}))
    assert drain(codec) == [Reply(seq, error, None), Reply(seq2, "", {"serf": {}})]


# -- streams and queries --------------------------------------------------------


def test_stream_reply_then_records_under_the_same_seq() -> None:
    codec = ready_codec()
    seq, _ = codec.send_request("stream", {"Type": "*"})
    user = {"Event": "user", "LTime": 3, "Name": "deploy", "Payload": b"v1", "Coalesce": False}
    join = {"Event": "member-join", "Members": [MEMBER_WIRE]}
    codec.receive_data(pack(hdr(seq), hdr(seq), user, hdr(seq), join))
    assert drain(codec) == [Reply(seq, "", None), StreamRecord(seq, user), StreamRecord(seq, join)]


def test_stream_with_error_opens_nothing() -> None:
    codec = ready_codec()
    seq, _ = codec.send_request("stream", {"Type": "bogus"})
    codec.receive_data(pack(hdr(seq, "Invalid event filter"), hdr(seq), {"Event": "user"}))
    assert codec.next_event() == Reply(seq, "Invalid event filter", None)
    with pytest.raises(RemoteProtocolError, match="no open stream"):
        codec.next_event()


def test_records_after_stop_are_dropped() -> None:
    codec = ready_codec()
    seq, _ = codec.send_request("stream", {"Type": "user"})
    codec.receive_data(pack(hdr(seq)))
    drain(codec)
    stop_seq, _ = codec.send_request("stop", {"Stop": seq})
    late = {"Event": "user", "Name": "late", "Payload": b""}
    codec.receive_data(pack(hdr(seq), late, hdr(stop_seq), hdr(seq), late))
    assert drain(codec) == [Reply(stop_seq, "", None)]


def test_stop_before_the_stream_reply_drops_its_records() -> None:
    codec = ready_codec()
    seq, _ = codec.send_request("stream", {"Type": "user"})
    stop_seq, _ = codec.send_request("stop", {"Stop": seq})
    codec.receive_data(pack(hdr(seq), hdr(seq), {"Event": "user"}, hdr(stop_seq)))
    assert drain(codec) == [Reply(seq, "", None), Reply(stop_seq, "", None)]


def test_query_records_end_with_done() -> None:
    codec = ready_codec()
    seq, _ = codec.send_request("query", {"Name": "ping", "Payload": b"x", "Timeout": 10**9})
    ack = {"Type": "ack", "From": "n2", "Payload": None}
    resp = {"Type": "response", "From": "n2", "Payload": b"pong"}
    done = {"Type": "done", "From": "", "Payload": None}
    codec.receive_data(pack(hdr(seq), hdr(seq), ack, hdr(seq), resp, hdr(seq), done))
    assert drain(codec) == [
        Reply(seq, "", None),
        StreamRecord(seq, ack),
        StreamRecord(seq, resp),
        StreamRecord(seq, done),
    ]
    assert [decode_query_record(b) for b in (ack, resp, done)] == [
        QueryRecord("ack", "n2", b""),
        QueryRecord("response", "n2", b"pong"),
        QueryRecord("done", "", b""),
    ]
    codec.receive_data(pack(hdr(seq), resp))
    with pytest.raises(RemoteProtocolError):  # nothing may follow "done"
        codec.next_event()


# -- remote misbehaviour ----------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (pack(hdr(0)), "Seq 0"),  # what a desynchronised agent answers
        (pack(hdr(77)), "Seq 77"),
        (pack([1, 2]), "header map"),
        (pack({"Seq": "2", "Error": ""}), "malformed reply header"),
        (pack({"Seq": 2, "Error": None}), "malformed reply header"),
        (pack(hdr(2), [1]), "body map"),
        (b"\xc1", "undecodable"),
        (pack({1: 2}), "undecodable"),
    ],
)
def test_remote_violations_are_sticky(wire: bytes, message: str) -> None:
    codec = ready_codec()
    codec.send_request("members")  # seq 2
    codec.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=message):
        codec.next_event()
    codec.receive_data(pack(hdr(2), {"Members": []}))
    with pytest.raises(RemoteProtocolError, match=message):
        codec.next_event()


def test_member_decoding() -> None:
    v6 = dict(MEMBER_WIRE, Addr=bytes.fromhex("fd000000000000000000000000000001"), Tags=None)
    mapped = dict(MEMBER_WIRE, Addr=bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 7]))
    assert decode_member(v6) == Member("n1", "fd00::1", 7946, {}, "alive")
    assert decode_member(mapped).addr == "10.0.0.7"
    assert hash(decode_member(mapped)) == hash(decode_member(mapped))
    with pytest.raises(RemoteProtocolError, match="malformed member"):
        decode_member(dict(MEMBER_WIRE, Addr=b"\x01\x02"))
    with pytest.raises(RemoteProtocolError, match="malformed member"):
        decode_member({"Name": "x"})


def test_stream_event_normalisation() -> None:
    event = decode_stream_event({"Event": "member-update", "Members": [MEMBER_WIRE]})
    assert event["Members"] == [decode_member(MEMBER_WIRE)]
    assert decode_stream_event({"Event": "user", "Payload": None})["Payload"] == b""
    with pytest.raises(RemoteProtocolError):
        decode_stream_event({"Name": "x"})


# -- framing: any split of the byte stream gives the same events ------------------


def conversation() -> tuple[SerfCodec, bytes, list[Event]]:
    """A realistic exchange covering every reply shape, interleaved records included."""
    codec = ready_codec()
    s_auth, _ = codec.send_request("auth", {"AuthKey": "k"})
    s_members, _ = codec.send_request("members")
    s_stream, _ = codec.send_request("stream", {"Type": "*"})
    s_join, _ = codec.send_request("join", {"Existing": ["x"], "Replay": False})
    s_query, _ = codec.send_request("query", {"Name": "q", "Payload": b""})
    s_stats, _ = codec.send_request("stats")
    user = {"Event": "user", "LTime": 1, "Name": "d", "Payload": b"\x00" * 300, "Coalesce": False}
    members = {"Members": [MEMBER_WIRE, dict(MEMBER_WIRE, Name="n2")]}
    resp = {"Type": "response", "From": "n2", "Payload": b"\xff" * 70000}  # bin32
    done = {"Type": "done", "From": "", "Payload": None}
    stats = {"agent": {"name": "n1"}, "serf": {"members": "2"}}
    wire = pack(
        hdr(s_auth), hdr(s_members), members, hdr(s_stream), hdr(s_join, "err"), {"Num": 0},
        hdr(s_stream), user, hdr(s_query), hdr(s_query), resp, hdr(s_stream), user,
        hdr(s_query), done, hdr(s_stats), stats,
    )  # fmt: skip
    expected: list[Event] = [
        Reply(s_auth, "", None), Reply(s_members, "", members), Reply(s_stream, "", None),
        Reply(s_join, "err", {"Num": 0}), StreamRecord(s_stream, user), Reply(s_query, "", None),
        StreamRecord(s_query, resp), StreamRecord(s_stream, user), StreamRecord(s_query, done),
        Reply(s_stats, "", stats),
    ]  # fmt: skip
    return codec, wire, expected


def chunks_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


def test_whole_stream_in_one_read() -> None:
    codec, wire, expected = conversation()
    assert feed_chunks(codec, [wire]) == expected


def test_split_at_every_offset() -> None:
    _, wire, expected = conversation()
    # the 70 kB payload makes "every offset" slow; cut everywhere except inside it
    offsets = [i for i in range(1, len(wire)) if i < 2000 or i > len(wire) - 2000]
    for cut in offsets:
        codec, _, _ = conversation()
        assert feed_chunks(codec, chunks_at(wire, [cut])) == expected, cut


def test_byte_by_byte() -> None:
    codec, wire, expected = conversation()
    assert feed_chunks(codec, (wire[i : i + 1] for i in range(len(wire)))) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=72000), max_size=40))
def test_split_invariance_property(cuts: list[int]) -> None:
    codec, wire, expected = conversation()
    assert feed_chunks(codec, chunks_at(wire, [c for c in cuts if c < len(wire)])) == expected


_bodies = st.dictionaries(
    st.text(max_size=5),
    st.one_of(
        st.integers(-(2**40), 2**40), st.text(max_size=20), st.binary(max_size=300), st.none()
    ),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_conversations_decode_under_any_split(data: st.DataObject) -> None:
    """Random commands, replies by the table, records of streams interleaved at random."""
    codec = ready_codec()
    names = sorted(c for c in COMMANDS if c not in ("handshake", "stop"))
    queues: list[list[tuple[list[object], Event]]] = []
    for command in data.draw(st.lists(st.sampled_from(names), max_size=8)):
        seq, _ = codec.send_request(command, {} if COMMANDS[command].takes_body else None)
        shape = COMMANDS[command].reply
        error = data.draw(st.sampled_from(["", "", "failed"]))
        body = data.draw(_bodies)
        queue: list[tuple[list[object], Event]] = []
        if shape is ReplyShape.BODY:
            queue.append(([hdr(seq, error), body], Reply(seq, error, body)))
        else:
            queue.append(([hdr(seq, error)], Reply(seq, error, None)))
        if shape in (ReplyShape.STREAM, ReplyShape.QUERY) and not error:
            for rec in data.draw(st.lists(_bodies, max_size=3)):
                rec = dict(rec, Type="response")
                queue.append(([hdr(seq), rec], StreamRecord(seq, rec)))
            if shape is ReplyShape.QUERY:
                done = {"Type": "done"}
                queue.append(([hdr(seq), done], StreamRecord(seq, done)))
        queues.append(queue)
    wire, expected = b"", list[Event]()
    while any(queues):
        live = [q for q in queues if q]
        pick = live[data.draw(st.integers(0, len(live) - 1))]
        objs, event = pick.pop(0)
        wire += pack(*objs)
        expected.append(event)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(wire))), max_size=20))
    assert feed_chunks(codec, chunks_at(wire, cuts)) == expected
