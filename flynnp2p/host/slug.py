"""Slugs on disk: unpack once per digest, copy once per job.

A slug is a Heroku-format gzipped tar whose top directory is ``./app``. It is
unpacked into ``<root>/slugs/<digest>/`` (so the app is ``<root>/slugs/<digest>/app``)
exactly once: extraction goes to a temporary sibling directory that is renamed into
place, so a reader never sees a half-unpacked slug and two concurrent unpacks of one
digest leave one copy.

Every member is checked before it is written: no absolute paths, no ``..``
components, nothing outside ``app/``, no device files or FIFOs, and no symlink or
hardlink whose target leaves the slug. Extraction then also runs with tarfile's
``data`` filter as a second line of defence. Checking and extracting are one pass
over the tarball (it is decompressed once: a gzip stream cannot seek back without
decompressing again); a member that fails the check stops the pass, and the
temporary directory, with whatever of the slug it holds, is removed: nothing of an
unsafe slug is installed.

On the node that built a slug the build's own tree is the slug's content (the
slug is a tar of it, after the same checks), so it is moved into place instead
(`adopt_built`, a rename: unpacking the example's slug took 0.25-0.5 s on the path
of every git push), and made as an unpack would have made it: owned by the agent
(root), without the mode bits tarfile's ``data`` filter clears, and without what
tar would not have packed (a socket).

Each job gets a plain copy of the app under ``<root>/jobs/<job_id>/app``. Not
hardlinks: a job writing a file in place would otherwise change the shared slug
under every other job of the release. On the node that built the slug, one copy
is made ahead, while the release is made (`make_spare`: ``<root>/slugs/<digest>/spare``),
and the first job there takes it with a rename: the copy (393 files, 13 MB for
the Python example) took 0.3-0.45 s on the path of a git push, beside the slug's
replication and the release. A spare no job took stays with its slug.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import trio

from flynnp2p.errors import UserError

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class SlugError(UserError):
    """The slug tarball is malformed or unsafe; nothing of it was installed."""

    code = "bad_slug"


def _member_path(name: str) -> str:
    """The member's normalised relative path, or raise ``SlugError``."""
    if name.startswith("/"):
        raise SlugError(f"slug member {name!r} is an absolute path; members must be under ./app")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SlugError(f"slug member {name!r} contains '..'; members must be under ./app")
    if not parts or parts[0] != "app":
        raise SlugError(f"slug member {name!r} is outside ./app")
    return "/".join(parts)


def check_members(members: list[tarfile.TarInfo]) -> None:
    """Raise ``SlugError`` unless every member is a safe regular file, dir or link."""
    for m in members:
        path = _member_path(m.name)
        if m.isdev() or m.isfifo():
            raise SlugError(f"slug member {m.name!r} is a device or FIFO; not allowed")
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise SlugError(f"slug member {m.name!r} has an unsupported type")
        if m.issym():
            target = m.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise SlugError(f"slug symlink {m.name!r} -> {target!r} leaves the slug")
        elif m.islnk():
            _member_path(m.linkname)


READ_ERRORS = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error)
"""What reading a gzipped tar that is not whole or not a gzipped tar raises."""


