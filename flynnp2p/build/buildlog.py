"""A build's output in the app's log, with source (job id) ``build``.

Theory of operation
-------------------
Every line a push's build says to the pusher (`flynnp2p.build.deploy.BuildStep`:
its headings, the buildpacks' output) is also a line of the app's log, so
``flynnp2p log`` shows it among the jobs' and the router's lines and
``flynnp2p log --type build`` shows only builds. A line is published to live
readers (``log -f``) the moment it is said; appending to the app's file costs a
thread hop, so lines are appended in batches of up to ``BATCH_LINES``, or
``BATCH_S`` after the first line of a batch, whichever comes first, and what is
left when the build ends (`BuildLog.flush`). A buildpack that prints megabytes
only fills the app's file, which rotates (`flynnp2p.host.logs.AppLogFile`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from flynnp2p.host.logs import LogLine

SOURCE = "build"
BATCH_LINES = 256
BATCH_S = 0.5


class LogSink(Protocol):
    """The part of `flynnp2p.host.loghub.LogHub` a build log uses."""

    def publish_lines(self, app: str, job_id: str, lines: Sequence[LogLine]) -> None: ...

    async def append(self, app: str, job_id: str, lines: Sequence[LogLine]) -> None: ...


class BuildLog:
    """One build's lines of one app (see the module's theory of operation)."""

    def __init__(self, sink: LogSink, app_name: str, now_ms: Callable[[], int]) -> None:
        self.sink = sink
        self.app_name = app_name
        self.now_ms = now_ms
        self._batch: list[LogLine] = []
        self._since = 0.0

    async def line(self, text: str) -> None:
        ln = LogLine(self.now_ms(), "stdout", text)
        self.sink.publish_lines(self.app_name, SOURCE, [ln])
        if not self._batch:
            self._since = trio.current_time()
        self._batch.append(ln)
        if len(self._batch) >= BATCH_LINES or trio.current_time() - self._since >= BATCH_S:
            await self.flush()

    async def flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            # A full disk loses log lines, not the push: the pusher saw them.
            with contextlib.suppress(OSError):
                await self.sink.append(self.app_name, SOURCE, batch)
