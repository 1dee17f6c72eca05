"""`Preparer.unpacked_slug`: a slug unpacked once per digest on a node, whoever asks
first (the push's build on the node that built it, or a job placed there), and the
build's own tree taken as the slug unpacked on the node that built it."""

from __future__ import annotations

import errno
import gzip
import io
import os
import socket
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import trio

from flynnp2p.host import slug as slug_module
from flynnp2p.host.prepare import Preparer
from flynnp2p.host.slug import SlugError, prepare_job_dir, unpack_slug


def slug(path: Path, files: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def preparer(root: Path) -> Preparer:
    return Preparer("n1", "127.0.0.1", None, "process", None, None, root)  # type: ignore[arg-type]


async def test_callers_at_once_get_one_unpacked_slug(tmp_path: Path) -> None:
    files = {f"./app/f{i}": b"x" * 1000 for i in range(3000)}
    tarball = slug(tmp_path / "s.tgz", {"./app/Procfile": b"web: ./run\n", **files})
    p = preparer(tmp_path / "jobs")
    slugs = tmp_path / "jobs" / "slugs"
    got: list[Path] = []
    most = 0  # unpacks seen running at once (each extracts into a temporary sibling)

    async def ask() -> None:
        got.append(await p.unpacked_slug(tarball, "sha256-aa"))

    async def watch() -> None:
        nonlocal most
        while True:
            if slugs.is_dir():
                most = max(most, sum(d.name.startswith(".sha256-aa.") for d in slugs.iterdir()))
            await trio.sleep(0.001)

    async with trio.open_nursery() as outer:
        outer.start_soon(watch)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ask)
        outer.cancel_scope.cancel()
    assert most == 1
    assert got == [tmp_path / "jobs" / "slugs" / "sha256-aa" / "app"] * 3
    assert (got[0] / "Procfile").read_bytes() == b"web: ./run\n"
    # One unpack, renamed into place: no temporary sibling of a lost race is left.
    assert sorted(d.name for d in (tmp_path / "jobs" / "slugs").iterdir()) == ["sha256-aa"]
    assert p._unpacking == {}


async def test_a_failed_unpack_does_not_hold_up_the_next_caller(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a slug")
    p = preparer(tmp_path / "jobs")
    with pytest.raises(SlugError):
        await p.unpacked_slug(bad, "sha256-bb")
    good = slug(tmp_path / "good.tgz", {"./app/Procfile": b"web: ./run\n"})
    app = await p.unpacked_slug(good, "sha256-bb")
    assert (app / "Procfile").is_file() and p._unpacking == {}


def _entries(app: Path) -> dict[str, tuple[str, int, int, int, bytes | str | None]]:
    """Each entry below `app`: (type, mode bits, uid, gid, content or link target)."""
    out: dict[str, tuple[str, int, int, int, bytes | str | None]] = {}
    for path in [app, *sorted(app.rglob("*"))]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            kind, data = "link", os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            kind, data = "dir", None
        else:
            kind, data = "file", path.read_bytes()
        mode = 0 if kind == "link" else stat.S_IMODE(st.st_mode)
        out[str(path.relative_to(app))] = (kind, mode, st.st_uid, st.st_gid, data)
    return out


def _built_tree(box: Path, uid: int) -> Path:
    """A build's ./app as a buildpack may leave it: odd modes, links, a socket, not root's."""
    app = box / "app"
    (app / "bin").mkdir(parents=True)
    (app / "private").mkdir(mode=0o700)
    (app / "bin" / "run").write_bytes(b"#!/bin/sh\n")
    (app / "bin" / "run").chmod(0o4775)  # setuid, group-writable
    (app / "data").write_bytes(b"d" * 5000)
    (app / "data").chmod(0o602)  # owner rw, other w
    (app / "private" / "key").write_bytes(b"k")
    (app / "private" / "key").chmod(0o400)
    (app / "odd-exec").write_bytes(b"x")
    (app / "odd-exec").chmod(0o655)  # others may run it, its owner may not
    os.symlink("bin/run", app / "run")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(app / "sock"))  # tar skips sockets
    for path in [app, *app.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)
    return app


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are set as root")
async def test_the_builds_tree_taken_as_the_slug_is_what_unpacking_its_tarball_gives(
    tmp_path: Path,
) -> None:
    built = _built_tree(tmp_path / "box", uid=4242)
    tarball = tmp_path / "slug.tgz"
    # Packed as the builder packs it (`flynnp2p.build.builder._pack`).
    subprocess.run(
        ["tar", "--create", "--use-compress-program=gzip -1", "--file", str(tarball),
         "--owner=0", "--group=0", "--numeric-owner", "--directory", str(built.parent), "./app"],
        check=True, capture_output=True,
    )  # fmt: skip
    unpacked = await unpack_slug(tarball, tmp_path / "other", "sha256-cc")
    p = preparer(tmp_path / "jobs")
    adopted = await p.unpacked_slug(tarball, "sha256-cc", built)
    assert adopted == tmp_path / "jobs" / "slugs" / "sha256-cc" / "app"
    assert not built.exists()  # moved, not copied
    assert _entries(adopted) == _entries(unpacked)
    assert "sock" not in _entries(adopted) and _entries(adopted)["data"][1] == 0o600
    assert sorted(d.name for d in (tmp_path / "jobs" / "slugs").iterdir()) == ["sha256-cc"]
    # A slug already in place stays; the tree offered again is left where it is.
    again = _built_tree(tmp_path / "box2", uid=4242)
    assert await p.unpacked_slug(tarball, "sha256-cc", again) == adopted
    assert again.is_dir() and p._unpacking == {}


