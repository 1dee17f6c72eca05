"""The agent's supervised children (serf, etcd): finding their binary, spawning
them with their output in a log file and their pid in a pid file, killing one a
killed agent left behind, and stopping one bounded (signal, grace, SIGKILL).

Children are started through trio (a thread spawns them), so the kernel's
parent-death signal cannot tie them to the agent; the pid file is what lets the
next agent run (or the test harness) find a leftover.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

from flynnp2p.errors import ConfigError

log = logging.getLogger(__name__)


def find_binary(binary: str, what: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise ConfigError(
            f"the {what} binary '{binary}' was not found on PATH: install {what} "
            f"(Debian/Ubuntu: apt-get install {package})"
        )
    return path


def kill_stale(pid_path: Path, name: bytes, marker: Path) -> None:
    """Kill the process in ``pid_path`` if it is still ``name`` run with ``marker``
    (its config or data dir) on its command line: left over from a killed agent."""
    try:
        pid = int(pid_path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if name in cmdline and str(marker).encode() in cmdline:
        log.warning("stopping %s (pid %d) left over from an earlier agent", name.decode(), pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return


async def spawn(args: Sequence[str], log_path: Path, pid_path: Path) -> trio.Process:
    # Opening a local log file for append does not block in any way that matters.
    logf = open(log_path, "ab")  # noqa: SIM115, ASYNC230 - closed below, handed to the child
    try:
        proc = await trio.lowlevel.open_process(
            list(args), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf
        )
    finally:
        logf.close()
    _write_pid(pid_path, proc.pid)
    return proc


def _write_pid(pid_path: Path, pid: int) -> None:
    try:
        pid_path.write_text(str(pid))
    except OSError as exc:  # a full disk: only a leftover's cleanup needs it
        log.warning("cannot write %s: %s", pid_path, exc.strerror or exc)


def _forget_pid(pid_path: Path, pid: int) -> None:
    try:
        if pid_path.read_text().strip() == str(pid):
            pid_path.unlink()
    except OSError:
        pass


async def stop(proc: trio.Process, sig: int, grace_s: float, pid_path: Path) -> None:
    """Signal, wait up to ``grace_s``, SIGKILL; then forget the pid file (the caller
    shields this when it runs on cancellation)."""
    if proc.returncode is None:
        proc.send_signal(sig)
        with trio.move_on_after(grace_s):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    _forget_pid(pid_path, proc.pid)
