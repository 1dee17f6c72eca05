"""Full disks for real: a small tmpfs (root only: mounting needs it) and a file that
fills it. One home for the three tests that need one (`test_disk_full`,
`test_cluster_disk`, `test_cluster_build_disk`)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(
    where: Path, size: str, mode: str = "0755", before_unmount: Callable[[], None] | None = None
) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (made), unmounted at the end even if the
    test fails; `before_unmount` first (kill the agents using it, or it is busy).
    Skips the test when not root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    opts = f"size={size},mode={mode}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        if before_unmount is not None:
            before_unmount()
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Write a file until the disk has no free page left, then give `leave` bytes back."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler
