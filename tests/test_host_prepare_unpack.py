"""`Preparer.unpacked_slug`: a slug unpacked once per digest on a node, whoever asks
first (the push's build on the node that built it, or a job placed there)."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import trio

from flynnp2p.host.prepare import Preparer
from flynnp2p.host.slug import SlugError


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
