"""The docker backend: each job is a container on the node's Docker engine.

Theory of operation
-------------------
``DockerBackend.run`` connects to the engine (``client_factory``, a ping) and then
owns one nursery for as long as the backend lives; every job has exactly one
supervisor task in it, started by ``start`` (or ``recover``) with ``nursery.start``.
Every call into the Docker SDK blocks, so each runs in ``trio.to_thread.run_sync``.

Containers. A slug job runs in the stack image (``host.stack``): its slug is copied
to ``<root>/jobs/<job_id>/app`` (``host.slug.prepare_job_dir``) and bind-mounted at
``/app``, and the command is the process backend's launcher (``bash -c`` sourcing
``.profile.d/*.sh``, then ``exec bash -c "$1"``). A job with ``spec.image`` runs that
image as it is: its entrypoint, and ``sh -c <command>`` as its command when there is
one, else the image's own. Every container gets ``init=True`` (docker-init, i.e.
tini, as PID 1): a job's main process is then not PID 1, so signals it does not
handle still kill it, and zombies are reaped. Its exit status is the main
process's; when the main process exits, the PID namespace and everything in it go
with it. The job's port is published as ``host_addr:port -> port/tcp`` (the same
number inside, as ``$PORT``; the app binds ``$HOST`` = ``0.0.0.0``), or to the
image's own port (``spec.container_port``, its first exposed one) when it has one.
An image deployed as a ``docker save`` archive (``spec.image_archive``) is loaded
into the engine before its first job here when the engine lacks it (one load at a
time; the image is named by its id, so a load is never of the wrong image). Memory is a hard
cgroup limit (``mem_limit`` = ``memswap_limit``). The container is named
``flynnp2p-<node>-<job_id>`` and labelled ``flynnp2p.*`` with everything needed to
rebuild its ``JobSpec`` (``host.containers``: the pure parts). Docker keeps its own
copy of the output in a json-file log bounded at 2 x 10 MB.

Logs and exits. The supervisor follows the container's logs with timestamps in one
multiplexed stream (each frame says whether it is stdout or stderr; ``_LogStream``)
and turns each line into a ``LogLine`` for the job's ``LogRing``, ``on_lines`` and
the app's ``AppLogFile``, a batch of frames per thread hop. A follow ends when the
container stops, so that is also how an exit is noticed: when the stream ends, the
supervisor inspects the container. If it has exited, its status is recorded (the
exit code; ``128+N`` and OOM kills become ``-N`` and ``-9``; a container removed
behind our back counts as ``-9``), the container and the job directory are
removed, and ``wait`` returns. If it still runs (the
engine restarted or dropped the connection), the logs are followed again from the
last line seen, with backoff. A blocked follow thread cannot be cancelled, so a
sibling task shuts the stream's socket down when the follow is cancelled, which
unblocks the thread; follow threads use their own unbounded ``CapacityLimiter``
(one per job) so they never starve other ``to_thread`` users.

Stop and signals. ``stop`` sends the image's stop signal (SIGTERM unless the image
says otherwise) through the engine's kill API, waits up to ``grace_s`` (a float,
unlike ``docker stop``'s whole seconds) for the supervisor to see the exit, then
sends SIGKILL and waits for the exit. ``signal`` is synchronous in the seam but an
engine call is not: it adds the signal to the job's pending set (coalesced, as the
kernel does, so bounded) and the job's signal task delivers it.

Cancellation leaves containers running. Cancelling ``run`` (the agent stopping or
crashing) stops following and supervising but does not touch the containers, so an
agent restart is not an app outage: the next ``recover()`` lists the containers
labelled ``flynnp2p.node=<node>``, re-adopts the running ones (logs followed from
now, ``wait``/``stop``/``signal`` work again) and returns their specs, and removes
the rest. ``wait`` on a job whose supervisor was cancelled raises
``trio.ClosedResourceError``. To take the jobs down with the agent (a graceful
shutdown, or tests), call ``stop_all`` before cancelling; ``open_docker_backend``
does that on a clean exit from its block.

Exited jobs stay known (``wait``/``logs`` work) until the id is started again, as
in the process backend.

TODO: run slug jobs as an unprivileged user (the job directory is root-owned today).
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import select
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import docker
import docker.errors
import trio
import urllib3.exceptions

from flynnp2p.errors import ClusterError, ConfigError, Conflict, NotFound, UserError
from flynnp2p.host.backend import JobSpec, LineSink, RunningJob, stop_within
from flynnp2p.host.cgroup import oom_message
from flynnp2p.host.containers import (
    _BATCH_BYTES,
    _BATCH_FRAMES,
    _FRAME_HEADER,
    _JOB_ID,
    _LABEL,
    _LOST_STATUS,
    _REFOLLOW_MAX_S,
    _REFOLLOW_MIN_S,
    _STREAMS,
    ClientFactory,
    DockerLogLines,
    container_args,
    exit_status,
    parse_timestamp_ns,
    spec_from_container,
    stop_signal,
)
from flynnp2p.host.logs import (
    DEFAULT_FILE_BYTES,
    DEFAULT_RING_LINES,
    AppLogs,
    LogLine,
    LogRing,
    Stream,
)
from flynnp2p.host.slug import prepare_job_dir
from flynnp2p.host.stack import ensure_stack_image


class DockerError(ClusterError):
    """The Docker engine refused or failed a request this node needed."""

    code = "docker"


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Job:
    spec: JobSpec
    container_id: str
    running: RunningJob
    ring: LogRing
    stop_signal: int
    exited: trio.Event = field(default_factory=trio.Event)
    status: int | None = None  # None once exited is set: the backend let go of a running job
    stop_deadline: float | None = None  # trio time at which a stop turns into SIGKILL
    pending_signals: set[int] = field(default_factory=set)
    signals_ready: trio.Event = field(default_factory=trio.Event)
    last_ts_ns: dict[Stream, int] = field(default_factory=dict)  # newest line seen per stream
    skip_until_ns: dict[Stream, int] = field(default_factory=dict)  # after a re-follow
    log_write_errors: int = 0
    cleanup_errors: int = 0
    signal_errors: int = 0
    exit_reason: str | None = None  # set when the engine says the kernel killed it at its limit


class _LogStream:
    """A container's followed log stream, both outputs multiplexed (blocking calls).

    The Engine API frames every record as an 8-byte header (stream id, payload
    length) and the payload. ``read_batch`` blocks for one frame, then takes the
    frames that are readable at once, so one thread hop carries many lines.

    ``interrupt`` (from any thread) shuts the socket down, which wakes a reader
    blocked in ``read_batch``. It acts on a duplicate of the socket's descriptor
    taken at open, and the request asks for ``Connection: close`` so the connection
    never goes back to the client's pool: the shutdown can only ever hit this stream.
    """

    def __init__(self, client: Any, container_id: str, since: float | None) -> None:
        api = client.api
        params: dict[str, Any] = {"stdout": 1, "stderr": 1, "follow": 1, "timestamps": 1}
        if since is not None:
            params["since"] = f"{since:.9f}"
        self._response = api.get(
            f"{api.base_url}/v{api.api_version}/containers/{container_id}/logs",
            params=params,
            headers={"Connection": "close"},
            stream=True,
            timeout=(30, None),
        )
        if self._response.status_code != 200:
            self._response.close()
            raise OSError(f"docker logs of {container_id} answered {self._response.status_code}")
        self._raw = self._response.raw
        self._handle = socket.socket(fileno=os.dup(self._raw.fileno()))
        self._poll = select.poll()
        self._poll.register(self._handle, select.POLLIN)
        self._ended = False

    def read_batch(self) -> list[tuple[Stream, bytes]] | None:
        """Frames as (stream, payload): at least one, or None once the stream has ended."""
        frames: list[tuple[Stream, bytes]] = []
        size = 0
        while not self._ended and len(frames) < _BATCH_FRAMES and size < _BATCH_BYTES:
            if frames and not self._poll.poll(0):
                break  # nothing more on the socket now (a frame in a buffer waits for next time)
            frame = self._read_frame()
            if frame is None:
                self._ended = True
            elif frame[0] in _STREAMS:
                frames.append((_STREAMS[frame[0]], frame[1]))
                size += len(frame[1])
        return frames if frames or not self._ended else None

    def _read_frame(self) -> tuple[int, bytes] | None:
        try:
            header = self._raw.read(_FRAME_HEADER.size)
            if len(header) < _FRAME_HEADER.size:
                return None
            kind, length = _FRAME_HEADER.unpack(header)
            payload = self._raw.read(length) if length else b""
        except (OSError, ValueError, urllib3.exceptions.HTTPError, http.client.HTTPException):
            return None  # interrupted, or the engine went away: the caller inspects
        return (kind, payload) if len(payload) == length else None

    def interrupt(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Release everything; only once no thread is reading."""
        self._handle.close()
        self._response.close()


