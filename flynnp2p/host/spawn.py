"""Job processes that die with the agent: one long-lived spawning thread, and pidfd waits.

Theory of operation
-------------------
A job runs in its own session, so a SIGKILLed agent's process-group kill does not
reach it. Linux's parent-death signal does: the child asks (``prctl
PR_SET_PDEATHSIG``, or ``setpriv --pdeathsig`` after a credential change, which
clears it) to be SIGKILLed when its parent dies. "Parent" means the *thread* that
forked it, and trio forks from its worker threads, which exit after being idle
for a while; so every job is forked by its backend's `Spawner`, one thread that
lives as long as the backend runs. The job's own children are not covered (they are killed with
its group on a normal stop, and by ``recover()`` after a crash).

`Child` is the trio side of a `subprocess.Popen`: its pipes as trio streams and
``wait()`` on a pidfd (no thread parked per job). `line_batches` reads a child's
output as lines (jobs' and builds' alike), and `chown_tree` gives a working tree
to the uid a job or build runs as.
"""

from __future__ import annotations

import ctypes
import os
import queue
import resource
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

READ_CHUNK = 65536
MAX_LINE = 64 * 1024  # longer lines are split, so one child cannot grow a buffer forever


async def line_batches(stream: trio.abc.ReceiveStream) -> AsyncIterator[list[bytes]]:
    """The lines `stream` sends (without their newline), a batch per read, until it
    ends; a last line without a newline is a line too, and so is each MAX_LINE piece
    of a longer one."""
    buf = b""
    while True:
        chunk = await stream.receive_some(READ_CHUNK)
        buf += chunk
        parts = []
        *lines, buf = buf.split(b"\n")
        for line in lines:  # a line may have grown past MAX_LINE within one read
            while len(line) > MAX_LINE:
                parts.append(line[:MAX_LINE])
                line = line[MAX_LINE:]
            parts.append(line)
        while len(buf) >= MAX_LINE:
            parts.append(buf[:MAX_LINE])
            buf = buf[MAX_LINE:]
        if not chunk and buf:
            parts.append(buf)
            buf = b""
        if parts:
            yield parts
        if not chunk:
            return


def child_preexec(limit_bytes: int | None) -> Callable[[], None]:
    """In the child (jobs and builds alike): die with the agent (see the module
    docstring), and the address-space limit when there is one."""

    def preexec() -> None:
        set_pdeathsig()
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return preexec


def chown_tree(root: Path, uid: int) -> None:
    """`root` and everything below it owned by `uid` (symlinks themselves, not their targets)."""
    os.chown(root, uid, uid, follow_symlinks=False)
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(base, name), uid, uid, follow_symlinks=False)

PR_SET_PDEATHSIG = 1
_libc: Any = None


def set_pdeathsig() -> None:
    """In the child before exec: SIGKILL me when the thread that forked me ends."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Child:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        assert popen.stdout is not None and popen.stderr is not None
        self.stdout = trio.lowlevel.FdStream(os.dup(popen.stdout.fileno()))
        self.stderr = trio.lowlevel.FdStream(os.dup(popen.stderr.fileno()))
        popen.stdout.close()
        popen.stderr.close()
        self._pidfd = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """Its exit status (``-signal`` when a signal ended it), once it is reaped."""
        while self._popen.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            self._popen.poll()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        return self._popen.returncode


class Spawner:
    """Forks from one thread that lives as long as its owner (see the module doc).

    The owner (``ProcessBackend.run``) calls `start` first and `close` last, once
    every job this spawner forked has been reaped: the thread's end SIGKILLs any
    that is left.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="flynnp2p-spawner")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (blocking: call it through ``trio.to_thread``)."""
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join()

    def _loop(self) -> None:
        while (request := self._requests.get()) is not None:
            request()

    async def spawn(self, argv: list[str], **popen_kwargs: Any) -> Child:
        if not self._thread.is_alive():
            raise RuntimeError("Spawner.spawn called before start() or after close()")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: dict[str, Any] = {}

        def request() -> None:
            try:
                box["popen"] = subprocess.Popen(argv, **popen_kwargs)
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                box["error"] = exc  # raised in the caller
            token.run_sync_soon(done.set)  # the caller waits shielded: its run is still on

        self._requests.put(request)
        with trio.CancelScope(shield=True):  # a process made must reach a supervisor
            await done.wait()
        if "error" in box:
            raise box["error"]
        return Child(box["popen"])
