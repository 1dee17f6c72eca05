"""The seam between the host agent and whatever runs jobs (processes, Docker).

A backend is given a ``JobSpec`` (everything needed to start one job of a release)
and hands back a ``RunningJob``. It owns the job's process (or container) from
start to reaping; callers only ask it to stop, signal, wait and show logs.

Life cycle: the host runner starts the backend with ``nursery.start(backend.run)``
and, before starting any job, calls ``recover()`` once: jobs this node ran before
the agent restarted are either re-adopted (their specs are returned and they are
supervised again: ``wait``/``stop``/``logs`` work on them) or killed and cleaned
up (not returned). No orphan survives ``recover``.

A job id may be started again once its previous run has exited (a crashed job is
restarted in place under the same id).

Every output line is handed to ``on_lines`` (given to the backend's constructor),
so the node can serve live log streams; the backend also keeps the per-job ring
and the per-app file.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from flynnp2p.host.image import ImageConfig
from flynnp2p.host.logs import LogLine


@dataclass(frozen=True, slots=True)
class ImageRoot:
    """An image's unpacked root filesystem (``host.rootfs``) and how it runs."""

    path: Path
    config: ImageConfig


@dataclass(frozen=True, slots=True)
class JobSpec:
    job_id: str
    app_name: str
    app_id: str
    release_id: str
    process_type: str
    command: str  # shell text from the Procfile (or the release's command); "" = image default
    env: Mapping[str, str]  # the release env; the backend adds PORT, APP_NAME, ...
    port: int | None  # the host port allocated to the job (its $PORT)
    slug_dir: Path | None  # the unpacked slug's app directory (``host.slug.unpack_slug``)
    memory_mb: int  # 0 means no limit
    image: str | None = None  # a Docker image to run as it is (docker backend only)
    host_addr: str = "127.0.0.1"  # the node's address: $HOST, and where Docker publishes
    # Images (``host.image``): where the job listens inside its container when the image
    # says (its first exposed port; the host's ``port`` is published to it), the
    # ``docker save`` archive holding ``image`` (loaded when the engine lacks it), and
    # the unpacked root filesystem a process-backend job runs in.
    container_port: int | None = None
    image_archive: Path | None = None
    root: ImageRoot | None = None


@dataclass(frozen=True, slots=True)
class RunningJob:
    job_id: str
    pid: int  # process group id (process backend) or the container's init pid (docker)
    app_dir: Path | None  # the job's own working copy (process backend); None in a container
    started_ms: int


LineSink = Callable[[JobSpec, Sequence[LogLine]], None]


class JobBackend(Protocol):
    name: str  # "process" or "docker"
    memory_enforced: bool  # whether memory_mb is enforced by the kernel

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the jobs until cancelled; cancelling stops every job."""
        ...

    async def recover(self) -> list[JobSpec]:
        """Re-adopt or clean up the jobs of a previous agent run (see the module doc)."""
        ...

    async def start(self, spec: JobSpec) -> RunningJob: ...

    async def stop(self, job_id: str, grace_s: float = 10.0) -> None: ...

    def signal(self, job_id: str, sig: int) -> None: ...

    async def wait(self, job_id: str) -> int:
        """The job's exit status: its exit code, or ``-signal`` when a signal ended it."""
        ...

    def logs(self, job_id: str) -> list[LogLine]: ...

    def exit_reason(self, job_id: str) -> str | None:
        """Why the job's last run ended when its status does not say (it ran out of
        memory), else None."""
        ...

    def forget(self, job_id: str) -> None:
        """Drop an exited job's bookkeeping (its ring) and working copy; no-op otherwise."""
        ...


class Stoppable(Protocol):
    """What `stop_within` needs of a backend's job bookkeeping."""

    exited: trio.Event
    stop_deadline: float | None  # trio time at which a stop turns into SIGKILL


async def stop_within(
    job: Stoppable, grace_s: float, send: Callable[[int], Awaitable[None]], stop_signal: int
) -> None:
    """``stop_signal``, up to ``grace_s`` (or an earlier stop's deadline) to exit, then
    SIGKILL; return once the job has exited. Shared by the backends."""
    if job.exited.is_set():
        return
    deadline = trio.current_time() + grace_s
    if job.stop_deadline is None or deadline < job.stop_deadline:
        job.stop_deadline = deadline
    await send(stop_signal)
    with trio.move_on_at(job.stop_deadline):
        await job.exited.wait()
    if not job.exited.is_set():
        await send(signal.SIGKILL)
        await job.exited.wait()
