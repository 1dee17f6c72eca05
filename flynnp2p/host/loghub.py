"""This node's job output, as the log API serves it: history from the app files, live lines.

Theory of operation
-------------------
Backends keep each job's ring and append every line to the per-app file
(``<root>/logs/<app name>.log``, JSON lines, see `host.logs`), and hand every line
to `LogHub.publish` as it is read. The hub fans them out to subscribers of the
app; a subscriber that falls ``SUBSCRIBER_BUFFER`` lines behind is dropped (its
stream ends; the client reconnects), so a slow reader never slows a job down.

Lines that are not a job's (the router's, with job id ``router``; a build's, with
job id ``build``: `flynnp2p.build.buildlog`) come in through `LogHub.write`, which publishes them and appends them to the same app file in a
thread (`host.logs.AppLogFile` locks the file, so the backend's writer and this one
never interleave or rotate under each other).

`LogHub.history` reads the newest lines of an app from its files (the current one
and the rotated ones), so lines survive a job's exit. ``api.logs.node_log``
subscribes *before* it reads the history, so no line falls between the two.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from flynnp2p import vocab
from flynnp2p.host.backend import JobSpec
from flynnp2p.host.logs import DEFAULT_KEEP_FILES, AppLogFile, AppLogs, LogLine

SUBSCRIBER_BUFFER = 10_000
MAX_HISTORY = 100_000


@dataclass(frozen=True, slots=True)
class Line:
    ts_ms: int
    app: str  # the app's name
    job_id: str
    stream: str
    text: str


class LogHub:
    def __init__(self, logs_dir: Path, *, keep_files: int = DEFAULT_KEEP_FILES) -> None:
        self.logs_dir = logs_dir
        self.keep_files = keep_files
        self._subscribers: dict[str, list[trio.MemorySendChannel[Line]]] = {}
        self._files = AppLogs(logs_dir)

    def publish(self, spec: JobSpec, lines: Sequence[LogLine]) -> None:
        """Called by the backend for every batch of lines a job wrote (never blocks)."""
        self.publish_lines(spec.app_name, spec.job_id, lines)

    async def write(self, app: str, job_id: str, lines: Sequence[LogLine]) -> None:
        """Lines of `app` that no backend writes (the router's): published, then
        appended to the app's file (OSError if the disk refuses). An invalid app
        name writes nothing."""
        if not vocab.APP_NAME.ok(app):
            return
        self.publish_lines(app, job_id, lines)
        await self.append(app, job_id, lines)

    async def append(self, app: str, job_id: str, lines: Sequence[LogLine]) -> None:
        """Append `lines` to the app's file only (they were published already: a
        build's lines go live one by one and to the file in batches)."""
        if vocab.APP_NAME.ok(app):
            await trio.to_thread.run_sync(self._files.of(app).append_lines, job_id, lines)

    def publish_lines(self, app: str, job_id: str, lines: Sequence[LogLine]) -> None:
        """Hand `lines` to the app's live subscribers (never blocks)."""
        subs = self._subscribers.get(app)
        if not subs:
            return
        for send in list(subs):
            try:
                for ln in lines:
                    send.send_nowait(Line(ln.ts_ms, app, job_id, ln.stream, ln.text))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                subs.remove(send)
                send.close()

    @asynccontextmanager
    async def subscribe(self, app: str) -> AsyncIterator[trio.MemoryReceiveChannel[Line]]:
        send, recv = trio.open_memory_channel[Line](SUBSCRIBER_BUFFER)
        subs = self._subscribers.setdefault(app, [])
        subs.append(send)
        try:
            yield recv
        finally:
            if send in subs:
                subs.remove(send)
            if not subs:
                self._subscribers.pop(app, None)
            send.close()

    async def history(self, app: str, n: int, job_id: str | None = None) -> list[Line]:
        """The newest `n` lines of `app` on this node (of one job if `job_id`), oldest first."""
        return await trio.to_thread.run_sync(self._read_history, app, n, job_id)

    def _read_history(self, app: str, n: int, job_id: str | None) -> list[Line]:
        current = AppLogFile(self.logs_dir / f"{app}.log", keep=self.keep_files)
        paths = [current.old_path(i) for i in range(self.keep_files, 0, -1)]
        out: deque[Line] = deque(maxlen=max(0, min(n, MAX_HISTORY)))
        if not out.maxlen:
            return []
        for path in [*paths, current.path]:
            try:
                f = path.open("rb")
            except FileNotFoundError:
                continue
            with f:
                for raw in f:
                    try:
                        d = json.loads(raw)
                        line = Line(int(d["ts_ms"]), app, str(d["job_id"]), str(d["stream"]), str(d["text"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line after a crash
                    if job_id is None or line.job_id == job_id:
                        out.append(line)
        return list(out)
