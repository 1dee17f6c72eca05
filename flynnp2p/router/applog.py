"""The router's lines in apps' logs, written off the request path.

Theory of operation
-------------------
A request that fails calls `RouterLog.emit_nowait` with a `logline.RouterEvent`:
one ``send_nowait`` on a bounded channel, nothing else, so logging can neither
slow nor fail a request. When the channel is full (the disk is slow, or a storm
of failures) the event is dropped and counted in ``dropped``.

`RouterLog.run` is the one task that reads the channel: it takes what has
queued up, formats each event (`logline.format_line`), and hands the lines of
each app to the `LineWriter` (the node's `host.loghub.LogHub`: the app's log file,
in a thread, and live followers). A write that fails is counted in
``write_errors`` and the lines are lost; the router goes on.

Only apps with a name get lines (``RouteSpec.app_name``, validated when the app
was made): a request no route matched is in no app's log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from flynnp2p.host.logs import LogLine
from flynnp2p.router.logline import SOURCE, RouterEvent, format_line

CAPACITY = 1000  # events queued before new ones are dropped
BATCH = 256  # events written in one go


class LineWriter(Protocol):
    async def write(self, app: str, job_id: str, lines: Sequence[LogLine]) -> None: ...


class RouterLog:
    def __init__(
        self,
        writer: LineWriter | None = None,
        *,
        capacity: int = CAPACITY,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.writer = writer
        self.wall_ms = wall_ms
        self._send, self._receive = trio.open_memory_channel[tuple[int, str, RouterEvent]](capacity)
        self.written = 0
        self.dropped = 0
        self.write_errors = 0

    def emit_nowait(self, app: str, event: RouterEvent) -> None:
        """Queue `event` for `app`'s log; never blocks (a full queue drops it)."""
        if not app or self.writer is None:
            return
        try:
            self._send.send_nowait((self.wall_ms(), app, event))
        except trio.WouldBlock:
            self.dropped += 1

    def status(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "write_errors": self.write_errors,
                "queued": self._send.statistics().current_buffer_used}  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for first in self._receive:
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            by_app: dict[str, list[LogLine]] = {}
            for ts_ms, app, event in batch:
                by_app.setdefault(app, []).append(LogLine(ts_ms, "stdout", format_line(event)))
            assert self.writer is not None  # (nothing is queued without one)
            for app, lines in by_app.items():
                try:
                    await self.writer.write(app, SOURCE, lines)
                except OSError:
                    self.write_errors += 1
                    continue
                self.written += len(lines)
