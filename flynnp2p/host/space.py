"""Room on a node's disk: what a big write checks before it starts, and how a
full disk is said.

Theory of operation
-------------------
A node's data dir holds its replicated state (SQLite), its blobs, its jobs'
directories and logs, its builds and their caches, and unpacked images. Most
writes there are small and must not fail: a state commit that fails for want of
space makes the node degraded (`flynnp2p.state.service`). A few writes are big
and can wait or be skipped: packing a build cache, unpacking an image. Those
check first (`room_for`) that what they will write still leaves
``RESERVE_BYTES`` free, and refuse at once, saying how much they needed and how
much there was, rather than fill the disk and make every other write on the
node fail until they clean up. The check is a hint, not a reservation: another
writer can take the space meanwhile, so every such write also handles ENOSPC
itself (`is_full`), removes what it half-wrote, and says so with `no_space`.

Every message a full disk gives a user starts "no space left on <node>", so
that a push, a deploy or a job's reason names the node whose disk to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

from flynnp2p.errors import FULL_ERRNOS

RESERVE_BYTES = 64 << 20  # kept free for the state, logs and slugs by the big writes


def is_full(exc: BaseException) -> bool:
    """Whether `exc` is the OS saying the disk (or a quota) is full."""
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still write on the file system of `path`
    (the nearest existing parent of it; blocking)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def room_for(path: Path, needed: int, reserve: int | None = None) -> str | None:
    """None when `needed` bytes fit on the file system of `path` with `reserve`
    (``RESERVE_BYTES`` unless given) left over; else why not (blocking)."""
    reserve = RESERVE_BYTES if reserve is None else reserve
    free = free_bytes(path)
    if free - needed >= reserve:
        return None
    return f"{_mb(needed)} needed, {_mb(free)} free, {_mb(reserve)} kept free for the node's state"


def no_space(node: str, what: str, why: str) -> str:
    """The one way a full disk is said: ``no space left on <node>: <what> (<why>)``."""
    return f"no space left on {node}: {what} ({why})"
