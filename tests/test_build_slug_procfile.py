"""A slug says what it runs: the buildpacks' default process types are written into
its ``./app/Procfile`` (the app's own lines over them), since a release of a slug
reads the slug's Procfile. Real builds with the built-in buildpacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flynnp2p.build.builder import BuildError, build
from flynnp2p.build.procfile import read_slug_procfile


async def run(tmp_path: Path, files: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    src = tmp_path / "src"
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    lines: list[str] = []

    async def on_line(line: str) -> None:
        lines.append(line)

    result = await build(
        src, app_id="app-1", work_dir=tmp_path / "work", cache_dir=tmp_path / "cache", env={},
        on_line=on_line,
    )  # fmt: skip
    assert read_slug_procfile(result.slug_path) == result.process_types
    return result.process_types, lines


async def test_a_static_site_gets_the_buildpacks_web_in_its_slug(tmp_path: Path) -> None:
    types, lines = await run(tmp_path, {"index.html": "<h1>hi</h1>"})
    assert types == {"web": "python3 .flynnp2p/static-server.py"}
    assert "       Procfile declares types -> (none)" in lines
    assert "       Default types for buildpack -> web" in lines


async def test_the_apps_procfile_wins_over_the_defaults(tmp_path: Path) -> None:
    files = {
        "package.json": '{"name": "x", "scripts": {"start": "node a.js"}}',
        "Procfile": "worker: node w.js\n",
    }
    types, lines = await run(tmp_path, files)
    assert types == {"web": "npm start", "worker": "node w.js"}
    assert "       Procfile declares types -> worker" in lines


async def test_a_procfile_that_is_a_link_fails_the_build(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("web: cat /etc/shadow\n")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(tmp_path / "elsewhere", src / "Procfile")
    (src / "index.html").write_text("x")

    async def on_line(line: str) -> None:
        pass

    with pytest.raises(BuildError, match="Procfile must be a regular file"):
        await build(
            src, app_id="app-1", work_dir=tmp_path / "work", cache_dir=tmp_path / "cache", env={},
            on_line=on_line,
        )  # fmt: skip