def slug_and_tree(tmp_path: Path, procfile: bytes = b"web: ./run\n") -> tuple[Path, Path]:
    """A slug tarball (its Procfile "web: ./run") and a build's tree with `procfile`."""
    tarball = slug(tmp_path / "s.tgz", {"./app/Procfile": b"web: ./run\n"})
    built = tmp_path / "box" / "app"
    built.mkdir(parents=True)
    (built / "Procfile").write_bytes(procfile)
    return tarball, built


async def test_a_tree_on_another_filesystem_is_unpacked_from_the_tarball(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball, built = slug_and_tree(tmp_path, b"web: ./other\n")

    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(src) == built:  # the tree is on another filesystem than the slugs
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(slug_module.os, "rename", rename)
    app = await preparer(tmp_path / "jobs").unpacked_slug(tarball, "sha256-dd", built)
    assert (app / "Procfile").read_bytes() == b"web: ./run\n"  # the tarball's
    assert (built / "Procfile").is_file()


async def test_the_first_job_on_the_node_that_built_the_slug_takes_its_copy_made_ahead(
    tmp_path: Path,
) -> None:
    tarball, built = slug_and_tree(tmp_path)
    (built / "lib").mkdir()
    (built / "lib" / "mod.py").write_bytes(b"x = 1\n")
    jobs = tmp_path / "jobs"
    app = await preparer(jobs).unpacked_slug(tarball, "sha256-ee", built)
    spare = app.parent / "spare" / "app"
    assert _entries(spare) == _entries(app)  # made while the release is made
    first = await prepare_job_dir(app, jobs, "web-1")
    assert not spare.exists() and _entries(first) == _entries(app)  # taken, not copied
    second = await prepare_job_dir(app, jobs, "web-2")  # none left: a copy
    assert _entries(second) == _entries(app)
    (first / "lib" / "mod.py").write_bytes(b"x = 2\n")  # a job writing its own copy
    assert (app / "lib" / "mod.py").read_bytes() == b"x = 1\n"
    assert (second / "lib" / "mod.py").read_bytes() == b"x = 1\n"


async def test_a_copy_that_cannot_be_made_ahead_leaves_the_job_to_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball, built = slug_and_tree(tmp_path)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(slug_module.shutil, "copytree", full)
        app = await preparer(tmp_path / "jobs").unpacked_slug(tarball, "sha256-ff", built)
    assert (app / "Procfile").is_file() and not (app.parent / "spare").exists()
    assert [p.name for p in app.parent.iterdir()] == ["app"]  # nothing half-made left
    job = await prepare_job_dir(app, tmp_path / "jobs", "web-1")
    assert (job / "Procfile").read_bytes() == b"web: ./run\n"