@contextlib.contextmanager
def open_tar_stream(f: BinaryIO) -> Iterator[tarfile.TarFile]:
    """The gzipped tar in `f`, read in one pass (members in archive order, each member's
    data only while it is the current one). On a clean exit the rest of the gzip
    stream is read too, so a tarball cut short or with a bad checksum raises one of
    `READ_ERRORS` (tarfile's own ``"r|gz"`` takes a cut for the archive's end)."""
    with gzip.GzipFile(fileobj=f, mode="rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
        yield tar
        while gz.read(1 << 20):
            pass


def _checked(members: Iterable[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
    """The members in archive order, each checked (``check_members``) before it is
    handed on to be extracted."""
    for m in members:
        check_members([m])
        yield m


def _unpack_sync(tarball: Path, dest: Path) -> None:
    if dest.is_dir():
        return
    with _made_beside(dest) as tmp:
        try:
            with tarball.open("rb") as f, open_tar_stream(f) as tar:
                tar.extractall(tmp, members=_checked(tar), filter="data")
        except tarfile.FilterError as e:
            raise SlugError(f"unsafe slug: {e}") from e
        except READ_ERRORS as e:
            raise SlugError(f"slug is not a readable gzipped tar: {e}") from e
        if not (tmp / "app").is_dir():
            raise SlugError("slug has no ./app directory")
        move_into_place(tmp, dest)


@contextlib.contextmanager
def _made_beside(dest: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `dest` (``.<name>.<random>``) to fill and then
    `move_into_place`; removed if it is still there when the block ends."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


async def unpack_slug(tarball: Path, root: Path, digest: str) -> Path:
    """Unpack ``tarball`` once into ``root/slugs/<digest>``; return its ``app`` dir."""
    dest = _slug_dir(root, digest)
    await trio.to_thread.run_sync(_unpack_sync, tarball, dest)
    return dest / "app"


def _slug_dir(root: Path, digest: str) -> Path:
    if not _DIGEST.match(digest):
        raise SlugError(f"slug digest {digest!r} is not valid; expected [A-Za-z0-9_.:-]{{1,128}}")
    return root / "slugs" / digest


# What tarfile's ``data`` filter clears of a member's mode bits.
_CLEARED = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH


def _as_unpacked_sync(app: Path) -> None:
    """`app` (a build's tree) as `_unpack_sync` would leave its slug: every entry
    owned by this process (root: the build's uid wrote it), files with the modes the
    ``data`` filter gives them, directories 0755, and anything but files, directories
    and symlinks removed (tar skips those)."""
    uid, gid = os.geteuid(), os.getegid()
    for base, dirs, files in os.walk(app):
        for name in [*dirs, *files, None]:
            path = base if name is None else os.path.join(base, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if (st.st_uid, st.st_gid) != (uid, gid):
                    os.lchown(path, uid, gid)
                continue
            if stat.S_ISDIR(st.st_mode):
                mode = 0o755
            elif stat.S_ISREG(st.st_mode):
                mode = (stat.S_IMODE(st.st_mode) & ~_CLEARED) | stat.S_IRUSR | stat.S_IWUSR
                if not mode & stat.S_IXUSR:
                    mode &= ~(stat.S_IXGRP | stat.S_IXOTH)
            else:
                os.unlink(path)
                continue
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.chown(path, uid, gid, follow_symlinks=False)
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode, follow_symlinks=False)


def _adopt_sync(built: Path, dest: Path) -> bool:
    if dest.is_dir():
        return True
    with _made_beside(dest) as tmp:
        try:
            os.rename(built, tmp / "app")
        except OSError as e:
            if e.errno == errno.EXDEV:  # another filesystem: the caller unpacks
                return False
            raise
        _as_unpacked_sync(tmp / "app")
        move_into_place(tmp, dest)
        return True


async def adopt_built(built: Path, root: Path, digest: str) -> Path | None:
    """Move ``built`` (the tree a build packed into slug `digest`, nothing running
    in it any more) into place as that slug unpacked, ``root/slugs/<digest>``; its
    ``app`` dir. None when it cannot be moved there (another filesystem): the caller
    unpacks the tarball. A slug already there is kept (``built`` stays)."""
    dest = _slug_dir(root, digest)
    return dest / "app" if await trio.to_thread.run_sync(_adopt_sync, built, dest) else None


def _spare_of(slug_app: Path) -> Path:
    return slug_app.parent / "spare" / "app"


def _make_spare_sync(slug_app: Path) -> None:
    spare = _spare_of(slug_app).parent
    if spare.exists():
        return
    with _made_beside(spare) as tmp:
        shutil.copytree(slug_app, tmp / "app", symlinks=True)
        move_into_place(tmp, spare)


async def make_spare(slug_app: Path) -> None:
    """One job's copy of the unpacked slug `slug_app`, made ahead for
    `prepare_job_dir` to take (the first job that asks gets it). One that cannot be
    made (a full disk) is only logged: the job then copies the slug itself."""
    try:
        await trio.to_thread.run_sync(_make_spare_sync, slug_app)
    except OSError as exc:
        log.warning("no copy of slug %s made ahead for its first job: %s", slug_app.parent.name, exc)


def _copy_sync(slug_app: Path, job_dir: Path) -> Path:
    app = job_dir / "app"
    if job_dir.exists():
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    try:
        os.rename(_spare_of(slug_app), app)  # the copy made ahead, if there is one left
    except FileNotFoundError:
        shutil.copytree(slug_app, app, symlinks=True)
    return app


async def prepare_job_dir(slug_app: Path, root: Path, job_id: str) -> Path:
    """Make a fresh copy of ``slug_app`` at ``root/jobs/<job_id>/app`` and return it."""
    if not _JOB_ID.match(job_id):
        raise UserError(f"job id {job_id!r} is not valid; expected [A-Za-z0-9][A-Za-z0-9_.-]*")
    return await trio.to_thread.run_sync(_copy_sync, slug_app, root / "jobs" / job_id)


def move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished directory `tmp` to `dest` (blocking). Losing the race to a
    concurrent unpack of the same content is fine: theirs is as good."""
    try:
        tmp.rename(dest)
    except OSError:
        if not dest.is_dir():
            raise
