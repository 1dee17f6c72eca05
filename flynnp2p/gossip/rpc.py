"""Trio client for a serf agent's RPC port, on top of the sans-I/O codec.

Theory of operation
-------------------
``open_serf_rpc`` connects, sends ``handshake`` then ``auth``, and owns a
nursery with one task, ``_serve``, which runs the connection for the client's
life::

    connect+handshake+auth ─► reader (routes events by Seq)  ─► lost ─► fail in-flight
              ▲               subscriber (opens every stream)          calls and queries
              └────────────────── backoff ◄───────────────────────────────┘

Writes go through one ``trio.Lock`` so Seqs (allocated by the codec) reach the
agent in order. A write is shielded and bounded: a half-written request would
desynchronise the byte stream, so a write that cannot finish drops the
connection instead.

``auth`` is always sent, with an empty key when none is given: a keyless agent
accepts it, a keyed one refuses it, so a missing or wrong key fails at connect
time with ``SerfAuthError`` instead of desynchronising later (an unauthenticated
agent answers "Authentication required" without reading the request's body).

Disconnected policy: a call *made* while disconnected waits for the next
connection (bound it with your own ``trio.fail_after``); a call *in flight* when
the connection drops fails with ``SerfConnectionError`` and is not retried,
because the agent may or may not have executed it (``event`` and ``join`` are
not idempotent). The first connection is not retried: ``open_serf_rpc`` raises.
An auth refusal on reconnect ends the client (the config is wrong; retrying will
not fix it).

Streams: ``stream(types)`` registers a subscription; the subscriber task of
every connection opens it (so a subscription survives reconnects) and, on every
connection after the first, puts ``{"Event": "reconnected"}`` on its channel:
events were lost, resync with ``members()``. Stream entry returns only once the
agent has registered the stream, so "subscribe, then snapshot" loses nothing.
The reader never blocks on a consumer: when a channel is full the record is
dropped and ``{"Event": "overflow", "Dropped": n}`` is delivered before the
next one that fits (serf itself drops past 512 queued events per stream).

Queries: serf accepts answers only on the connection that delivered the query,
and numbers queries per connection from 1. The ``ID`` of a query event on a
stream is therefore rewritten to an opaque id carrying the connection's
generation, so ``respond`` to a query from a previous connection fails with
``SerfConnectionError`` instead of answering a different query.

Errors
------
::

    SerfError (503)              root (codec); a ClusterError of `flynnp2p.errors`' tree
    ├── LocalProtocolError (500) this process misused the protocol (codec)
    ├── RemoteProtocolError      the agent sent an invalid message (codec)
    ├── SerfConnectionError      could not connect, connection dropped, client closed
    └── SerfCommandError         the agent answered with an error (.command, .error)
        └── SerfAuthError        handshake or auth refused
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .codec import (
    Body,
    Event,
    Member,
    RemoteProtocolError,
    Reply,
    SerfCodec,
    SerfError,
    decode_members,
    decode_query_record,
    decode_stream_event,
)

__all__ = [
    "Member",
    "QueryResponse",
    "SerfAuthError",
    "SerfCommandError",
    "SerfConnectionError",
    "SerfQuery",
    "SerfRPC",
    "StreamEvent",
    "open_serf_rpc",
]

StreamEvent = dict[str, Any]
Connect = Callable[[], Awaitable[trio.abc.Stream]]

_RECEIVE_SIZE = 65536
_QUERY_ID_BITS = 32  # serf numbers queries per connection; ours = generation << 32 | serf's


class SerfConnectionError(SerfError):
    """No usable RPC connection: connect failed, it dropped, or the client closed."""


class SerfCommandError(SerfError):
    """The agent answered a command with an error string."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"serf {command} failed: {error.strip()}")
        self.command = command
        self.error = error


class SerfAuthError(SerfCommandError):
    """The agent refused the handshake or the RPC auth key."""


class _NotSentError(SerfConnectionError):
    """The connection was lost before the request was written (safe to retry)."""


@dataclass(frozen=True, slots=True)
class QueryResponse:
    from_: str
    payload: bytes


class _RecordSink(Protocol):
    def on_record(self, conn: _Connection, body: Body) -> None: ...
    def on_lost(self, exc: SerfConnectionError) -> None: ...


