"""This node's job output, as the log API serves it: history from the app files, live lines.

Theory of operation
-------------------
Backends keep each job's ring and append every line to the per-app file
(``<root>/logs/<app name>.log``, JSON lines, see `host.logs`), and hand every line
to `LogHub.publish` as it is read. The hub numbers lines (``seq``, per node) and
fans them out to subscribers of the app; a subscriber that falls
``SUBSCRIBER_BUFFER`` lines behind is dropped (its stream ends; the client
reconnects), so a slow reader never slows a job down.

`LogHub.stream` is what one node contributes to ``flynnp2p log``: the newest ``n``
lines of the app from its files (the current one and the rotated ones), then, if
``follow``, live lines. It subscribes *before* reading the files, and drops live
lines that the history already held, so nothing is lost or doubled at the seam.
Lines survive a job's exit because the files do.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from flynnp2p.host.backend import JobSpec
from flynnp2p.host.logs import LogLine

SUBSCRIBER_BUFFER = 10_000
MAX_HISTORY = 100_000


@dataclass(frozen=True, slots=True)
class Line:
    ts_ms: int
    app: str  # the app's name
    job_id: str
    stream: str
    text: str

    def to_json(self, node: str, process_type: str | None = None) -> dict[str, object]:
        return {
            "ts_ms": self.ts_ms,
            "node": node,
            "job_id": self.job_id,
            "type": process_type,
            "stream": self.stream,
            "text": self.text,
        }


class LogHub:
    def __init__(self, logs_dir: Path, *, keep_files: int = 1) -> None:
        self.logs_dir = logs_dir
        self.keep_files = keep_files
        self._subscribers: dict[str, list[trio.MemorySendChannel[Line]]] = {}

    def publish(self, spec: JobSpec, lines: Sequence[LogLine]) -> None:
        """Called by the backend for every batch of lines a job wrote (never blocks)."""
        subs = self._subscribers.get(spec.app_name)
        if not subs:
            return
        for send in list(subs):
            try:
                for ln in lines:
                    send.send_nowait(Line(ln.ts_ms, spec.app_name, spec.job_id, ln.stream, ln.text))
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
        base = self.logs_dir / f"{app}.log"
        paths = [base.with_name(f"{base.name}.{i}") for i in range(self.keep_files, 0, -1)]
        out: deque[Line] = deque(maxlen=max(0, min(n, MAX_HISTORY)))
        if not out.maxlen:
            return []
        for path in [*paths, base]:
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

    async def stream(
        self, app: str, n: int, *, follow: bool, job_id: str | None = None
    ) -> AsyncIterator[Line | None]:
        """History, then ``None`` (the marker "history done"), then live lines if `follow`."""
        async with self.subscribe(app) as live:
            past = await self.history(app, n, job_id)
            for line in past:
                yield line
            yield None
            if not follow:
                return
            seen = {line for line in past if past and line.ts_ms >= past[-1].ts_ms - 1000}
            async for line in live:
                if job_id is not None and line.job_id != job_id:
                    continue
                if line in seen:
                    continue
                yield line
