"""The build sandbox: buildpack programs run at ``/app``, as the build's own uid, bounded.

Theory of operation
-------------------
A slug runs at ``/app`` (the process backend bind-mounts each job's copy there),
and what a build makes often records absolute paths (a virtualenv's scripts name
``/app/.venv/bin/python``), so the build runs at ``/app`` too. `open_sandbox`
lays out one directory per build on the host::

    <root>/app                  the build tree              -> /app (BUILD_DIR)
    <root>/tmp                  the build's own /tmp        -> /tmp
    <root>/tmp/cache            the app's build cache       -> /tmp/cache (CACHE_DIR, bind-mounted)
    <root>/tmp/env              one file per env var        -> /tmp/env (ENV_DIR)
    <root>/tmp/buildpacks/NN-x  a copy of each buildpack    -> /tmp/buildpacks/NN-x
    <root>/tmp/tools            programs lent to buildpacks -> /tmp/tools (first on PATH)

The build's uid owns the build tree and the cache; the rest is root's (when the
agent is root), and the build's /tmp is sticky (1777), as /tmp is: the build
can add files there but cannot move the mount points or the buildpacks that
the next run mounts and runs as root.

`Sandbox.run` starts one program in it. What it gets depends on the host's
isolation (``host.process.detect_isolation``, the same probe the process backend
uses):

* "namespaces" (root, and the kernel allows): new mount, UTS and PID namespaces
  (``unshare --fork --kill-child --mount-proc``); the mounts above; then
  ``setpriv`` to the build's uid/gid with no groups and no capabilities. Unlike a
  job, a build gets a PID namespace: nothing it starts can outlive it, because
  when its first process (PID 1 there) dies the kernel kills the rest, and
  ``--kill-child`` makes that happen when we SIGKILL ``unshare``. (A job goes
  without one so that it can be stopped gracefully; a build is only ever killed.)
* "user" (root without namespaces): only the uid switch; the programs see the host
  paths, which must then be traversable by that uid, and absolute paths in the
  slug will not be ``/app``.
* "none" (not root): the programs run as the agent's user at the host paths.

The build's memory limit is a memory cgroup where the host has a usable
controller (``host.cgroup``; one group for the sandbox, made when it opens and
removed with it, joined by every program between fork and exec, so a program and
everything it starts count together). A program the kernel's OOM killer hit
gets a last line saying so (``host.cgroup.oom_message``: "out of memory", which
the builder's `out_of_memory` recognises) and ``RunResult.oom_killed``. Without a
controller, every program gets ``RLIMIT_AS`` (address space: a Node.js build
needs a larger limit then). Every program dies with the agent
(parent-death signal: it is forked by a ``host.spawn.Spawner`` that lives as long
as the sandbox), runs in its own session and is SIGKILLed, with its whole group,
when the caller is cancelled (the build's wall-clock limit is a cancel scope
around the whole build). Its environment is only what the caller passes plus
``PATH``, ``HOME`` and ``TMPDIR``: no variable of the agent leaks in.

Output is read line by line (lines over 64 KiB are split) and handed to an async
``on_line`` callback, so a slow consumer slows the buildpack down through the
pipe instead of growing a buffer; the last lines are also kept for error messages.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from flynnp2p.errors import FlynnError
from flynnp2p.host.cgroup import JobGroup, build_group_sync, find_controller, oom_message
from flynnp2p.host.process import APP_MOUNT
from flynnp2p.host.spawn import Spawner, child_preexec, chown_tree, line_batches

LineCallback = Callable[[str], Awaitable[None]]

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
_TAIL_LINES = 40
_DRAIN_S = 2.0  # after the program is gone, how long readers may finish the pipes
_REAP_S = 5.0
_MAX_CAPTURE = 1024 * 1024  # bytes of captured stdout (bin/detect, bin/release)

_UNSHARE = [
    "unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc",
    "--propagation", "private", "--",
]  # fmt: skip
# As root in the new mount namespace: the mounts, then the uid switch. The host's
# paths may be under /tmp themselves, so the cache goes onto its mount point in the
# sandbox's tmp first, and that tmp (with it: --rbind) onto /tmp last.
_MOUNTS = (
    'mount --bind "$3" "$2/cache" && mount --bind "$1" /app && mount --rbind "$2" /tmp '
    '&& cd /app || { echo "$0: the sandbox could not be set up" >&2; exit 125; }; '
    'shift 3 && exec "$@"'
)
_SETUP_FAILED = 125
_MERGE_STDERR = 'exec 2>&1; exec "$@"'


class SandboxError(FlynnError):
    """This host could not set the sandbox up (mounts, uid switch): not the app's fault."""

    code = "sandbox"