class _Waiter:
    def __init__(self, seq: int) -> None:
        self.seq = seq
        self._done = trio.Event()
        self._reply: Reply | None = None
        self._failure: SerfConnectionError | None = None

    def resolve(self, reply: Reply) -> None:
        self._reply = reply
        self._done.set()

    def fail(self, exc: SerfConnectionError) -> None:
        self._failure = exc
        self._done.set()

    async def wait(self) -> Reply:
        await self._done.wait()
        if self._failure is not None:
            raise SerfConnectionError(str(self._failure)) from self._failure
        assert self._reply is not None
        return self._reply


class _Connection:
    def __init__(self, stream: trio.abc.Stream, generation: int) -> None:
        self.stream = stream
        self.generation = generation
        self.codec = SerfCodec()
        self.waiters: dict[int, _Waiter] = {}  # seq -> caller awaiting the first reply
        self.records: dict[int, _RecordSink] = {}  # seq -> owner of its stream records
        self.lost: SerfConnectionError | None = None
        self.cancel_scope = trio.CancelScope()  # cancels this connection's tasks


class _Subscription:
    def __init__(self, types: str, send: trio.MemorySendChannel[StreamEvent]) -> None:
        self.types = types
        self.send = send
        self.conn: _Connection | None = None  # connection it is (being) opened on
        self.seq: int | None = None
        self.opened = trio.Event()  # first open answered (or failed)
        self.failure: SerfError | None = None
        self.owe_reconnected = False
        self.dropped = 0

    def on_record(self, conn: _Connection, body: Body) -> None:
        event = decode_stream_event(body)
        if event["Event"] == "query" and isinstance(event.get("ID"), int):
            event["ID"] = (conn.generation << _QUERY_ID_BITS) | event["ID"]
        self.deliver(event)

    def on_lost(self, exc: SerfConnectionError) -> None:
        self.seq = None  # the next connection's subscriber opens it again

    def deliver(self, event: StreamEvent | None) -> None:
        """Put owed markers, then ``event``, on the channel without blocking."""
        try:
            if self.owe_reconnected:
                self.send.send_nowait({"Event": "reconnected"})
                self.owe_reconnected = False
            if self.dropped:
                self.send.send_nowait({"Event": "overflow", "Dropped": self.dropped})
                self.dropped = 0
            if event is not None:
                self.send.send_nowait(event)
        except trio.WouldBlock:
            if event is not None:
                self.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the consumer stopped reading; stream() exit sends stop


class SerfQuery:
    """Responses of one query, as an async iterator that ends with serf's "done".

    ``acks`` lists the nodes that acknowledged (with ``request_ack=True``);
    ``dropped`` counts responses lost because the consumer fell behind.
    """

    def __init__(self, receive: trio.MemoryReceiveChannel[QueryResponse]) -> None:
        self._receive = receive
        self.acks: list[str] = []
        self.dropped = 0
        self.failure: SerfConnectionError | None = None

    def __aiter__(self) -> SerfQuery:
        return self

    async def __anext__(self) -> QueryResponse:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.failure is not None:
                raise SerfConnectionError(str(self.failure)) from self.failure
            raise StopAsyncIteration from None


class _QuerySink:
    def __init__(self, handle: SerfQuery, send: trio.MemorySendChannel[QueryResponse]) -> None:
        self._handle = handle
        self._send = send

    def on_record(self, conn: _Connection, body: Body) -> None:
        record = decode_query_record(body)
        if record.type == "ack":
            self._handle.acks.append(record.from_)
        elif record.type == "response":
            try:
                self._send.send_nowait(QueryResponse(record.from_, record.payload))
            except trio.WouldBlock:
                self._handle.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        else:
            self._send.close()

    def on_lost(self, exc: SerfConnectionError) -> None:
        self._handle.failure = exc
        self._send.close()


