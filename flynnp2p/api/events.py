"""``GET /v1/events``: Server-Sent Events of record changes.

Theory of operation
-------------------
The subscription to the state service is used only as a wake-up; what is sent
comes from the service's ring of numbered events (``events_since``), so every
event carries its id and a client that reconnects with ``Last-Event-ID`` misses
nothing.  An id the ring no longer holds (too old, or from another node: ids are
per node) gets an ``event: reset`` followed by the current records, then live
events.  ``?kinds=app,route`` filters by record kind.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import trio
from quart import Response, request

from flynnp2p.api.render import wire
from flynnp2p.errors import UserError
from flynnp2p.state.merge import Entry, State
from flynnp2p.state.records import KIND_CHOICES, KINDS
from flynnp2p.state.replica import ReplicatedState
from flynnp2p.vocab import show

KEEPALIVE_S = 15.0
_EVENT_ID = re.compile(r"[0-9]{1,18}")


async def events(service: ReplicatedState) -> Response:
    kinds = _kinds(request.args.get("kinds"))
    last = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if last is not None and _EVENT_ID.fullmatch(last.strip()) is None:
        raise UserError(f"Last-Event-ID: expected an event id (an integer), got {show(last)}")
    last_id = None if last is None else int(last)
    resp = Response(_event_stream(service, kinds, last_id), content_type="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    resp.timeout = None  # quart would cut a response after RESPONSE_TIMEOUT
    return resp

async def _event_stream(
    service: ReplicatedState, kinds: frozenset[str] | None, last_id: int | None
) -> AsyncIterator[bytes]:
    # No `yield` inside a cancel scope here: trio forbids it in async generators.
    yield b"retry: 2000\n\n"
    before = service.last_event_id  # the snapshot below holds at least this much
    async with service.subscribe(kinds) as (snapshot, wakeups):
        cursor = before if last_id is None else last_id
        if last_id is not None and service.events_since(last_id) is None:
            yield _reset(snapshot, kinds, before, f"event {last_id} is not in this node's log")
            cursor = before
        ended = False
        while True:
            batch = service.events_since(cursor)
            if batch is None:  # this client fell behind the ring
                cursor = service.last_event_id
                yield _reset(service.state, kinds, cursor, "the stream fell behind")
            elif batch:
                cursor = batch[-1][0]
                out = b"".join(
                    sse(i, e.kind, _change(e)) for i, e in batch if kinds is None or e.kind in kinds
                )
                if out:
                    yield out
            if ended:
                return  # dropped as too slow, or the node stops: the client resumes
            woke = False
            with trio.move_on_after(KEEPALIVE_S):
                ended = await _next_changes(wakeups)
                woke = True
            if not woke:
                yield b": keep-alive\n\n"


def _kinds(text: str | None) -> frozenset[str] | None:
    if text is None or not text.strip():
        return None
    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise UserError(f"kinds: unknown kind {show(unknown[0])}; accepted: {KIND_CHOICES}")
    return kinds


async def _next_changes(wakeups: trio.MemoryReceiveChannel[list[Entry]]) -> bool:
    """Wait for changes and drain what is queued; True when the subscription ended."""
    try:
        await wakeups.receive()
        while True:
            wakeups.receive_nowait()
    except trio.WouldBlock:
        return False
    except trio.EndOfChannel:
        return True


def _reset(state: State, kinds: frozenset[str] | None, cursor: int, reason: str) -> bytes:
    """``event: reset`` then every live record, the last carrying the resume id."""
    live = [e for e in state.entries() if e.value is not None and (kinds is None or e.kind in kinds)]
    reset = sse(None if live else cursor, "reset", {"reason": reason, "last_event_id": cursor})
    puts = (sse(cursor if i == len(live) - 1 else None, e.kind, _change(e)) for i, e in enumerate(live))
    return reset + b"".join(puts)


def sse(event_id: int | None, event: str, data: object) -> bytes:
    """One Server-Sent Event (the JSON is on one line, so one ``data:`` field)."""
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _change(entry: Entry) -> dict[str, object]:
    return {
        "kind": entry.kind,
        "key": entry.key,
        "op": "put" if entry.value is not None else "delete",
        "value": None if entry.value is None else wire(entry.value),
    }
