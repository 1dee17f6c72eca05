"""What a job looks like as a Docker container: names, labels, arguments, exit status,
log lines. Pure: no engine calls here (those are in ``host.docker``).

Labels carry everything needed to rebuild a job's `JobSpec` from its container,
so a restarted agent can re-adopt it; the log-line parser turns Docker's
timestamped frames into `LogLine` batches, joining records Docker split.
"""

from __future__ import annotations

import calendar
import json
import re
import signal as _signal
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flynnp2p.host.backend import JobSpec
from flynnp2p.host.logs import Stream
from flynnp2p.host.spawn import MAX_LINE

_LAUNCHER = (
    'for f in .profile.d/*.sh; do if [ -r "$f" ]; then . "$f"; fi; done; unset f; exec bash -c "$1"'
)
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # as host.slug checks it
_LABEL = "flynnp2p."
_LOG_CONFIG = {"type": "json-file", "config": {"max-size": "10m", "max-file": "2"}}
_MAX_LINE = MAX_LINE  # longer lines are split, as in the process backend

_LOST_STATUS = -9  # the container vanished (removed outside flynnp2p) before we saw its exit
_REFOLLOW_MIN_S = 0.1
_REFOLLOW_MAX_S = 5.0
_FRAME_HEADER = struct.Struct(">BxxxL")  # stream id (1 stdout, 2 stderr), payload length
_STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}
_BATCH_FRAMES = 1024
_BATCH_BYTES = 256 * 1024
_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$"
)

ClientFactory = Callable[[], Any]


def container_name(node: str, job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"flynnp2p-{node}-{job_id}")


def job_labels(spec: JobSpec, node: str) -> dict[str, str]:
    return {
        _LABEL + "node": node,
        _LABEL + "job": spec.job_id,
        _LABEL + "app_name": spec.app_name,
        _LABEL + "app_id": spec.app_id,
        _LABEL + "release": spec.release_id,
        _LABEL + "type": spec.process_type,
        _LABEL + "port": "" if spec.port is None else str(spec.port),
        _LABEL + "container_port": "" if spec.container_port is None else str(spec.container_port),
        _LABEL + "command": spec.command,
        _LABEL + "image": spec.image or "",
        _LABEL + "slug_dir": "" if spec.slug_dir is None else str(spec.slug_dir),
        _LABEL + "memory_mb": str(spec.memory_mb),
        _LABEL + "host_addr": spec.host_addr,
        _LABEL + "env_keys": json.dumps(sorted(spec.env)),
    }


def spec_from_container(labels: Mapping[str, str], env: Sequence[str]) -> JobSpec:
    """The ``JobSpec`` a container was started from; ``ValueError`` if its labels are not ours."""
    try:
        values = dict(item.partition("=")[::2] for item in env)
        keys = json.loads(labels[_LABEL + "env_keys"])
        port, slug_dir, image = (labels[_LABEL + k] for k in ("port", "slug_dir", "image"))
        inner = labels.get(_LABEL + "container_port", "")  # older containers lack it
        return JobSpec(
            job_id=labels[_LABEL + "job"],
            app_name=labels[_LABEL + "app_name"],
            app_id=labels[_LABEL + "app_id"],
            release_id=labels[_LABEL + "release"],
            process_type=labels[_LABEL + "type"],
            command=labels[_LABEL + "command"],
            env={k: values[k] for k in keys},
            port=int(port) if port else None,
            slug_dir=Path(slug_dir) if slug_dir else None,
            memory_mb=int(labels[_LABEL + "memory_mb"]),
            image=image or None,
            host_addr=labels[_LABEL + "host_addr"],
            container_port=int(inner) if inner else None,
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"container labels do not describe a flynnp2p job: {e!r}") from e


def job_env(spec: JobSpec, *, in_slug: bool) -> dict[str, str]:
    env = dict(spec.env)
    env.update(
        HOST="0.0.0.0",
        APP_NAME=spec.app_name,
        APP_ID=spec.app_id,
        RELEASE_ID=spec.release_id,
        JOB_ID=spec.job_id,
        PROCESS_TYPE=spec.process_type,
    )
    if in_slug:
        env["HOME"] = "/app"
    if spec.port is not None:
        env["PORT"] = str(_inner_port(spec))
    return env


