"""Job logs: a bounded in-memory ring per job and a bounded file per app.

Every line a job writes to stdout or stderr becomes a ``LogLine`` with a wall-clock
timestamp in milliseconds. The ring keeps the newest ``max_lines`` lines of one job
(older ones fall off). The app log file is append-only JSON lines, rotated when the
next write would take it past ``max_bytes``: the current file becomes ``<name>.1``
(the previous ``.1`` becomes ``.2`` and so on, up to ``keep`` old files), so the
disk use of one app is bounded by ``(keep + 1) * max_bytes`` plus one line.

This module does blocking file I/O in ``AppLogFile``; the trio side calls it through
``trio.to_thread.run_sync``. Concurrent writers are safe: several jobs of one app
share an ``AppLogFile`` (a thread lock), and the router's lines come through another
``AppLogFile`` of the same path, so each append (and rotation) also holds an
exclusive ``flock`` on ``<name>.lock`` beside the file; without it, two writers
could both rotate and the older file would be lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Stream = Literal["stdout", "stderr"]

DEFAULT_RING_LINES = 10_000
DEFAULT_FILE_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP_FILES = 1


@dataclass(frozen=True, slots=True)
class LogLine:
    ts_ms: int
    stream: Stream
    text: str


class LogRing:
    """The newest ``max_lines`` lines of one job."""

    def __init__(self, max_lines: int = DEFAULT_RING_LINES) -> None:
        if max_lines < 1:
            raise ValueError(f"max_lines must be at least 1, got {max_lines}")
        self._lines: deque[LogLine] = deque(maxlen=max_lines)
        self.dropped = 0  # lines pushed out of the ring since it was made

    def append(self, line: LogLine) -> None:
        if len(self._lines) == self._lines.maxlen:
            self.dropped += 1
        self._lines.append(line)

    def lines(self) -> list[LogLine]:
        return list(self._lines)

    def __len__(self) -> int:
        return len(self._lines)


class AppLogFile:
    """An append-only JSON-lines file for one app, rotated at ``max_bytes``."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_FILE_BYTES,
        keep: int = DEFAULT_KEEP_FILES,
    ) -> None:
        if max_bytes < 1 or keep < 0:
            raise ValueError(f"need max_bytes >= 1 and keep >= 0, got {max_bytes}, {keep}")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()

    def append_lines(self, job_id: str, lines: Iterable[LogLine]) -> None:
        """Append lines (blocking); rotate first when they would not fit."""
        data = b"".join(
            json.dumps(
                {"ts_ms": ln.ts_ms, "job_id": job_id, "stream": ln.stream, "text": ln.text},
                ensure_ascii=False,
            ).encode()
            + b"\n"
            for ln in lines
        )
        if not data:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by the close
                try:
                    size = self.path.stat().st_size
                except FileNotFoundError:
                    size = 0
                if size > 0 and size + len(data) > self.max_bytes:
                    self._rotate()
                with self.path.open("ab") as f:
                    f.write(data)
            finally:
                os.close(fd)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.lock")

    def old_path(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _rotate(self) -> None:
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
            return
        for n in range(self.keep - 1, 0, -1):
            if self.old_path(n).exists():
                os.replace(self.old_path(n), self.old_path(n + 1))
        os.replace(self.path, self.old_path(1))


class AppLogs:
    """One `AppLogFile` per app, ``<logs_dir>/<app name>.log``, made on first use."""

    def __init__(self, logs_dir: Path, max_bytes: int = DEFAULT_FILE_BYTES) -> None:
        self.logs_dir = logs_dir
        self.max_bytes = max_bytes
        self._files: dict[str, AppLogFile] = {}

    def of(self, app_name: str) -> AppLogFile:
        log = self._files.get(app_name)
        if log is None:
            log = self._files[app_name] = AppLogFile(
                self.logs_dir / f"{app_name}.log", max_bytes=self.max_bytes
            )
        return log
