"""The builder's check of a packed slug (`builder._check_slug`): one pass over the file
that checks every member as a host will, reads the Procfile as a host reads it
(`procfile.read_slug_procfile`) and hashes the file."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flynnp2p.build.builder import _check_slug
from flynnp2p.build.procfile import read_slug_procfile
from flynnp2p.errors import UserError
from flynnp2p.host.slug import SlugError


def slug(path: Path, members: list[tuple[str, bytes | None]], compresslevel: int = 3) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=compresslevel) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


APP: list[tuple[str, bytes | None]] = [("./app", None), ("./app/app.py", b"print('hi')\n" * 5000)]


def test_the_digest_is_the_files_and_the_procfile_is_read(tmp_path: Path) -> None:
    path = slug(tmp_path / "s.tgz", [*APP, ("./app/Procfile", b"web: python app.py\n")])
    checked = _check_slug(path)
    assert checked.digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert checked.size == path.stat().st_size
    assert checked.procfile == {"web": "python app.py"} == read_slug_procfile(path)


@pytest.mark.parametrize(
    "procfiles",
    [
        [],
        [("./app/Procfile", b"web: one\n"), ("./app/Procfile", b"web: two\n")],  # the last
        [("app/Procfile", b"web: bare\n")],
        [("./app/Procfile", b"web: dotted\n"), ("app/Procfile", b"web: bare\n")],
        [("app/Procfile", b"web: bare\n"), ("./app/Procfile", b"web: dotted\n")],
    ],
)
def test_the_procfile_chosen_is_the_one_a_host_reads(
    tmp_path: Path, procfiles: list[tuple[str, bytes | None]]
) -> None:
    path = slug(tmp_path / "s.tgz", [*APP, *procfiles])
    assert _check_slug(path).procfile == read_slug_procfile(path)


@pytest.mark.parametrize(
    "bad",
    [[("./app/Procfile", None)], [("./app/Procfile", b"web: x\n" * 20_000)]],
    ids=["a directory", "over 64 KiB"],
)
def test_a_procfile_a_host_refuses_is_refused(
    tmp_path: Path, bad: list[tuple[str, bytes | None]]
) -> None:
    path = slug(tmp_path / "s.tgz", [*APP, *bad])
    with pytest.raises(UserError, match="must be a regular file of at most 64 KiB") as info:
        _check_slug(path)
    assert not isinstance(info.value, SlugError)
    with pytest.raises(UserError, match="must be a regular file of at most 64 KiB"):
        read_slug_procfile(path)


def test_an_unsafe_member_wins_over_a_bad_procfile_before_it(tmp_path: Path) -> None:
    path = slug(tmp_path / "s.tgz", [*APP, ("./app/Procfile", None), ("./other", b"x")])
    with pytest.raises(SlugError, match="outside ./app"):
        _check_slug(path)


@pytest.mark.parametrize(
    "cut",
    [lambda n: n // 2, lambda n: n - 4],  # mid-data; only gzip's length field missing
    ids=["half", "trailer"],
)
def test_a_slug_cut_short_is_not_readable(tmp_path: Path, cut: Callable[[int], int]) -> None:
    whole = slug(tmp_path / "s.tgz", [*APP, ("./app/Procfile", b"web: x\n")]).read_bytes()
    path = tmp_path / "cut.tgz"
    path.write_bytes(whole[: cut(len(whole))])
    with pytest.raises(SlugError, match="not readable"):
        _check_slug(path)


def test_a_slug_checked_while_it_is_written_is_checked_as_one_read_after(tmp_path: Path) -> None:
    """The builder checks the file while tar writes it: bytes that arrive in bursts,
    with the end only known once the writer is done, give what one read gives."""
    whole = slug(tmp_path / "whole.tgz", [*APP, ("./app/Procfile", b"web: python app.py\n")])
    data = whole.read_bytes()
    growing = tmp_path / "growing.tgz"
    growing.write_bytes(b"")
    written = threading.Event()

    def write() -> None:
        with growing.open("ab") as f:
            for at in range(0, len(data), 700):
                f.write(data[at : at + 700])
                f.flush()
                time.sleep(0.002)
        written.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        checked = _check_slug(growing, written)
    finally:
        writer.join()
    after = _check_slug(whole)
    assert (checked.digest, checked.size, checked.procfile) == (after.digest, after.size, after.procfile)

    # A writer that stops short (tar failed): not readable, not a slug.
    short = tmp_path / "short.tgz"
    short.write_bytes(data[: len(data) // 2])
    done = threading.Event()
    done.set()
    with pytest.raises(SlugError):
        _check_slug(short, done)
