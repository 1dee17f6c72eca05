"""Each host removes the unpacked slugs and images nothing will start from again.

Theory of operation
-------------------
A host unpacks a slug once per digest (`flynnp2p.host.slug`: ``<jobs>/slugs/<digest>``,
13 MB for the Python example) and starts every job of it from a copy; the node
that built a slug also takes the build's tree in as the slug and makes the first
job's copy ahead (``spare``). A process host unpacks an image archive
(``deploy --image-tar``) once per digest too (`flynnp2p.host.rootfs`:
``<jobs>/images/<digest>``, the whole root filesystem). Nothing removed them:
every push left one more slug on the building node and on each host that ran
its jobs, and every image deploy one more root filesystem. The same rules apply
to both directories.

`SlugSweeper` removes, every ``period_s`` (and once at start), what `wanted`
does not name:

* kept: the slugs of each app's newest ``keep`` releases (the running one and
  what a rollback would start), of its formation's release (a rollback to an
  older one), and of every release a placement or job on this host names (a
  crashed job restarts from its slug; a one-off of an old release);
* also kept: a slug being unpacked or taken in right now, and any entry younger
  than ``grace_s`` (a slug unpacked for a release that has not reached this
  replica yet);
* removed: the rest, and the temporary siblings (``.<digest>.<random>``) an agent
  killed mid-unpack left, once older than ``grace_s`` and not of an unpack under
  way (a half-made spare copy inside a slug's directory goes with the slug).

A job placed on a removed slug's release later only unpacks it again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import trio

from flynnp2p.state.merge import State
from flynnp2p.state.records import App, Artifact, Formation, Job, Placement, Release
from flynnp2p.state.replica import Readable

log = logging.getLogger(__name__)

KEEP_RELEASES = 3  # per app: the running release and two to roll back to
PERIOD_S = 300.0
GRACE_S = 600.0


def wanted(state: State, node: str, keep: int = KEEP_RELEASES) -> set[str]:
    """The digests of the slugs `node` keeps unpacked (see the module docstring)."""
    releases: set[str] = set()
    by_app: dict[str, list[Release]] = {}
    for r in state.records(Release):
        by_app.setdefault(r.app_id, []).append(r)
    for app in state.records(App):
        newest = sorted(by_app.get(app.id, []), key=lambda r: (r.version, r.created_at), reverse=True)
        releases.update(r.id for r in newest[:keep])
        formation = state.record(Formation, app.id)
        if formation is not None:
            releases.add(formation.release_id)
    for p in state.records(Placement):
        if p.host == node:
            releases.add(p.release_id)
    for j in state.records(Job):
        if j.host == node:
            releases.add(j.release_id)
    digests = set()
    for release_id in releases:
        release = state.record(Release, release_id)
        for artifact_id in release.artifacts[:1] if release is not None else ():
            artifact = state.record(Artifact, artifact_id)
            if artifact is not None and artifact.digest:  # a slug, or an image archive
                digests.add(artifact.digest)
    return digests


def unwanted(slugs_dir: Path, keep: Collection[str], busy: Collection[str], before: float) -> list[Path]:
    """The entries of `slugs_dir` to remove (blocking): not kept, not busy, and last
    changed before `before` (temporary siblings: only that)."""
    try:
        entries = list(os.scandir(slugs_dir))
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        name = entry.name
        if name.startswith("."):  # ".<digest>.<random>": an unpack's own, while it runs
            if _of(name) in busy:
                continue
        elif name in keep or name in busy:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= before:
                continue
        except OSError:
            continue
        out.append(Path(entry.path))
    return sorted(out)


def _of(name: str) -> str:
    """The digest a temporary sibling ``.<digest>.<random>`` is being made for."""
    return name[1:].rpartition(".")[0]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class SlugSweeper:
    def __init__(
        self,
        state: Readable,
        node: str,
        dirs: Sequence[Path],
        busy: Callable[[], Collection[str]],
        *,
        period_s: float = PERIOD_S,
        grace_s: float = GRACE_S,
        keep: int = KEEP_RELEASES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.node = node
        self.dirs = list(dirs)  # <jobs>/slugs and <jobs>/images
        self.busy = busy
        self.period_s = period_s
        self.grace_s = grace_s
        self.keep = keep
        self.clock = clock
        self.stats = {"sweeps": 0, "removed": 0}

    async def sweep(self) -> list[str]:
        """Remove what is not wanted now; the names removed."""
        keep = wanted(self.state.state, self.node, self.keep)
        doomed: list[Path] = []
        for d in self.dirs:
            doomed += await trio.to_thread.run_sync(
                unwanted, d, keep, set(self.busy()), self.clock() - self.grace_s
            )
        removed = []
        for path in doomed:
            if path.name in self.busy() or _of(path.name) in self.busy():
                continue  # began unpacking meanwhile
            await trio.to_thread.run_sync(_remove, path)
            removed.append(path.name)
            log.info("removed unpacked %s %s: no release here or a rollback would start it",
                     path.parent.name.rstrip("s"), path.name)  # fmt: skip
        self.stats["sweeps"] += 1
        self.stats["removed"] += len(removed)
        return removed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.sweep()
            except OSError as exc:  # a disk that fails: the next sweep tries again
                log.warning("unpacked slugs not swept: %s", exc)
            await trio.sleep(self.period_s)