def _inner_port(spec: JobSpec) -> int | None:
    """Where the job listens in its container: the image's port, else the host's."""
    return spec.container_port if spec.container_port is not None else spec.port


def container_args(spec: JobSpec, node: str, *, image: str, app_dir: Path | None) -> dict[str, Any]:
    """Keyword arguments for ``client.containers.create`` (see the module docstring)."""
    args: dict[str, Any] = dict(
        image=image,
        name=container_name(node, spec.job_id),
        labels=job_labels(spec, node),
        environment=job_env(spec, in_slug=app_dir is not None),
        init=True,
        log_config=_LOG_CONFIG,
    )
    if app_dir is not None:
        args.update(
            command=["bash", "-c", _LAUNCHER, "flynnp2p-job", spec.command],
            working_dir="/app",
            volumes={str(app_dir): {"bind": "/app", "mode": "rw"}},
        )
    elif spec.command:
        args["command"] = ["sh", "-c", spec.command]
    if spec.port is not None:
        args["ports"] = {f"{_inner_port(spec)}/tcp": (spec.host_addr, spec.port)}
    if spec.memory_mb > 0:
        args["mem_limit"] = args["memswap_limit"] = f"{spec.memory_mb}m"
    return args


def exit_status(state: Mapping[str, Any]) -> int:
    """The seam's status from a container's ``State``: exit code, or ``-signal``."""
    if state.get("OOMKilled"):
        return -_signal.SIGKILL
    code = int(state.get("ExitCode", 0))
    if 128 < code <= 128 + 64:  # docker-init and shells report death by signal N as 128+N
        return -(code - 128)
    return code


def stop_signal(value: str | None) -> int:
    """The image's ``StopSignal`` ("SIGQUIT", "QUIT" or "3") as a number; SIGTERM if unset."""
    if not value:
        return int(_signal.SIGTERM)
    if value.isdigit():
        return int(value)
    name = value.upper()
    try:
        return int(_signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        return int(_signal.SIGTERM)


def parse_timestamp_ns(text: str) -> int | None:
    """Nanoseconds since the epoch of Docker's RFC 3339 timestamps, or None."""
    m = _TIMESTAMP.match(text)
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    seconds = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))
    zone = m.group(8)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + int((m.group(7) or "0").ljust(9, "0"))


class DockerLogLines:
    """One stream's ``timestamps=True`` log frames in, ``(ts_ns, text)`` lines out.

    Every record Docker sends is ``<timestamp> <text>\\n``; a line longer than the
    engine's buffer comes as several records, all but the last without the newline,
    and is put back together here (split again at ``max_line`` characters).
    """

    def __init__(self, max_line: int = _MAX_LINE) -> None:
        self._max_line = max_line
        self._partial = ""
        self._partial_ts: int | None = None
        self._last_ts = 0

    def feed(self, payload: bytes) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        records = payload.split(b"\n")
        for i, record in enumerate(records):
            last = i == len(records) - 1
            if last and not record:
                break
            ts, text = self._split(record)
            if self._partial_ts is not None:
                ts, text = self._partial_ts, self._partial + text
            if last:  # no newline yet: the rest of this line is in the next record
                while len(text) >= self._max_line:
                    out.append((ts, text[: self._max_line]))
                    text = text[self._max_line :]
                self._partial, self._partial_ts = text, ts
            else:
                out.append((ts, text))
                self._partial, self._partial_ts = "", None
        return out

    def flush(self) -> list[tuple[int, str]]:
        """The unfinished last line, at the end of the stream."""
        if self._partial_ts is None:
            return []
        line = (self._partial_ts, self._partial)
        self._partial, self._partial_ts = "", None
        return [line] if line[1] else []

    def _split(self, record: bytes) -> tuple[int, str]:
        head, sep, rest = record.partition(b" ")
        ts = parse_timestamp_ns(head.decode("ascii", "replace")) if sep else None
        if ts is None:  # not a record start we understand: keep it all, at the last time
            return self._last_ts, record.decode("utf-8", "replace")
        self._last_ts = ts
        return ts, rest.decode("utf-8", "replace")


# -- the trio shell -------------------------------------------------------------------