class SerfRPC:
    """A client of one serf agent. Build it with ``open_serf_rpc``."""

    def __init__(
        self,
        connect: Connect,
        where: str,
        auth_key: str | None,
        *,
        handshake_timeout_s: float,
        write_timeout_s: float,
        reconnect_backoff_s: tuple[float, float],
    ) -> None:
        self._connect_stream = connect
        self._where = where
        self._auth_key = auth_key
        self._handshake_timeout_s = handshake_timeout_s
        self._write_timeout_s = write_timeout_s
        self._backoff_s = reconnect_backoff_s
        self._write_lock = trio.Lock()
        self._conn: _Connection | None = None
        self._closed = False
        self._conn_changed = trio.Event()  # set (and replaced) when _conn appears / closing
        self._subs: list[_Subscription] = []
        self._subs_changed = trio.Event()  # set (and replaced) when _subs grows

    # -- public API ------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a handshaken connection is up (for status reporting)."""
        return self._conn is not None and self._conn.lost is None

    async def members(self) -> list[Member]:
        return decode_members(await self._call_body("members", None))

    async def members_filtered(
        self,
        tags: Mapping[str, str] | None = None,
        status: str | None = None,
        name: str | None = None,
    ) -> list[Member]:
        """Members whose tags/status/name match serf's anchored Go regexps.

        An invalid regexp makes serf hang up without a reply: this then raises
        ``SerfConnectionError`` and the client reconnects.
        """
        body = {"Tags": dict(tags or {}), "Status": status or "", "Name": name or ""}
        return decode_members(await self._call_body("members-filtered", body))

    async def join(self, addrs: Sequence[str], replay: bool = False) -> int:
        """Join the cluster through ``addrs`` ("host" or "host:port"); nodes contacted."""
        body = {"Existing": list(addrs), "Replay": replay}
        return int((await self._call_body("join", body)).get("Num", 0))

    async def leave(self) -> None:
        """Leave gracefully. The agent then shuts down (and this client keeps retrying)."""
        await self._call("leave", None)

    async def force_leave(self, node: str) -> None:
        await self._call("force-leave", {"Node": node})

    async def user_event(self, name: str, payload: bytes, coalesce: bool = False) -> None:
        await self._call("event", {"Name": name, "Payload": payload, "Coalesce": coalesce})

    async def set_tags(self, tags: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        await self._call("tags", {"Tags": dict(tags), "DeleteTags": list(delete)})

    async def stats(self) -> dict[str, dict[str, str]]:
        return await self._call_body("stats", None)

    async def respond(self, query_id: int, payload: bytes) -> None:
        """Answer a query event received on one of this client's streams."""
        generation, serf_id = query_id >> _QUERY_ID_BITS, query_id & ((1 << _QUERY_ID_BITS) - 1)
        conn = self._conn
        if conn is None or conn.generation != generation:
            raise SerfConnectionError(
                f"query {query_id} arrived on an RPC connection that is gone; "
                "serf accepts an answer only on the connection that delivered the query"
            )
        waiter = await self._send(conn, "respond", {"ID": serf_id, "Payload": payload})
        _check(await waiter.wait(), "respond")

    @asynccontextmanager
    async def stream(
        self, types: str, *, max_buffer: int = 512
    ) -> AsyncIterator[trio.MemoryReceiveChannel[StreamEvent]]:
        """Subscribe to events, e.g. ``"member-join,member-update,user:deploy,query"``.

        Yields once the agent has registered the stream. Member events carry
        ``Members: list[Member]``; markers ``reconnected`` and ``overflow`` mean
        "events were lost, resync".
        """
        send, receive = trio.open_memory_channel[StreamEvent](max_buffer)
        sub = _Subscription(types, send)
        self._subs.append(sub)
        self._wake_subscriber()
        try:
            await sub.opened.wait()
            if sub.failure is not None:
                raise sub.failure
            with receive:
                yield receive
        finally:
            self._subs.remove(sub)
            send.close()
            receive.close()
            await self._stop(sub)

    @asynccontextmanager
    async def query(
        self,
        name: str,
        payload: bytes,
        timeout_s: float,
        *,
        filter_nodes: Sequence[str] = (),
        filter_tags: Mapping[str, str] | None = None,
        request_ack: bool = False,
        relay_factor: int = 0,
        max_buffer: int = 256,
    ) -> AsyncIterator[SerfQuery]:
        """Send a query; iterate the responses until serf's "done" (after timeout_s).

        Leaving early is fine: later records are dropped.
        """
        send, receive = trio.open_memory_channel[QueryResponse](max_buffer)
        handle = SerfQuery(receive)
        body = {
            "Name": name,
            "Payload": payload,
            "Timeout": int(timeout_s * 1e9),  # Go time.Duration, nanoseconds
            "FilterNodes": list(filter_nodes),
            "FilterTags": dict(filter_tags or {}),
            "RequestAck": request_ack,
            "RelayFactor": relay_factor,
        }
        conn, waiter = await self._send_when_connected("query", body, _QuerySink(handle, send))
        try:
            _check(await waiter.wait(), "query")
            with receive:
                yield handle
        finally:
            conn.records.pop(waiter.seq, None)
            send.close()

    # -- calls -----------------------------------------------------------

    async def _call(self, command: str, body: Mapping[str, Any] | None) -> Reply:
        _, waiter = await self._send_when_connected(command, body)
        return _check(await waiter.wait(), command)

    async def _call_body(self, command: str, body: Mapping[str, Any] | None) -> Body:
        reply = await self._call(command, body)
        if reply.body is None:  # only for commands whose table entry says HEADER
            raise RemoteProtocolError(f"serf {command} reply has no body")
        return reply.body

    async def _send_when_connected(
        self, command: str, body: Mapping[str, Any] | None, sink: _RecordSink | None = None
    ) -> tuple[_Connection, _Waiter]:
        while True:
            conn = await self._connection()
            try:
                return conn, await self._send(conn, command, body, sink)
            except _NotSentError:
                continue  # lost before our turn to write: wait for the next connection

    async def _connection(self) -> _Connection:
        """The live connection, waiting for a reconnect if there is none."""
        while True:
            if self._closed:
                raise SerfConnectionError(f"serf RPC client for {self._where} is closed")
            if self._conn is not None and self._conn.lost is None:
                return self._conn
            await self._conn_changed.wait()

    async def _send(
        self,
        conn: _Connection,
        command: str,
        body: Mapping[str, Any] | None,
        sink: _RecordSink | None = None,
    ) -> _Waiter:
        async with self._write_lock:
            if conn.lost is not None:
                raise _NotSentError(str(conn.lost)) from conn.lost
            seq, data = conn.codec.send_request(command, body)
            waiter = conn.waiters[seq] = _Waiter(seq)
            if sink is not None:
                conn.records[seq] = sink
            with trio.CancelScope(shield=True), trio.move_on_after(self._write_timeout_s) as cs:
                try:
                    await conn.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._lose(conn, f"write to serf failed: {exc!r}")
            if cs.cancelled_caught:
                self._lose(conn, f"write to serf blocked for {self._write_timeout_s} s")
        return waiter

    async def _stop(self, sub: _Subscription) -> None:
        """Best-effort stop of a subscription's stream; shielded and bounded."""
        conn, seq = sub.conn, sub.seq
        if conn is None or seq is None or conn.lost is not None:
            return  # never opened, dying with its connection, or the subscriber stops it
        conn.records.pop(seq, None)
        # suppress: a stream dies with its connection anyway
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(self._write_timeout_s),
            suppress(SerfConnectionError),
        ):
            await self._send(conn, "stop", {"Stop": seq})

    # -- connection lifecycle --------------------------------------------

    async def _open(self, generation: int) -> _Connection:
        """Connect, handshake and authenticate; the reader is not running yet."""
        try:
            with trio.fail_after(self._handshake_timeout_s):
                stream = await self._connect_stream()
        except (OSError, trio.TooSlowError) as exc:
            raise SerfConnectionError(
                f"cannot connect to serf RPC at {self._where}: {exc!r}"
            ) from exc
        conn = _Connection(stream, generation)
        try:
            with trio.fail_after(self._handshake_timeout_s):
                for command, body in (
                    ("handshake", {"Version": 1}),
                    ("auth", {"AuthKey": self._auth_key or ""}),
                ):
                    seq, data = conn.codec.send_request(command, body)
                    await stream.send_all(data)
                    reply = await self._read_reply(conn, seq)
                    if reply.error:
                        raise SerfAuthError(command, f"{reply.error} (agent {self._where})")
        except BaseException as exc:
            await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError | trio.BrokenResourceError | RemoteProtocolError):
                raise SerfConnectionError(f"handshake with serf at {self._where}: {exc!r}") from exc
            raise
        return conn

    async def _read_reply(self, conn: _Connection, seq: int) -> Reply:
        while True:
            event = conn.codec.next_event()
            if isinstance(event, Reply) and event.seq == seq:
                return event
            if event is not None:
                raise RemoteProtocolError(f"unexpected {event!r} during handshake")
            data = await conn.stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise trio.BrokenResourceError("serf closed the connection during handshake")
            conn.codec.receive_data(data)

    async def _serve(self, conn: _Connection) -> None:
        while True:
            await self._run_connection(conn)
            conn = await self._reconnect(conn.generation + 1)

    async def _reconnect(self, generation: int) -> _Connection:
        delay, max_delay = self._backoff_s
        while True:
            try:
                return await self._open(generation)
            except SerfConnectionError:
                await trio.sleep(delay)
                delay = min(delay * 2, max_delay)

    async def _run_connection(self, conn: _Connection) -> None:
        self._conn = conn
        self._notify_conn_changed()
        try:
            with conn.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._subscriber, conn)
                    await self._read(conn)  # returns after _lose(conn), which cancels the rest
        finally:
            self._lose(conn, f"serf RPC client for {self._where} is closed")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn.stream)

    async def _read(self, conn: _Connection) -> None:
        while conn.lost is None:
            try:
                data = await conn.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._lose(conn, f"connection to serf at {self._where} broke: {exc!r}")
                return
            if not data:
                self._lose(
                    conn,
                    f"serf at {self._where} closed the connection (it does after a "
                    "protocol error such as an invalid members-filtered regexp, or on exit)",
                )
                return
            try:
                conn.codec.receive_data(data)
                while (event := conn.codec.next_event()) is not None:
                    self._route(conn, event)
            except RemoteProtocolError as exc:
                self._lose(conn, f"serf at {self._where} sent an invalid message: {exc}")
                return

    def _route(self, conn: _Connection, event: Event) -> None:
        if isinstance(event, Reply):
            waiter = conn.waiters.pop(event.seq, None)
            if waiter is not None:  # None: the caller was cancelled; drop the reply
                waiter.resolve(event)
        else:
            sink = conn.records.get(event.seq)
            if sink is not None:  # None: the consumer left; drop the record
                sink.on_record(conn, event.body)

    def _lose(self, conn: _Connection, why: str) -> None:
        """Mark ``conn`` dead: fail its calls and queries, cancel its tasks. Idempotent."""
        if conn.lost is not None:
            return
        conn.lost = exc = SerfConnectionError(why)
        if self._conn is conn:
            self._conn = None
        for waiter in conn.waiters.values():
            waiter.fail(exc)
        for sink in conn.records.values():
            sink.on_lost(exc)
        conn.waiters.clear()
        conn.records.clear()
        conn.cancel_scope.cancel()

    async def _subscriber(self, conn: _Connection) -> None:
        """Open every subscription not yet open on ``conn``; the only task that does."""
        while True:
            changed = self._subs_changed
            for sub in list(self._subs):
                if sub.conn is conn or sub not in self._subs:
                    continue
                reopening = sub.opened.is_set()
                sub.conn, sub.seq = conn, None
                try:
                    waiter = await self._send(conn, "stream", {"Type": sub.types}, sub)
                    reply = await waiter.wait()
                    if not reply.error and sub not in self._subs:  # stream() exited meanwhile
                        conn.records.pop(reply.seq, None)
                        await self._send(conn, "stop", {"Stop": reply.seq})
                except SerfConnectionError:
                    return  # the next connection's subscriber takes over
                if reply.error:
                    conn.records.pop(reply.seq, None)
                    sub.failure = SerfCommandError("stream", reply.error)
                    sub.send.close()
                elif sub in self._subs:
                    sub.seq = reply.seq
                    if reopening:
                        sub.owe_reconnected = True
                        sub.deliver(None)
                sub.opened.set()
            await changed.wait()

    def _wake_subscriber(self) -> None:
        self._subs_changed.set()
        self._subs_changed = trio.Event()

    def _notify_conn_changed(self) -> None:
        self._conn_changed.set()
        self._conn_changed = trio.Event()

    def _close(self) -> None:
        self._closed = True
        self._notify_conn_changed()
        for sub in self._subs:
            sub.failure = sub.failure or SerfConnectionError("serf RPC client closed")
            sub.send.close()
            sub.opened.set()


def _check(reply: Reply, command: str) -> Reply:
    if reply.error:
        raise SerfCommandError(command, reply.error)
    return reply


@asynccontextmanager
async def open_serf_rpc(
    host: str,
    port: int,
    auth_key: str | None,
    *,
    handshake_timeout_s: float = 5.0,
    write_timeout_s: float = 5.0,
    reconnect_backoff_s: tuple[float, float] = (0.05, 1.0),
    connect: Connect | None = None,
) -> AsyncIterator[SerfRPC]:
    """Connect to a serf agent's RPC port; reconnect until the block exits.

    ``connect`` replaces the TCP connection (tests pass a memory stream).
    Raises ``SerfConnectionError`` if the first connection fails and
    ``SerfAuthError`` if the agent refuses ``auth_key``.
    """

    async def tcp() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    client = SerfRPC(
        connect or tcp,
        f"{host}:{port}",
        auth_key,
        handshake_timeout_s=handshake_timeout_s,
        write_timeout_s=write_timeout_s,
        reconnect_backoff_s=reconnect_backoff_s,
    )
    first = await client._open(generation=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._serve, first)
        try:
            yield client
        finally:
            client._close()
            nursery.cancel_scope.cancel()
