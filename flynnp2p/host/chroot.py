"""How a process-backend job enters an image's root filesystem, and the helper that does it.

Theory of operation
-------------------
A job of an image archive runs in the image's unpacked root filesystem
(`flynnp2p.host.rootfs`), shared read-only by every job of that image on the host.
The process backend spawns `enter_argv`: in new mount and UTS namespaces (as every
isolated job), as root, a shell makes the job's view with mounts that only its
namespace sees:

* the root filesystem bound on itself and made read-only (jobs cannot change the
  image under each other);
* a fresh tmpfs on ``/tmp`` (mode 1777) and on ``/dev`` with ``null``, ``zero``,
  ``full``, ``random``, ``urandom`` and ``tty`` bound in from the host (no other
  device), and ``/proc``;

then it execs this file, as a script, with the agent's own Python in isolated
mode (``-I``: no ``PYTHON*`` variables, no user site), which chroots into the root,
drops to the app's uid and gid with no supplementary groups (a uid change from
root clears every capability), sets ``no_new_privs`` and the parent-death signal
(a uid change clears that, see `flynnp2p.host.spawn`), changes to the image's
``WORKDIR`` and execs the image's argv with the job's env, looking the program up
on that env's ``PATH`` inside the root.

The job's env is not the env of the processes that do this: they run as root
outside the root filesystem, where an image's ``LD_PRELOAD`` or ``BASH_ENV`` would
run code of the image as root on the host. They get a fixed ``PATH`` only; the
job's env is a JSON file in the job's directory (mode 0600), read by the helper.

This file imports only the standard library: it runs before anything else of
flynnp2p would be importable in the job's world.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
EXIT_CANNOT_RUN = 126  # as shells say "found but cannot run"
EXIT_NOT_FOUND = 127

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38

# In the job's mount namespace, as root: $1 the root filesystem, then the helper's argv.
_MOUNTS = (
    'set -e; r="$1"; shift; '
    'mount --bind "$r" "$r"; mount -o remount,bind,ro "$r"; '
    'mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$r/tmp"; '
    'mount -t tmpfs -o mode=755,nosuid tmpfs "$r/dev"; '
    f'for d in {" ".join(DEVICES)}; do : > "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"; done; '
    'mount -t proc -o nosuid,nodev,noexec proc "$r/proc"; '
    'exec "$@"'
)


def enter_argv(
    unshare: Sequence[str],
    rootfs: Path,
    uid: int,
    env_file: Path,
    workdir: str,
    argv: Sequence[str],
) -> list[str]:
    """The command that runs `argv` in `rootfs` (see the module docstring)."""
    helper = [sys.executable, "-I", str(Path(__file__).resolve())]
    return [
        *unshare, "sh", "-c", _MOUNTS, "flynnp2p-image", str(rootfs),
        *helper, str(rootfs), str(uid), str(env_file), workdir, "--", *argv,
    ]  # fmt: skip


def write_env_file(path: Path, env: Mapping[str, str]) -> None:
    """The job's env where only root reads it (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(env), f)


def _fail(code: int, message: str) -> None:
    sys.stderr.write(f"flynnp2p: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def main(args: list[str]) -> None:
    """``ROOTFS UID ENV_FILE WORKDIR -- ARGV...``: enter the root and exec (never returns)."""
    try:
        root, uid_text, env_file, workdir, dashes, *argv = args
        uid = int(uid_text)
    except ValueError:
        _fail(2, "usage: chroot.py ROOTFS UID ENV_FILE WORKDIR -- ARGV...")
        return
    if dashes != "--" or not argv:
        _fail(2, "usage: chroot.py ROOTFS UID ENV_FILE WORKDIR -- ARGV...")
    with open(env_file, encoding="utf-8") as f:
        env = json.load(f)
    libc = ctypes.CDLL(None, use_errno=True)
    os.chroot(root)
    os.chdir("/")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if (
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        or libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0
    ):
        _fail(EXIT_CANNOT_RUN, "cannot set no_new_privs and the parent-death signal")
    try:
        os.chdir(workdir)
    except OSError as exc:
        _fail(EXIT_CANNOT_RUN, f"the image's WORKDIR {workdir} is not usable: {exc.strerror}")
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        _fail(EXIT_NOT_FOUND, f"{argv[0]}: not found in the image (PATH={env.get('PATH', '')})")
    except OSError as exc:
        _fail(EXIT_CANNOT_RUN, f"{argv[0]}: cannot run: {exc.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
