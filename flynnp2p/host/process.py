"""The process backend: each job is a process group started from an unpacked slug.

Theory of operation
-------------------
``ProcessBackend.run`` owns one nursery for as long as the backend lives; every job
has exactly one supervisor task in it (started by ``start`` with ``nursery.start``),
and that task owns the job's process from spawn to reaping, plus a reader task per
output stream in a child nursery. The usual way in is::

    async with open_process_backend(root) as backend:
        job = await backend.start(spec)

A job runs ``bash -c 'for f in .profile.d/*.sh; ...; exec bash -c "$1"' job <command>``
in its own working copy of the slug, in a new session (so its pid is its process
group id). The inner ``bash -c`` execs a single simple command directly and still
runs compound commands (``exit 3``, pipelines) as shell text; exported variables from
``.profile.d`` reach it.

Stopping is SIGTERM to the whole group, up to ``grace_s`` for every member of the
group to exit, then SIGKILL to the group. When the main process exits by itself,
anything left in its group is SIGKILLed at once: the main process owns its children. When the backend is cancelled, every job gets the same treatment under a
shielded, bounded cleanup (``shutdown_grace_s`` then SIGKILL, then at most
``_REAP_S`` to reap).

Memory limits are a memory cgroup per job where the host has a usable controller
(``host.cgroup``: ``<agent's group>/flynnp2p-jobs-<node>-<key>/<job id>``, made with its limit
before the spawn, joined by the child between fork and exec, removed once the job
is reaped, with whatever is still in it; ``run`` removes the groups an earlier
run left). A job the kernel's OOM killer hit says so: its exit reason
(`exit_reason`) and a last ``stderr`` line in its log. Where no controller is
usable the limit is ``RLIMIT_AS`` set in the child before exec (address space, not
resident memory: runtimes that reserve much, such as V8, need a larger limit),
and the agent's log says so once.

A job dies with a SIGKILLed agent through the parent-death signal (see
``host.spawn``; its own children survive that), and each running job has a
pidfile, ``<root>/pids/<job id>``, holding its process group id and the kernel's
start time of its leader. ``recover()``, called by the next agent run
before it starts anything, SIGKILLs every such group whose leader is still the
same process (pid reuse is detected through the start time) and removes the
files: the process backend cleans up rather than re-adopts (it cannot re-attach
to the pipes of a process it did not start), and the runner starts the jobs
again.

Isolation, when the agent runs as root (``isolation`` says what this host gives):

* every app's jobs run as their own unprivileged uid/gid (``app_uid``: 200000 plus
  a hash of the app id, no passwd entry needed), with no supplementary groups,
  so apps cannot signal or read each other's processes and files; the job's
  working copy is chowned to it;
* in new mount and UTS namespaces (``unshare``, mounts made private) where the
  kernel allows: "namespaces". There the working copy is bind-mounted on ``/app``
  (an empty directory the agent makes on the host) and is the job's cwd and HOME,
  as on Heroku, so absolute paths work whatever the permissions above the data
  dir. Else only the user switch: "user" (the path to the data dir must then be
  traversable by others for apps that use absolute paths).
* the processes that set this up run as root, so they never see the job's env
  (an app's ``LD_PRELOAD`` would otherwise run its code as root on the host): they
  get a fixed ``PATH``, and the env reaches the launcher on an inherited memfd,
  which it reads and closes after the uid switch.

A job of an image archive (``spec.root``) runs the image's own argv (or ``/bin/sh
-c`` a one-off's command) chrooted into the image's unpacked root filesystem,
read-only, in the same namespaces and as the same uid (``host.chroot`` says how);
it needs "namespaces". With no network namespace it listens on the host's
``$PORT``, not on the port the image exposes. Its env is the image's ``Env`` with
the release's over it.

A PID namespace is left out on purpose: the job would be PID 1 of it, and PID 1
ignores SIGTERM unless it installs a handler, so most apps could not be stopped
gracefully. ``unshare`` and ``setpriv`` exec in place, so the job's pid is still
its process group id. Without root, jobs run as the agent's user ("none").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal as _signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from flynnp2p.errors import Conflict, NotFound, UserError
from flynnp2p.host.backend import ImageRoot, JobSpec, LineSink, RunningJob, stop_within
from flynnp2p.host.cgroup import (
    JobGroup,
    MemoryGroups,
    agent_parent_name,
    find_controller,
    oom_message,
    sweep_sync,
)
from flynnp2p.host.chroot import HOST_PATH, enter_argv, write_env_file
from flynnp2p.host.logs import AppLogs, LogLine, LogRing, Stream
from flynnp2p.host.slug import prepare_job_dir
from flynnp2p.host.spawn import (
    Child,
    Spawner,
    child_preexec,
    chown_tree,
    line_batches,
)

_LAUNCHER = (
    'for f in .profile.d/*.sh; do if [ -r "$f" ]; then . "$f"; fi; done; unset f; exec bash -c "$1"'
)
# Isolated jobs: the stages that run as root (unshare, its shell, setpriv) get a fixed
# PATH only, never the job's env (an app's LD_PRELOAD would run its code as root on the
# host). The env reaches the launcher on an inherited memfd (``K=V`` records,
# NUL-separated; nothing on disk), which it exports once it runs as the app's uid and
# then closes: $2 is the descriptor, $1 the command.
_ENV_LAUNCHER = (
    'while IFS= read -r -d "" kv; do export "$kv"; done <&"$2" || exit 126; '
    'unset kv; fd=$2; exec {fd}<&-; unset fd; ' + _LAUNCHER
)
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # docker's default
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # as host.slug checks it
_DRAIN_S = 2.0  # after the group is gone, how long readers may finish the pipes
_REAP_S = 5.0
_GROUP_POLL_S = 0.05  # bound on waiting for a SIGKILLed process to be reaped

log = logging.getLogger(__name__)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _killpg(pgid: int, sig: int) -> None:
    # The group id stays reserved while any member lives, even after the leader
    # is reaped, so this cannot hit an unrelated group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _wait_group_empty(pgid: int) -> None:
    # There is no wakeup for "process group became empty", so poll. Unreaped zombies
    # still count as members; the caller bounds this by the stop deadline.
    while _group_exists(pgid):  # noqa: ASYNC110 - nothing to wait on but the kernel's table
        await trio.sleep(_GROUP_POLL_S)


_UNSHARE = ["unshare", "--mount", "--uts", "--propagation", "private", "--"]
APP_MOUNT = Path("/app")  # where a job in a mount namespace sees its working copy
# In the job's own mount namespace, as root: its copy on /app, then the user switch.
_BIND_APP = 'mount --bind "$1" /app && cd /app && shift && exec "$@"'
# --pdeathsig: the uid switch clears the parent-death signal; set it again.
_SETPRIV = ["setpriv", "--clear-groups", "--inh-caps=-all", "--pdeathsig=KILL"]


def job_env_fd(env: Mapping[str, str]) -> int:
    """A memfd holding `env` as `_ENV_LAUNCHER` reads it, at offset 0 (close it after
    the spawn; ``pass_fds`` makes the child's copy inheritable)."""
    fd = os.memfd_create("flynnp2p-job-env", os.MFD_CLOEXEC)
    try:
        data = memoryview(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
        while data:
            data = data[os.write(fd, data) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def app_uid(app_id: str) -> int:
    """The uid (and gid) an app's jobs run as when the agent is root."""
    return 200_000 + int.from_bytes(hashlib.sha256(app_id.encode()).digest()[:4], "big") % 100_000


def detect_isolation() -> str:
    """"namespaces", "user" or "none": what this host allows (see the module docstring)."""
    if os.geteuid() != 0:
        return "none"
    probe = [*_SETPRIV, "--reuid=65534", "--regid=65534", "--", "true"]
    try:
        APP_MOUNT.mkdir(mode=0o755, exist_ok=True)  # the mount point, empty on the host
        in_ns = [*_UNSHARE, "sh", "-c", _BIND_APP, "flynnp2p-mount", "/", *probe]
    except OSError:
        in_ns = []
    for mode, argv in (("namespaces", in_ns), ("user", probe)):
        if not argv:
            continue
        try:
            if subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0:
                return mode
        except (OSError, subprocess.TimeoutExpired):
            continue
    return "none"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _write_pidfile(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} {_start_time(pid) or 0}\n")


def _job_env(spec: JobSpec) -> dict[str, str]:
    """A job's env: the release's, then what flynnp2p sets (an image job's goes over
    the image's own; a slug job's gets HOME and PATH too)."""
    env = dict(spec.env)
    env.update(
        APP_NAME=spec.app_name,
        APP_ID=spec.app_id,
        RELEASE_ID=spec.release_id,
        JOB_ID=spec.job_id,
        PROCESS_TYPE=spec.process_type,
    )
    env.setdefault("HOST", spec.host_addr)
    if spec.port is not None:
        env["PORT"] = str(spec.port)  # the host's (no network namespace: images too)
    return env


@dataclass
class _Job:
    spec: JobSpec
    process: Child
    running: RunningJob
    ring: LogRing
    exited: trio.Event = field(default_factory=trio.Event)
    stop_deadline: float | None = None  # trio time at which a stop turns into SIGKILL
    status: int | None = None
    log_write_errors: int = 0
    group: JobGroup | None = None  # its memory cgroup, when the host has one
    exit_reason: str | None = None  # what the status alone does not say (out of memory)


class ProcessBackend:
    """Runs jobs as local process groups; see the module docstring."""

    name = "process"
    memory_enforced = True  # a memory cgroup, else RLIMIT_AS: see the module docstring

    def __init__(
        self,
        root_dir: Path,
        *,
        ring_lines: int = 10_000,
        log_file_bytes: int = 10 * 1024 * 1024,
        shutdown_grace_s: float = 10.0,
        clock_ms: Callable[[], int] = wall_clock_ms,
        on_lines: LineSink | None = None,
        isolate: bool = True,
        node_name: str | None = None,
        cgroups: bool = True,
    ) -> None:
        self.root_dir = root_dir
        self._on_lines = on_lines
        self.isolation = detect_isolation() if isolate else "none"
        self._group_name = agent_parent_name(node_name, root_dir)
        self._cgroups = cgroups
        self.memory_groups: MemoryGroups | None = None  # once run() has found a controller
        self.memory_limits = "rlimit"  # or "cgroup v1" / "cgroup v2", once run() has looked
        self._ring_lines = ring_lines
        self._shutdown_grace_s = shutdown_grace_s
        self._clock_ms = clock_ms
        self._jobs: dict[str, _Job] = {}
        self._starting: set[str] = set()  # ids reserved while their directory is prepared
        self._app_logs = AppLogs(self.root_dir / "logs", log_file_bytes)
        self._nursery: trio.Nursery | None = None
        self._spawner = Spawner()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the job supervisors until cancelled; cancelling stops every job."""
        await trio.to_thread.run_sync(self._open_groups)
        self._spawner.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):  # every job is reaped by now
                await trio.to_thread.run_sync(self._spawner.close)
                if self.memory_groups is not None:
                    await trio.to_thread.run_sync(self.memory_groups.close_sync)

    def _open_groups(self) -> None:
        """Find the memory controller and make this agent's parent group (blocking)."""
        if not self._cgroups:
            return  # RLIMIT_AS by the caller's choice (tests of the fallback)
        found = find_controller()
        if not isinstance(found, str):
            groups = MemoryGroups(found, self._group_name)
            try:
                stale = groups.open_sync()
                sweep_sync(found, groups.parent)
            except OSError as exc:
                found = f"cannot set up {groups.parent}: {exc}"
            else:
                self.memory_groups = groups
                self.memory_limits = f"cgroup v{found.version}"
                if stale:
                    log.info("removed %d memory cgroups an earlier run left", len(stale))
                return
        log.warning(
            "job and build memory limits are RLIMIT_AS (address space), not cgroups: %s", found
        )

    # -- the JobBackend protocol --------------------------------------------------

    async def start(self, spec: JobSpec) -> RunningJob:
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("ProcessBackend.start called while run() is not running")
        old = self._jobs.get(spec.job_id)
        if (old is not None and not old.exited.is_set()) or spec.job_id in self._starting:
            raise Conflict(f"job {spec.job_id!r} is already running on this host")
        self._starting.add(spec.job_id)
        group = None
        try:
            if self.memory_groups is not None:
                group = await trio.to_thread.run_sync(
                    self.memory_groups.create_sync, spec.job_id, max(spec.memory_mb, 0) * 1024 * 1024
                )
            app_dir, process = await self._spawn(spec, group)
        except BaseException:
            if group is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(group.remove_sync)
            raise
        finally:
            self._starting.discard(spec.job_id)
        job = _Job(
            spec=spec,
            process=process,
            running=RunningJob(spec.job_id, process.pid, app_dir, self._clock_ms()),
            ring=LogRing(self._ring_lines),
            group=group,
        )
        self._jobs[spec.job_id] = job
        await trio.to_thread.run_sync(_write_pidfile, self._pidfile(spec.job_id), process.pid)
        try:
            await nursery.start(self._supervise, job)
        except RuntimeError:
            # The nursery closed while we spawned (backend shutting down); the
            # supervisor never ran, so nobody else will kill or reap this process.
            _killpg(process.pid, _signal.SIGKILL)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_REAP_S):
                    await process.wait()
                if group is not None:
                    await trio.to_thread.run_sync(group.remove_sync)
            raise
        return job.running

    async def recover(self) -> list[JobSpec]:
        """Kill the jobs a previous agent run left behind (see the module docstring)."""
        return await trio.to_thread.run_sync(self._recover_sync)

    def _recover_sync(self) -> list[JobSpec]:
        pids = self.root_dir / "pids"
        for path in sorted(pids.glob("*")) if pids.is_dir() else []:
            try:
                pgid_text, started = path.read_text().split()
                pgid = int(pgid_text)
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if _start_time(pgid) == started:
                _killpg(pgid, _signal.SIGKILL)
            path.unlink(missing_ok=True)
        return []

    def _pidfile(self, job_id: str) -> Path:
        return self.root_dir / "pids" / job_id

    async def _spawn(self, spec: JobSpec, group: JobGroup | None) -> tuple[Path, Child]:
        if spec.root is not None:
            return await self._spawn_in_image(spec, spec.root, group)
        if spec.slug_dir is None:
            raise UserError(f"job {spec.job_id}: the process backend runs slugs, and it has none")
        app_dir = await prepare_job_dir(spec.slug_dir, self.root_dir, spec.job_id)
        prefix: list[str] = []
        home = app_dir
        if self.isolation != "none":
            uid = app_uid(spec.app_id)
            await trio.to_thread.run_sync(chown_tree, app_dir.parent, uid)
            prefix = [*_SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--"]
            if self.isolation == "namespaces":
                prefix = [*_UNSHARE, "sh", "-c", _BIND_APP, "flynnp2p-mount", str(app_dir), *prefix]
                home = APP_MOUNT
        env = {
            **_job_env(spec),
            "HOME": str(home),
            # An isolated job cannot use the agent's private directories (a
            # pyenv under /root, say): it gets the system's PATH.
            "PATH": _DEFAULT_PATH if self.isolation != "none" else os.environ.get("PATH", _DEFAULT_PATH),
        }
        argv = [*prefix, "bash", "-c", _LAUNCHER, "flynnp2p-job", spec.command]
        env_fd = None
        if self.isolation != "none":
            env_fd = job_env_fd(env)
            argv = [*prefix, "bash", "-c", _ENV_LAUNCHER, "flynnp2p-job", spec.command, str(env_fd)]
            env = {"PATH": HOST_PATH}
        try:
            process = await self._spawner.spawn(
                argv,
                cwd=app_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_preexec(spec, group),
                pass_fds=() if env_fd is None else (env_fd,),
            )
        finally:
            if env_fd is not None:
                os.close(env_fd)
        return app_dir, process

    async def _spawn_in_image(
        self, spec: JobSpec, root: ImageRoot, group: JobGroup | None
    ) -> tuple[Path, Child]:
        """A job of an image archive: its argv chrooted into the image (``host.chroot``)."""
        if self.isolation != "namespaces":
            raise UserError(
                f"job {spec.job_id}: running an image archive needs the agent to run as root "
                f"where mount namespaces are allowed (this host: isolation {self.isolation!r})"
            )
        if not _JOB_ID.match(spec.job_id):
            raise UserError(f"job id {spec.job_id!r} is not valid; expected [A-Za-z0-9][A-Za-z0-9_.-]*")
        job_dir = self.root_dir / "jobs" / spec.job_id
        env = {"PATH": _IMAGE_PATH, "HOME": "/", **root.config.env_map(), **_job_env(spec)}
        env_file = job_dir / "env.json"
        await trio.to_thread.run_sync(write_env_file, env_file, env)
        argv = list(root.config.argv) if not spec.command else ["/bin/sh", "-c", spec.command]
        process = await self._spawner.spawn(
            enter_argv(
                _UNSHARE, root.path, app_uid(spec.app_id), env_file, root.config.workdir, argv
            ),
            cwd=job_dir,
            env={"PATH": HOST_PATH},  # the job's env reaches only the job (host.chroot)
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_preexec(spec, group),
        )
        return job_dir / "app", process

    async def stop(self, job_id: str, grace_s: float = 10.0) -> None:
        """SIGTERM the job's group, SIGKILL it after ``grace_s``; return once reaped.

        After the SIGKILL the wait is bounded: the supervisor drains for at most
        ``_DRAIN_S``."""
        job = self._job(job_id)

        async def send(sig: int) -> None:
            _killpg(job.process.pid, sig)

        await stop_within(job, grace_s, send, _signal.SIGTERM)

    def signal(self, job_id: str, sig: int) -> None:
        """Send ``sig`` to the job's whole process group (no-op once it has exited)."""
        job = self._job(job_id)
        if not job.exited.is_set():
            _killpg(job.process.pid, sig)

    async def wait(self, job_id: str) -> int:
        job = self._job(job_id)
        await job.exited.wait()
        assert job.status is not None
        return job.status

    def forget(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or not job.exited.is_set():
            return
        del self._jobs[job_id]
        if job.running.app_dir is not None:
            shutil.rmtree(job.running.app_dir.parent, ignore_errors=True)

    def logs(self, job_id: str) -> list[LogLine]:
        return self._job(job_id).ring.lines()

    def exit_reason(self, job_id: str) -> str | None:
        """Why the job's last run ended when its status does not say (out of memory)."""
        return self._job(job_id).exit_reason

    # -- internals ----------------------------------------------------------------

    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"no job {job_id!r} on this host") from None

    async def _supervise(self, job: _Job, *, task_status: trio.TaskStatus[None]) -> None:
        proc = job.process
        try:
            async with trio.open_nursery() as readers:
                assert proc.stdout is not None and proc.stderr is not None
                readers.start_soon(self._pump, job, proc.stdout, "stdout")
                readers.start_soon(self._pump, job, proc.stderr, "stderr")
                task_status.started()
                await proc.wait()
                if job.stop_deadline is not None:
                    # Children got the same SIGTERM; give them what is left of the grace.
                    with trio.move_on_at(job.stop_deadline):
                        await _wait_group_empty(proc.pid)
                _killpg(proc.pid, _signal.SIGKILL)  # leftovers of a finished main process
                readers.cancel_scope.deadline = trio.current_time() + _DRAIN_S
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:  # we were cancelled: the backend is shutting down
                    _killpg(proc.pid, _signal.SIGTERM)
                    with trio.move_on_after(self._shutdown_grace_s):
                        await proc.wait()
                    _killpg(proc.pid, _signal.SIGKILL)
                    with trio.move_on_after(_REAP_S):
                        await proc.wait()
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        await stream.aclose()
                if job.group is not None:
                    await self._end_group(job, job.group)
            job.status = proc.returncode
            self._pidfile(job.spec.job_id).unlink(missing_ok=True)
            job.exited.set()

    async def _end_group(self, job: _Job, group: JobGroup) -> None:
        """After the job is reaped: tell an OOM kill, then remove its memory group."""
        if await trio.to_thread.run_sync(group.oom_kills_sync):
            job.exit_reason = oom_message(group.limit_bytes)
            line = LogLine(self._clock_ms(), "stderr", f"flynnp2p: {job.exit_reason}")
            job.ring.append(line)
            if self._on_lines is not None:
                self._on_lines(job.spec, [line])
            app_log = self._app_logs.of(job.spec.app_name)
            try:
                await trio.to_thread.run_sync(app_log.append_lines, job.spec.job_id, [line])
            except OSError:
                job.log_write_errors += 1
        if not await trio.to_thread.run_sync(group.remove_sync):
            log.warning("job %s: its memory cgroup %s could not be removed", job.spec.job_id, group.path)

    async def _pump(self, job: _Job, stream: trio.abc.ReceiveStream, name: Stream) -> None:
        app_log = self._app_logs.of(job.spec.app_name)
        async for parts in line_batches(stream):
            now = self._clock_ms()
            lines = [LogLine(now, name, p.decode("utf-8", "replace")) for p in parts]
            for line in lines:
                job.ring.append(line)
            if self._on_lines is not None:
                self._on_lines(job.spec, lines)
            try:
                await trio.to_thread.run_sync(app_log.append_lines, job.spec.job_id, lines)
            except OSError:
                # A full or broken disk must not kill the job; the ring still has them.
                job.log_write_errors += 1


def _preexec(spec: JobSpec, group: JobGroup | None) -> Callable[[], None]:
    """The child's set-up before exec: into its memory group when it has one, else
    the address-space limit (see the module docstring)."""
    if group is None:
        return child_preexec(spec.memory_mb * 1024 * 1024 if spec.memory_mb > 0 else None)
    base = child_preexec(None)

    def preexec() -> None:
        group.join()  # as root still: the uid switch comes later, in the exec chain
        base()

    return preexec


@contextlib.asynccontextmanager
async def open_process_backend(
    root_dir: Path, *, shutdown_grace_s: float = 10.0, on_lines: LineSink | None = None
) -> AsyncIterator[ProcessBackend]:
    """Run a ``ProcessBackend`` for the duration of the block; leaving stops all jobs."""
    backend = ProcessBackend(root_dir, shutdown_grace_s=shutdown_grace_s, on_lines=on_lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        yield backend
        nursery.cancel_scope.cancel()