@dataclass(frozen=True, slots=True)
class BuildLimits:
    """Per-app build limits (defaults as on the issue: 1 GiB, 15 minutes)."""

    memory_mb: int = 1024  # the build's memory cgroup, else RLIMIT_AS per program; 0: none
    timeout_s: float = 900.0  # wall clock for the whole build


@dataclass(frozen=True, slots=True)
class RunResult:
    status: int  # exit code, or -signal
    stdout: str  # captured stdout (``capture_stdout=True``), else ""
    tail: tuple[str, ...]  # the last lines of streamed output
    oom_killed: bool = False  # the kernel's OOM killer hit it (or what it started)


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class Sandbox:
    """One build's directory and the way to run programs in it (see the module doc)."""

    def __init__(
        self, root: Path, *, isolation: str, uid: int, cache_dir: Path, memory_mb: int
    ) -> None:
        self.root = root
        self.isolation = isolation
        self.uid = uid
        self.cache_dir = cache_dir
        self.memory_mb = memory_mb
        self.app = root / "app"
        self.tmp = root / "tmp"
        self.env_dir = self.tmp / "env"
        self.buildpacks_dir = self.tmp / "buildpacks"
        self.tools_dir = self.tmp / "tools"
        self._spawner = Spawner()
        self.group: JobGroup | None = None  # the memory cgroup, when the host has one

    def _open_group_sync(self, cgroups: bool) -> None:
        if not cgroups or self.memory_mb <= 0:
            return
        found = find_controller()
        if isinstance(found, str):
            return  # RLIMIT_AS; the process backend's log has said why, once
        self.group = build_group_sync(found, self.root.name, self.memory_mb * 1024 * 1024)

    # -- paths as the programs see them ----------------------------------------------

    def inside(self, host_path: Path) -> str:
        """``host_path`` (under the sandbox or the cache) as a program in it sees it."""
        if self.isolation != "namespaces":
            return str(host_path)
        for host, seen in (
            (self.cache_dir, Path("/tmp/cache")),
            (self.app, APP_MOUNT),
            (self.tmp, Path("/tmp")),
        ):
            if host_path == host or host_path.is_relative_to(host):
                return str(seen / host_path.relative_to(host))
        raise ValueError(f"{host_path} is not inside the sandbox")

    # -- set-up ------------------------------------------------------------------------

    def _create_sync(self) -> None:
        for d in (
            self.app,
            self.tmp,
            self.tmp / "cache",
            self.env_dir,
            self.buildpacks_dir,
            self.tools_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.tmp, 0o1777)
        if self.isolation == "user":  # the build's uid must reach the host paths
            os.chmod(self.root, 0o755)  # (with namespaces it sees only the mounts: 0700)

    def hand_over_sync(self) -> None:
        """Give the build tree and the cache to the build's uid (blocking)."""
        if self.isolation != "none":
            chown_tree(self.app, self.uid)
            chown_tree(self.cache_dir, self.uid)

    def add_tool_sync(self, program: Path) -> None:
        """Make ``program`` callable by name in the sandbox (first on its PATH).

        The file stays the agent's (the build cannot write it): a hard link
        when it can be (no copy of a big binary per build), else a copy."""
        dest = self.tools_dir / program.name
        try:
            os.link(program, dest)
        except OSError:
            shutil.copy2(program, dest)

    def write_env_sync(self, env: Mapping[str, str]) -> None:
        for key, value in env.items():
            (self.env_dir / key).write_text(value)

    # -- running -----------------------------------------------------------------------

    def _argv(self, argv: Sequence[str], merge_stderr: bool) -> list[str]:
        inner = ["sh", "-c", _MERGE_STDERR, "flynnp2p-build", *argv] if merge_stderr else list(argv)
        if self.isolation == "none":
            return inner
        setpriv = [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
            "--inh-caps=-all", "--pdeathsig=KILL", "--",
        ]  # fmt: skip
        if self.isolation == "user":
            return [*setpriv, *inner]
        mounts = [str(self.app), str(self.tmp), str(self.cache_dir)]
        return [*_UNSHARE, "sh", "-c", _MOUNTS, "flynnp2p-build", *mounts, *setpriv, *inner]

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        on_line: LineCallback,
        capture_stdout: bool = False,
        merge_stderr: bool = False,
    ) -> RunResult:
        """Run ``argv`` (paths as seen inside) to its end; SIGKILLed if cancelled."""
        full_env = {
            **env,
            "PATH": f"{self.inside(self.tools_dir)}:{SYSTEM_PATH}",
            "HOME": self.inside(self.app),
            "TMPDIR": self.inside(self.tmp),
        }
        oom_before = 0
        if self.group is not None:
            oom_before = await trio.to_thread.run_sync(self.group.oom_kills_sync)
        child = await self._spawner.spawn(
            self._argv(argv, merge_stderr),
            cwd=self.app,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=self._preexec(),
        )
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        captured: list[str] = []
        size = 0

        async def stream(line: str) -> None:
            tail.append(line)
            await on_line(line)

        async def capture(line: str) -> None:
            nonlocal size
            size += len(line) + 1
            if size <= _MAX_CAPTURE:
                captured.append(line)

        try:
            async with trio.open_nursery() as readers:
                readers.start_soon(_pump, child.stdout, capture if capture_stdout else stream)
                readers.start_soon(_pump, child.stderr, stream)
                await child.wait()
                _killpg(child.pid)  # leftovers (without a PID namespace)
                readers.cancel_scope.deadline = trio.current_time() + _DRAIN_S
        finally:
            with trio.CancelScope(shield=True):
                if child.returncode is None:
                    _killpg(child.pid)
                    with trio.move_on_after(_REAP_S):
                        await child.wait()
                for s in (child.stdout, child.stderr):
                    await s.aclose()
        oom_killed = False
        if self.group is not None:
            oom_killed = await trio.to_thread.run_sync(self.group.oom_kills_sync) > oom_before
        if oom_killed:
            await stream(f"flynnp2p: {oom_message(self.memory_mb * 1024 * 1024)}")
        if child.returncode == _SETUP_FAILED and tail and tail[-1].endswith("could not be set up"):
            raise SandboxError("the build sandbox could not be set up: " + " / ".join(tail))
        if size > _MAX_CAPTURE:
            captured.append("[output truncated]")
        assert child.returncode is not None
        return RunResult(child.returncode, "\n".join(captured), tuple(tail), oom_killed)

    def _preexec(self) -> Callable[[], None]:
        group = self.group
        if group is None:
            return child_preexec(self.memory_mb * 1024 * 1024 if self.memory_mb > 0 else None)
        base = child_preexec(None)

        def preexec() -> None:
            group.join()  # as root still: setpriv comes later, in the exec chain
            base()

        return preexec