async def _interrupt_when_cancelled(logs: _LogStream) -> None:
    try:
        await trio.sleep_forever()
    finally:
        logs.interrupt()


class DockerBackend:
    """Runs jobs as containers on the local Docker engine; see the module docstring."""

    name: str = "docker"
    memory_enforced: bool = True

    def __init__(
        self,
        root_dir: Path,
        node: str,
        *,
        on_lines: LineSink | None = None,
        ring_lines: int = DEFAULT_RING_LINES,
        log_file_bytes: int = DEFAULT_FILE_BYTES,
        shutdown_grace_s: float = 10.0,
        client_factory: ClientFactory = docker.from_env,
        stack_image: str | None = None,  # default: ``ensure_stack_image`` at the first slug job
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.root_dir = root_dir
        self.node = node
        self._on_lines = on_lines
        self._ring_lines = ring_lines
        self._shutdown_grace_s = shutdown_grace_s
        self._client_factory = client_factory
        self._stack_image = stack_image
        self._stack_lock = trio.Lock()
        self._load_lock = trio.Lock()
        self._clock_ms = clock_ms
        self._jobs: dict[str, _Job] = {}
        self._starting: set[str] = set()
        self._app_logs = AppLogs(self.root_dir / "logs", log_file_bytes)
        self._followers = trio.CapacityLimiter(math.inf)  # a blocked thread per running job
        self._client: Any = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the job supervisors until cancelled; cancelling leaves containers running."""
        client = await trio.to_thread.run_sync(self._connect)
        try:
            async with trio.open_nursery() as nursery:
                self._client, self._nursery = client, nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._client = self._nursery = None
            client.close()

    def _connect(self) -> Any:
        try:
            client = self._client_factory()
            client.ping()
        except docker.errors.DockerException as e:
            raise ConfigError(
                f"the docker backend cannot reach a Docker engine ({e}); "
                "start dockerd or use the process backend"
            ) from e
        return client

    # -- the JobBackend protocol --------------------------------------------------

    async def start(self, spec: JobSpec) -> RunningJob:
        nursery, client = self._running()
        if not _JOB_ID.match(spec.job_id):
            raise UserError(
                f"job id {spec.job_id!r} is not valid; expected [A-Za-z0-9][A-Za-z0-9_.-]*"
            )
        old = self._jobs.get(spec.job_id)
        if spec.job_id in self._starting or (old is not None and not old.exited.is_set()):
            raise Conflict(f"job {spec.job_id!r} already exists on this host")
        self._starting.add(spec.job_id)
        try:
            if spec.image:
                image, app_dir = spec.image, None
                if spec.image_archive is not None:
                    await self._ensure_loaded(client, spec.image, spec.image_archive)
            elif spec.slug_dir is None:
                raise UserError(f"job {spec.job_id!r} has neither a slug nor an image to run")
            else:
                image = await self._stack()
                app_dir = await prepare_job_dir(spec.slug_dir, self.root_dir, spec.job_id)
            args = container_args(spec, self.node, image=image, app_dir=app_dir)
            attrs = await trio.to_thread.run_sync(_create_and_start, client, args, spec)
            job = self._new_job(spec, attrs)
            self._jobs[spec.job_id] = job
        finally:
            self._starting.discard(spec.job_id)
        try:
            await nursery.start(self._supervise, job, None)
        except RuntimeError:
            job.exited.set()  # the backend is shutting down: the container is left, as on cancel
            raise
        return job.running

    async def stop(self, job_id: str, grace_s: float = 10.0) -> None:
        """Stop signal, up to ``grace_s`` to exit, then SIGKILL; return once it has exited."""
        job = self._job(job_id)

        async def send(sig: int) -> None:
            await self._kill(job, sig)

        await stop_within(job, grace_s, send, job.stop_signal)

    def signal(self, job_id: str, sig: int) -> None:
        """Queue ``sig`` for the job's main process (no-op once it has exited)."""
        job = self._job(job_id)
        if not job.exited.is_set():
            job.pending_signals.add(sig)
            job.signals_ready.set()

    async def wait(self, job_id: str) -> int:
        job = self._job(job_id)
        await job.exited.wait()
        if job.status is None:
            raise trio.ClosedResourceError(
                f"the docker backend stopped supervising job {job_id!r}; "
                "its container was left running"
            )
        return job.status

    def forget(self, job_id: str) -> None:
        """Drop an exited job's entry (its container and copy went when it exited)."""
        job = self._jobs.get(job_id)
        if job is not None and job.exited.is_set():
            del self._jobs[job_id]

    def logs(self, job_id: str) -> list[LogLine]:
        return self._job(job_id).ring.lines()

    def exit_reason(self, job_id: str) -> str | None:
        """Why the job's last run ended when its status does not say (out of memory)."""
        return self._job(job_id).exit_reason

    async def recover(self) -> list[JobSpec]:
        """Re-adopt this node's running containers, remove its other ones."""
        nursery, client = self._running()
        found = await self._engine(
            client.api.containers, all=True, filters={"label": f"{_LABEL}node={self.node}"}
        )
        adopted: list[JobSpec] = []
        for cid in sorted(c["Id"] for c in found):
            try:
                attrs = await self._engine(client.api.inspect_container, cid)
            except docker.errors.NotFound:
                continue
            labels = attrs["Config"].get("Labels") or {}
            job_id = labels.get(_LABEL + "job", "")
            if job_id in self._jobs or job_id in self._starting:
                continue  # already ours (recover called twice)
            spec = None
            if attrs["State"].get("Running"):
                with contextlib.suppress(ValueError):
                    spec = spec_from_container(labels, attrs["Config"].get("Env") or [])
            if spec is None or not _JOB_ID.match(spec.job_id):
                await trio.to_thread.run_sync(self._discard, client, cid, job_id)
                continue
            job = self._new_job(spec, attrs)
            self._jobs[spec.job_id] = job
            await nursery.start(self._supervise, job, self._clock_ms() / 1000)
            adopted.append(spec)
        return adopted

    async def stop_all(self, grace_s: float | None = None) -> None:
        """Stop every running job (in parallel); for a graceful shutdown before cancelling."""
        grace = self._shutdown_grace_s if grace_s is None else grace_s
        async with trio.open_nursery() as nursery:
            for job_id, job in sorted(self._jobs.items()):
                if not job.exited.is_set():
                    nursery.start_soon(self.stop, job_id, grace)

    # -- internals ----------------------------------------------------------------

    def _running(self) -> tuple[trio.Nursery, Any]:
        if self._nursery is None or self._client is None:
            raise RuntimeError("DockerBackend used while run() is not running")
        return self._nursery, self._client

    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"no job {job_id!r} on this host") from None

    def _new_job(self, spec: JobSpec, attrs: Mapping[str, Any]) -> _Job:
        started = parse_timestamp_ns(attrs["State"].get("StartedAt", ""))
        return _Job(
            spec=spec,
            container_id=attrs["Id"],
            running=RunningJob(
                spec.job_id,
                int(attrs["State"].get("Pid") or 0),
                None,
                started // 1_000_000 if started else self._clock_ms(),
            ),
            ring=LogRing(self._ring_lines),
            stop_signal=stop_signal(attrs["Config"].get("StopSignal")),
        )

    async def _stack(self) -> str:
        async with self._stack_lock:
            if self._stack_image is None:
                try:
                    self._stack_image = await ensure_stack_image(self._client_factory)
                except (docker.errors.DockerException, OSError) as e:
                    raise DockerError(f"cannot build the stack image: {e}") from e
            return self._stack_image

    async def _ensure_loaded(self, client: Any, image: str, archive: Path) -> None:
        """``docker load`` `archive` unless the engine has `image` (its id) already."""
        async with self._load_lock:
            try:
                await self._engine(client.api.inspect_image, image)
                return
            except docker.errors.NotFound:
                pass
            await self._engine(_load_archive, client, archive)
            try:
                await self._engine(client.api.inspect_image, image)
            except docker.errors.NotFound:
                raise DockerError(f"docker load of {archive.name} did not make image {image}") from None

    async def _kill(self, job: _Job, sig: int) -> None:
        try:
            await trio.to_thread.run_sync(self._running()[1].api.kill, job.container_id, int(sig))
        except docker.errors.APIError as e:
            if e.status_code not in (404, 409):  # gone, or not running any more: nothing to do
                raise DockerError(f"cannot signal job {job.spec.job_id!r}: {e}") from e
        except (docker.errors.DockerException, OSError) as e:
            raise DockerError(f"cannot signal job {job.spec.job_id!r}: {e}") from e

    async def _engine(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a thread; engine failures (but NotFound) as DockerError."""
        try:
            return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))
        except docker.errors.NotFound:
            raise
        except (docker.errors.DockerException, OSError) as e:
            raise DockerError(f"the Docker engine failed: {e}") from e

    async def _supervise(
        self, job: _Job, since: float | None, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._deliver_signals, job)
                task_status.started()
                status = await self._follow_until_exit(job, since)
                nursery.cancel_scope.cancel()
            client = self._running()[1]
            await trio.to_thread.run_sync(self._discard, client, job.container_id, job.spec.job_id)
            job.status = status
        finally:
            job.exited.set()

    async def _deliver_signals(self, job: _Job) -> None:
        while True:
            await job.signals_ready.wait()
            job.signals_ready = trio.Event()
            pending = sorted(job.pending_signals)
            job.pending_signals.clear()
            for sig in pending:
                try:
                    await self._kill(job, sig)
                except DockerError:
                    job.signal_errors += 1  # the engine is not answering; the job runs on

    async def _follow_until_exit(self, job: _Job, since: float | None) -> int:
        client = self._running()[1]
        backoff = _REFOLLOW_MIN_S
        while True:
            await self._follow(job, since)
            try:
                attrs = await trio.to_thread.run_sync(
                    client.api.inspect_container, job.container_id
                )
            except docker.errors.NotFound:
                return _LOST_STATUS
            except (docker.errors.DockerException, OSError):
                attrs = None  # the engine is not answering; try again
            if attrs is not None and not attrs["State"].get("Running"):
                if attrs["State"].get("OOMKilled"):
                    limit = int((attrs.get("HostConfig") or {}).get("Memory") or 0)
                    job.exit_reason = oom_message(limit)
                    now_ns = time.time_ns()
                    await self._emit(job, [("stderr", now_ns, f"flynnp2p: {job.exit_reason}")])
                return exit_status(attrs["State"])
            # The follow ended but the container runs on: the engine restarted or dropped
            # the connection. Follow again from the newest line seen.
            await trio.sleep(backoff)
            backoff = min(2 * backoff, _REFOLLOW_MAX_S)
            job.skip_until_ns = dict(job.last_ts_ns)
            if job.last_ts_ns:
                since = min(job.last_ts_ns.values()) / 1e9

    async def _follow(self, job: _Job, since: float | None) -> None:
        """Follow the container's output until the stream ends (the container stopped)."""
        client = self._running()[1]
        try:
            logs = await trio.to_thread.run_sync(_LogStream, client, job.container_id, since)
        except (docker.errors.DockerException, OSError):
            return  # gone, or the engine is not answering: the caller inspects and decides
        splitters: dict[Stream, DockerLogLines] = {
            "stdout": DockerLogLines(),
            "stderr": DockerLogLines(),
        }
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_interrupt_when_cancelled, logs)
                while True:
                    frames = await trio.to_thread.run_sync(
                        logs.read_batch, limiter=self._followers
                    )
                    if frames is None:
                        break
                    await self._emit(
                        job, [(st, *ln) for st, data in frames for ln in splitters[st].feed(data)]
                    )
                await self._emit(
                    job, [(st, *ln) for st, sp in splitters.items() for ln in sp.flush()]
                )
                nursery.cancel_scope.cancel()
        finally:
            logs.close()

    async def _emit(self, job: _Job, lines: list[tuple[Stream, int, str]]) -> None:
        out: list[LogLine] = []
        for stream, ts, text in lines:
            if ts > job.skip_until_ns.get(stream, 0):
                out.append(LogLine(ts // 1_000_000, stream, text))
            job.last_ts_ns[stream] = max(job.last_ts_ns.get(stream, 0), ts)
        if not out:
            return
        for line in out:
            job.ring.append(line)
        if self._on_lines is not None:
            self._on_lines(job.spec, out)
        try:
            app_log = self._app_logs.of(job.spec.app_name)
            await trio.to_thread.run_sync(app_log.append_lines, job.spec.job_id, out)
        except OSError:
            job.log_write_errors += 1  # a full disk must not stop the job; the ring has them

    def _discard(self, client: Any, container_id: str, job_id: str) -> None:
        """Remove a container and its job directory (blocking; best effort)."""
        try:
            client.api.remove_container(container_id, v=True, force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError):
            # The engine is not answering; the next recover() removes the container.
            job = self._jobs.get(job_id)
            if job is not None:
                job.cleanup_errors += 1
        if _JOB_ID.match(job_id):
            shutil.rmtree(self.root_dir / "jobs" / job_id, ignore_errors=True)


def _load_archive(client: Any, archive: Path) -> None:
    """``docker load`` (blocking): the archive streamed to the engine, its answer read out."""
    with archive.open("rb") as f:
        for event in client.api.load_image(f):
            if isinstance(event, dict) and event.get("error"):
                raise DockerError(f"docker load of {archive.name} failed: {event['error']}")


def _create_and_start(client: Any, args: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """Create and start a container (blocking); replaces a leftover of the same name."""
    try:
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(args["name"], v=True, force=True)
        try:
            container = client.containers.create(**args)
        except docker.errors.ImageNotFound as e:
            raise UserError(
                f"image {args['image']!r} is not on this node's Docker engine and there is no "
                "registry to pull it from; load it first (docker load or docker import)"
            ) from e
        try:
            container.start()
            container.reload()
        except BaseException:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                container.remove(force=True)
            raise
    except docker.errors.APIError as e:
        if "already allocated" in str(e) or "address already in use" in str(e):
            raise Conflict(
                f"port {spec.port} on {spec.host_addr} is already in use on this host"
            ) from e
        raise DockerError(f"cannot start the container of job {spec.job_id!r}: {e}") from e
    except (docker.errors.DockerException, OSError) as e:
        raise DockerError(f"cannot start the container of job {spec.job_id!r}: {e}") from e
    attrs: dict[str, Any] = container.attrs
    return attrs


@contextlib.asynccontextmanager
async def open_docker_backend(
    root_dir: Path, node: str, *, stop_jobs_on_exit: bool = True, **kwargs: Any
) -> AsyncIterator[DockerBackend]:
    """Run a ``DockerBackend`` for the block; a clean exit stops its jobs first (``stop_all``)."""
    backend = DockerBackend(root_dir, node, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        yield backend
        if stop_jobs_on_exit:
            await backend.stop_all()
        nursery.cancel_scope.cancel()
