"""Logs: one node's job output, and an app's output merged across every node.

Theory of operation
-------------------
``GET /v1/internal/log?app=NAME&n=&follow=&job=`` streams what *this* node holds
(`host.loghub.LogHub`) as JSON lines: the newest ``n`` lines from the app's files,
then ``{"event": "history-done"}``, then (``follow=1``) live lines, with a
heartbeat line every ``HEARTBEAT_S`` so idle streams stay open through proxies.

``GET /v1/apps/<app>/log?n=&follow=&type=&job=&until_exit=`` is the public one:
the node that answers opens the internal stream of every alive node (itself
included), one reader task per node, which feed one channel. It first
waits for every node's history (or its failure, or ``HISTORY_WAIT_S``), sorts it
by time and sends the newest ``n``; then live lines in the order they arrive.
Each line names its node and job and carries the job's process type, taken from
the replicated state. With ``until_exit=1`` and a ``job``, the stream ends once
the job is finished (down, or a crashed one-off), after ``EXIT_DRAIN_S`` for its
last lines to arrive, with ``{"event": "exit", "state": ..., "exit_code": ...}``:
that is how ``flynnp2p run`` streams a one-off's output and returns its status.

Each request's readers run in a nursery of their own. A handler's generator
cannot hold a nursery across a ``yield`` (trio forbids it), so a request's
`LogSession` is one task in `LogFanout`'s long-lived nursery, and that task opens
the session's nursery, where the readers of that request (and only those) run:
they live and end together. When the stream ends or the client goes away, the
generator's ``finally`` cancels the session's scope, which ends the session's task
and every reader in it; ``LogFanout.sessions`` holds the sessions still running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import trio
from quart import Blueprint, Response, request

from flynnp2p import vocab
from flynnp2p.api.context import ClusterContext
from flynnp2p.api.edge import ref
from flynnp2p.api.ops import find_app
from flynnp2p.errors import UserError
from flynnp2p.host.loghub import Line, LogHub
from flynnp2p.peering import Peer
from flynnp2p.state.jobs import is_finished
from flynnp2p.state.records import Blocked, Job, Placement

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
HISTORY_WAIT_S = 5.0
EXIT_DRAIN_S = 1.0
NODES_CHECK_S = 2.0  # how often a followed log looks for new nodes and dropped streams
MAX_LINES = 10_000
NDJSON = "application/x-ndjson"


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def _count(default: int = 100) -> int:
    raw = request.args.get("n")
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > MAX_LINES:
        raise UserError(f"n: expected a number of lines from 0 to {MAX_LINES}, got {raw[:20]!r}")
    return int(raw)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _streaming(body: AsyncIterator[bytes]) -> Response:
    resp = Response(body, content_type=NDJSON)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    resp.timeout = None
    return resp


# -- one node -------------------------------------------------------------------


async def node_log(
    hub: LogHub, app: str, n: int, follow: bool, job: str | None, since_ms: int | None = None
) -> AsyncIterator[bytes]:
    async with hub.subscribe(app) as live:
        past = await hub.history(app, MAX_LINES if since_ms is not None else n, job)
        if since_ms is not None:
            past = [line for line in past if line.ts_ms > since_ms][-n:] if n else []
        for line in past:
            yield _dumps(_line_json(line))
        yield _dumps({"event": "history-done"})
        if not follow:
            return
        tail = {line for line in past if line.ts_ms >= past[-1].ts_ms} if past else set()
        while True:
            with trio.move_on_after(HEARTBEAT_S) as idle:
                try:
                    line = await live.receive()
                except trio.EndOfChannel:
                    return  # fell behind: the client reconnects
            if idle.cancelled_caught:
                yield _dumps({"event": "heartbeat"})
                continue
            if (job is not None and line.job_id != job) or line in tail:
                continue
            yield _dumps(_line_json(line))


def _line_json(line: Line) -> dict[str, object]:
    return {"ts_ms": line.ts_ms, "job_id": line.job_id, "stream": line.stream, "text": line.text}


def internal_log_blueprint(hub: LogHub) -> Blueprint:
    bp = Blueprint("internal_log", __name__)

    @bp.route("/v1/internal/log", methods=["GET"])
    async def internal_log() -> Response:
        app = request.args.get("app", "")
        if not vocab.APP_NAME.ok(app):
            raise UserError("app: expected an app name")
        job = request.args.get("job") or None
        since = request.args.get("since_ms")
        if since is not None and not since.isdigit():
            raise UserError(f"since_ms: expected a time in milliseconds, got {since[:20]!r}")
        since_ms = int(since) if since is not None else None
        return _streaming(node_log(hub, app, _count(), _flag("follow"), job, since_ms))

    return bp


# -- the whole cluster ------------------------------------------------------------


@dataclass
class _Feed:
    node: str
    item: dict[str, object]


class LogSession:
    """The node streams of one public log request; `ensure` (re)opens missing ones.

    `run` is the session's task: it holds the session's nursery (the readers' only
    home) from its start until `close` cancels `scope`."""

    def __init__(self, fanout: LogFanout, params: dict[str, str]) -> None:
        self.fanout = fanout
        self.params = params
        self.send, self.feed = trio.open_memory_channel[_Feed](1000)
        self.scope = trio.CancelScope()  # the session: its task and all its readers
        self.scopes: dict[str, trio.CancelScope] = {}  # one reader per node
        self.opened_ms = int(time.time() * 1000)
        self.last_ms: dict[str, int] = {}  # the newest line seen per node
        self._nursery: trio.Nursery | None = None  # set while `run` holds it open

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.fanout.sessions.add(self)
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        self.ensure()
                        task_status.started()
                        await trio.sleep_forever()
                    finally:
                        self._nursery = None
        finally:
            self.fanout.sessions.discard(self)

    def ensure(self, *, catch_up: bool = False) -> None:
        """A reader for every alive node without one. With `catch_up` (a node that
        joined, or whose stream dropped), it starts with the lines that node wrote
        since the last one seen from it, or since this request began."""
        nursery = self._nursery
        if nursery is None:
            return  # closed
        for peer in [self.fanout.self_peer, *self.fanout.peers()]:
            if peer.name in self.scopes:
                continue
            params = self.params
            if catch_up:
                since = self.last_ms.get(peer.name, self.opened_ms)
                params = {**params, "n": str(MAX_LINES), "since_ms": str(since)}
            scope = self.scopes[peer.name] = trio.CancelScope()
            nursery.start_soon(self.fanout._pump, peer, params, scope, self.send.clone())

    def seen(self, feed: _Feed) -> None:
        ts = feed.item.get("ts_ms")
        if isinstance(ts, int) and ts > self.last_ms.get(feed.node, 0):
            self.last_ms[feed.node] = ts

    def ended(self, node: str) -> None:
        self.scopes.pop(node, None)

    def close(self) -> None:
        """End the session: its task, and with it every reader (never blocks)."""
        self.scope.cancel()
        self.send.close()
        self.feed.close()


class LogFanout:
    """Owns the sessions (one task each) that read nodes' log streams for public log
    requests."""

    def __init__(self, http: httpx.AsyncClient, peers: Callable[[], list[Peer]], self_peer: Peer) -> None:
        self.http = http
        self.peers = peers
        self.self_peer = self_peer
        self.sessions: set[LogSession] = set()  # running (for status and tests)
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def open(self, app: str, n: int, follow: bool, job: str | None) -> LogSession:
        """A running session with one reader per alive node (this one included);
        the caller must `close` it."""
        assert self._nursery is not None, "LogFanout.run is not running"
        params = {"app": app, "n": str(n), "follow": "1" if follow else "0"}
        if job:
            params["job"] = job
        session = LogSession(self, params)
        await self._nursery.start(session.run)
        return session

    async def _pump(
        self,
        peer: Peer,
        params: dict[str, str],
        scope: trio.CancelScope,
        send: trio.MemorySendChannel[_Feed],
    ) -> None:
        # (BrokenResourceError: the request is over)
        with scope, send, contextlib.suppress(trio.BrokenResourceError):
            await self._read(peer, params, send)

    async def _read(
        self, peer: Peer, params: dict[str, str], send: trio.MemorySendChannel[_Feed]
    ) -> None:
        try:
            async with self.http.stream(
                "GET", f"http://{peer.api}/v1/internal/log", params=params,
                timeout=httpx.Timeout(10.0, connect=2.0, read=HEARTBEAT_S * 3),
            ) as resp:  # fmt: skip
                if resp.status_code != 200:
                    await resp.aread()
                    raise httpx.HTTPError(f"answered {resp.status_code}")
                async for raw in resp.aiter_lines():
                    if raw.strip():
                        await send.send(_Feed(peer.name, json.loads(raw)))
        except (httpx.HTTPError, ValueError) as exc:
            log.info("log stream from %s ended: %s", peer.name, exc)
            await send.send(_Feed(peer.name, {"event": "error", "message": str(exc)}))
        await send.send(_Feed(peer.name, {"event": "eof"}))


async def merged_log(
    ctx: ClusterContext,
    fanout: LogFanout,
    app_id: str,
    app: str,
    n: int,
    follow: bool,
    job: str | None,
    ptype: str | None,
    until_exit: bool,
) -> AsyncIterator[bytes]:
    # Filtering by type happens here, so each node is asked for all it keeps, and the
    # newest n of the type are kept (else a busy other type crowds them out).
    session = await fanout.open(app, MAX_LINES if ptype is not None and n else n, follow, job)
    feed = session.feed
    try:
        history: list[dict[str, object]] = []
        early: list[_Feed] = []  # live lines of nodes whose history is complete
        done: set[str] = set()
        nodes = set(session.scopes)
        with trio.move_on_after(HISTORY_WAIT_S):
            while done < nodes:
                got = await feed.receive()
                event = got.item.get("event")
                if event in ("history-done", "eof", "error"):
                    done.add(got.node)
                    if event == "eof":
                        session.ended(got.node)
                elif event is None and got.node not in done:
                    session.seen(got)
                    history.append(_shown(ctx, got, ptype))
                elif event is None:
                    early.append(got)
        history = [h for h in history if h]
        history.sort(key=lambda h: (h["ts_ms"], h["node"]))
        for h in history[-n:] if n else []:
            yield _dumps(h)
        if not follow:
            return
        for got in early:
            session.seen(got)
            shown = _shown(ctx, got, ptype)
            if shown:
                yield _dumps(shown)
        finished_at: float | None = None
        told_blocked = False
        quiet_since = checked_nodes = trio.current_time()
        while True:
            now = trio.current_time()
            if now - quiet_since >= HEARTBEAT_S:
                quiet_since = now
                yield _dumps({"event": "heartbeat"})
            if now - checked_nodes >= NODES_CHECK_S:
                checked_nodes = now
                session.ensure(catch_up=True)  # nodes that joined, streams that dropped
            if until_exit and job and not told_blocked:
                blocked = ctx.state.state.record(Blocked, job)
                if blocked is not None:
                    told_blocked = True
                    yield _dumps({"event": "blocked", "reasons": list(blocked.reasons)})
            if until_exit and job:
                exit_info = _finished(ctx, job)
                if exit_info is not None and finished_at is None:
                    finished_at = now + EXIT_DRAIN_S
                if finished_at is not None and now >= finished_at:
                    yield _dumps({"event": "exit", **(exit_info or {})})
                    return
            live: _Feed | None = None
            with trio.move_on_after(0.2 if until_exit else NODES_CHECK_S):
                live = await feed.receive()
            if live is None:
                continue
            event = live.item.get("event")
            if event == "eof":  # (an "error" is always followed by its "eof")
                session.ended(live.node)
            elif event is None:
                session.seen(live)
                shown = _shown(ctx, live, ptype)
                if shown:
                    quiet_since = trio.current_time()
                    yield _dumps(shown)
    finally:
        session.close()


def _shown(ctx: ClusterContext, got: _Feed, ptype: str | None) -> dict[str, object]:
    job_id = str(got.item.get("job_id", ""))
    state = ctx.state.state
    record = state.record(Job, job_id) or state.record(Placement, job_id)
    job_type = record.process_type if record is not None else job_id.split("-", 1)[0]
    if ptype is not None and job_type != ptype:
        return {}
    return {**got.item, "node": got.node, "type": job_type}


def _finished(ctx: ClusterContext, job_id: str) -> dict[str, object] | None:
    job = ctx.state.state.record(Job, job_id)
    if job is None or not is_finished(job.state, job.one_off):
        return None
    return {"job_id": job.id, "state": job.state, "exit_code": job.exit_code, "reason": job.reason}


def logs_blueprint(ctx: ClusterContext, fanout: LogFanout) -> Blueprint:
    bp = Blueprint("logs", __name__)

    @bp.route("/v1/apps/<app>/log", methods=["GET"])
    async def app_log(app: str) -> Response:
        found = find_app(ctx.state.state, ref("app", app))
        job = request.args.get("job") or None
        if job is not None:
            job = ref("job", job)
        ptype = request.args.get("type") or None
        if ptype is not None:
            ptype = ref("type", ptype)
        until_exit = _flag("until_exit")
        if until_exit and job is None:
            raise UserError("until_exit: needs job=JOB_ID")
        body = merged_log(
            ctx, fanout, found.id, found.name, _count(), _flag("follow") or until_exit, job,
            ptype, until_exit,
        )  # fmt: skip
        return _streaming(body)

    return bp
