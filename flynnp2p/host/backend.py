"""The seam between the host agent and whatever runs jobs (processes, Docker).

A backend is given a ``JobSpec`` (everything needed to start one job of a release)
and hands back a ``RunningJob``. It owns the job's process from start to reaping;
callers only ask it to stop, signal, wait and show logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flynnp2p.host.logs import LogLine


@dataclass(frozen=True, slots=True)
class JobSpec:
    job_id: str
    app_name: str
    app_id: str
    release_id: str
    process_type: str
    command: str  # shell text from the Procfile (or the release's command)
    env: Mapping[str, str]  # the release env; the backend adds PORT, APP_NAME, ...
    port: int | None
    slug_dir: Path  # the unpacked slug's app directory (see ``host.slug.unpack_slug``)
    memory_mb: int  # 0 means no limit


@dataclass(frozen=True, slots=True)
class RunningJob:
    job_id: str
    pid: int
    app_dir: Path  # the job's own working copy; its cwd and HOME
    started_ms: int


class JobBackend(Protocol):
    async def start(self, spec: JobSpec) -> RunningJob: ...

    async def stop(self, job_id: str, grace_s: float = 10.0) -> None: ...

    def signal(self, job_id: str, sig: int) -> None: ...

    async def wait(self, job_id: str) -> int:
        """The job's exit status: its exit code, or ``-signal`` when a signal ended it."""
        ...

    def logs(self, job_id: str) -> list[LogLine]: ...
