from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import pytest

from flynnp2p.host.logs import AppLogFile, LogLine, LogRing


def line(i: int) -> LogLine:
    return LogLine(ts_ms=1000 + i, stream="stdout", text=f"line {i}")


def test_ring_keeps_only_the_newest_lines() -> None:
    ring = LogRing(max_lines=3)
    for i in range(5):
        ring.append(line(i))
    assert [ln.text for ln in ring.lines()] == ["line 2", "line 3", "line 4"]
    assert len(ring) == 3
    assert ring.dropped == 2


def test_ring_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="max_lines"):
        LogRing(max_lines=0)


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def test_app_log_appends_json_lines(tmp_path: Path) -> None:
    log = AppLogFile(tmp_path / "logs" / "web.log")
    log.append_lines("job1", [line(1), LogLine(2000, "stderr", "oops ünïcode")])
    log.append_lines("job2", [line(3)])
    assert read_lines(log.path) == [
        {"ts_ms": 1001, "job_id": "job1", "stream": "stdout", "text": "line 1"},
        {"ts_ms": 2000, "job_id": "job1", "stream": "stderr", "text": "oops ünïcode"},
        {"ts_ms": 1003, "job_id": "job2", "stream": "stdout", "text": "line 3"},
    ]


def test_app_log_rotates_at_size_limit_and_keeps_one_old_file(tmp_path: Path) -> None:
    log = AppLogFile(tmp_path / "app.log", max_bytes=300, keep=1)
    for i in range(30):
        log.append_lines("j", [line(i)])
        assert log.path.stat().st_size <= 300
    assert log.old_path(1).exists()
    assert not log.old_path(2).exists()
    current = [d["text"] for d in read_lines(log.path)]
    old = [d["text"] for d in read_lines(log.old_path(1))]
    assert current[-1] == "line 29"
    # The old file holds the lines just before the current file, without gaps.
    assert old + current == [f"line {i}" for i in range(30 - len(old) - len(current), 30)]
    assert log.old_path(1).stat().st_size <= 300


def test_app_log_keeps_n_old_files(tmp_path: Path) -> None:
    log = AppLogFile(tmp_path / "app.log", max_bytes=100, keep=2)
    for i in range(20):
        log.append_lines("j", [line(i)])
    assert log.old_path(1).exists() and log.old_path(2).exists()
    assert not log.old_path(3).exists()
    newest_old = read_lines(log.old_path(1))[-1]["text"]
    older_old = read_lines(log.old_path(2))[-1]["text"]
    first_current = read_lines(log.path)[0]["text"]
    assert isinstance(newest_old, str) and isinstance(older_old, str)
    assert isinstance(first_current, str)
    n = int(first_current.split()[1])
    assert newest_old == f"line {n - 1}"


def test_two_writers_of_one_app_file_never_rotate_under_each_other(tmp_path: Path) -> None:
    """The backend and the router's lines each have their own AppLogFile of one path:
    a rotation always moves a file that was full (a double rotation would move the
    fresh, nearly empty file over the full one, and lose it)."""
    path = tmp_path / "shop.log"
    max_bytes = 1000
    seen_old: list[int] = []

    def writer(job_id: str) -> None:
        log = AppLogFile(path, max_bytes=max_bytes, keep=1)
        for i in range(400):
            log.append_lines(job_id, [line(i)])
            with contextlib.suppress(FileNotFoundError):
                seen_old.append(log.old_path(1).stat().st_size)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("web-1", "router")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    biggest_line = max(len(raw) + 1 for raw in path.read_text().splitlines())
    assert seen_old and min(seen_old) > max_bytes - biggest_line
    lines = read_lines(log_old := path.with_name("shop.log.1")) + read_lines(path)
    assert log_old.exists() and lines[-1]["text"] == "line 399"  # the last write is kept
