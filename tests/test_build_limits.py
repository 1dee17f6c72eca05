"""An app's build limits: its `App` record's settings reach the sandbox, and a build
over its memory limit fails naming the limit and how to raise it (a real build)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from flynnp2p.build.builder import BuildError, build, memory_message, out_of_memory
from flynnp2p.build.deploy import limits_of
from flynnp2p.state.records import App


@pytest.mark.parametrize(
    ("status", "tail", "oom"),
    [
        (1, ["Traceback (most recent call last):", "MemoryError"], True),
        (1, ["npm ERR! errno ENOMEM"], True),
        (
            134,
            ["FATAL ERROR: Reached heap limit Allocation failed - JavaScript heap out of memory"],
            True,
        ),
        (-9, [], True),  # killed: as a failed allocation's signal is
        (-6, ["terminate called after throwing an instance of 'std::bad_alloc'"], True),
        (1, ["ERROR: No matching distribution found for nosuchpackage"], False),
        (2, ["SyntaxError: invalid syntax"], False),
        (-15, [], False),
    ],
)
def test_out_of_memory(status: int, tail: list[str], oom: bool) -> None:
    assert out_of_memory(status, tail) is oom


def test_limits_come_from_the_app_record() -> None:
    app = App(id="app-1", name="hello", created_at=1, build_memory_mb=256, build_timeout_s=60)
    limits = limits_of(app)
    assert (limits.memory_mb, limits.timeout_s) == (256, 60.0)
    default = limits_of(App(id="app-2", name="other", created_at=1))
    assert (default.memory_mb, default.timeout_s) == (1024, 900.0)


async def test_a_build_over_its_memory_limit_says_which_and_how_to_raise_it(tmp_path: Path) -> None:
    bp = tmp_path / "bp"
    (bp / "bin").mkdir(parents=True)
    compile_ = bp / "bin" / "compile"
    compile_.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "-----> Grabbing 600 MB"
        python3 -c 'b = bytearray(600 * 1024 * 1024); print(len(b))'
    """))  # fmt: skip
    compile_.chmod(0o755)
    src = tmp_path / "src"
    src.mkdir()
    (src / "Procfile").write_text("web: true\n")
    app = App(id="app-1", name="hello", created_at=1, build_memory_mb=256)
    lines: list[str] = []

    async def on_line(line: str) -> None:
        lines.append(line)

    with pytest.raises(BuildError) as e:
        await build(
            src, app_id=app.id, work_dir=tmp_path / "work", cache_dir=tmp_path / "cache", env={},
            on_line=on_line, buildpacks=[str(bp)], limits=limits_of(app),
        )  # fmt: skip
    assert e.value.message.startswith(memory_message(256)), e.value.message
    assert "memory limit 256 MiB" in e.value.message
    assert "flynnp2p app set build_memory_mb=512" in e.value.message
    assert "Grabbing 600 MB" in "\n".join(lines)