async def _pump(stream: trio.lowlevel.FdStream, sink: LineCallback) -> None:
    async for parts in line_batches(stream):
        for p in parts:
            await sink(p.decode("utf-8", "replace").rstrip("\r"))


@contextlib.asynccontextmanager
async def open_sandbox(
    work_dir: Path, *, isolation: str, uid: int, cache_dir: Path, memory_mb: int,
    cgroups: bool = True, remove: bool = True,
) -> AsyncIterator[Sandbox]:  # fmt: skip
    """A fresh sandbox under ``work_dir`` for the block; leaving stops what runs in it
    and removes it, or with ``remove=False`` leaves its directory (``box.root``, under
    ``work_dir``) for the caller to remove, e.g. while it waits on something else:
    nothing runs in it any more, and the next sandbox is another directory.

    ``cgroups=False`` keeps to ``RLIMIT_AS`` even where a memory cgroup is usable."""
    await trio.to_thread.run_sync(lambda: work_dir.mkdir(parents=True, exist_ok=True))
    root = Path(
        await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="build-", dir=work_dir))
    )
    box = Sandbox(root, isolation=isolation, uid=uid, cache_dir=cache_dir, memory_mb=memory_mb)
    try:
        await trio.to_thread.run_sync(box._create_sync)
        await trio.to_thread.run_sync(box._open_group_sync, cgroups)
        box._spawner.start()
        yield box
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(box._spawner.close)
            if box.group is not None:
                await trio.to_thread.run_sync(box.group.remove_sync)
            if remove:
                await trio.to_thread.run_sync(shutil.rmtree, root, True)
