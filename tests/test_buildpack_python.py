"""The python buildpack's bytecode and its virtualenv kept in the build cache.

``bin/compile`` runs here as a program on a build dir, a cache dir and an env dir
of the test's own (no sandbox: the directories differ per build, as they do
where the host has no mount namespaces), with ``uv`` on its PATH as the builder
lends it. Dependencies are wheels made in the test, found through
``PIP_FIND_LINKS`` with ``PIP_NO_INDEX``: no network. The last test runs real
builds in the real sandbox (at ``/app``) and looks in the slug.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from uv import find_uv_bin

from flynnp2p.build.builder import build, builtin_dir
from flynnp2p.build.cache import pack, scan, unpack
from flynnp2p.build.sandbox import SYSTEM_PATH
from flynnp2p.host.process import detect_isolation
from tests.wheels import wheel

COMPILE = builtin_dir("python") / "bin" / "compile"
APP_PY = "import greet\nprint(greet.hello())\n"


def greet_code(version: str) -> str:
    return (
        f"def hello():\n    return 'hello from greet {version}'\n\n"
        "def main():\n    print(hello())\n"
    )


class Builds:
    """One app's builds: each a fresh build dir (``build-N``) with the app's files,
    one cache dir and one env dir for all, as the builder keeps them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.wheels = root / "wheels"
        self.cache = root / "cache"
        self.env = root / "env"
        self.tools = root / "tools"
        self.files = {
            "requirements.txt": "greet==1.0\n",
            "app.py": APP_PY,
            "lib/util.py": "X = 1\n",
        }
        self.count = 0
        for d in (self.cache, self.env, self.tools):
            d.mkdir(parents=True)
        (self.tools / "uv").symlink_to(find_uv_bin())  # as the builder lends it
        wheel(self.wheels, "greet", "1.0", greet_code("1.0"), script="greet")
        wheel(self.wheels, "greet", "1.1", greet_code("1.1"), script="greet")
        self.set_env(PIP_FIND_LINKS=str(self.wheels), PIP_NO_INDEX="1")

    def set_env(self, **values: str) -> None:
        for key, value in values.items():
            (self.env / key).write_text(value)

    def run(self, at: Path | None = None) -> tuple[Path, str]:
        """Compile the app in a fresh build dir (``at``, else the next ``build-N``)."""
        self.count += 1
        app = at or self.root / f"build-{self.count}"
        if app.exists():
            shutil.rmtree(app)
        for name, text in self.files.items():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            (app / name).write_text(text)
        out = subprocess.run(
            [str(COMPILE), str(app), str(self.cache), str(self.env)],
            cwd=app,
            env={"PATH": f"{self.tools}:{SYSTEM_PATH}", "HOME": str(app), "LANG": "C.UTF-8"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return app, out.stdout

    @property
    def entry(self) -> Path:
        return self.cache / "python-venv"


def tree(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry under ``root``: kind, mode and content (or link target)."""
    found: dict[str, tuple[str, int, bytes]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_symlink():
            found[rel] = ("l", 0, os.readlink(p).encode())
        elif p.is_dir():
            found[rel] = ("d", st.st_mode & 0o7777, b"")
        else:
            found[rel] = ("f", st.st_mode & 0o7777, p.read_bytes())
    return found


def run_app(app: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(app / ".venv" / "bin" / "python"), *args],
        cwd=app,
        env={"PATH": SYSTEM_PATH, "HOME": str(app), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def fresh(output: str) -> bool:
    installed = "-----> Installing dependencies from requirements.txt with uv" in output
    reused = "-----> Reusing the virtualenv from the build cache" in output
    assert installed != reused, output
    return installed


# -- bytecode ----------------------------------------------------------------------------


def test_every_module_has_checked_hash_bytecode(tmp_path: Path) -> None:
    app, output = Builds(tmp_path).run()
    assert "-----> Compiling Python bytecode" in output
    sources = [
        p
        for p in app.rglob("*.py")
        if ".venv" not in p.parts or "site-packages" in p.parts  # the venv's: its packages
    ]
    assert {"app.py", "util.py", "__init__.py", "helpers.py"} <= {p.name for p in sources}
    tag = sys.implementation.cache_tag
    for source in sources:
        pyc = source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
        assert pyc.is_file(), f"no bytecode for {source}"
        flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
        assert flags == 0b11, f"{pyc} is not checked-hash (flags {flags:#b})"


def test_a_job_imports_without_compiling_or_writing(tmp_path: Path) -> None:
    app, _ = Builds(tmp_path).run()
    # The slug's tar and each job's copy need not keep the sources' mtimes: give every
    # source another one. Hash-based bytecode stays valid; a timestamp one would not.
    for source in app.rglob("*.py"):
        os.utime(source, (1_000_000_000, 1_000_000_000))
    before = tree(app)
    # As a job that cannot write its tree: -v names where each module's code came from.
    job = run_app(
        app, "-v", "-c", "import app, lib.util, greet.helpers", PYTHONDONTWRITEBYTECODE="1"
    )
    assert job.returncode == 0, job.stderr
    assert "hello from greet 1.0" in job.stdout
    loaded = [
        line.split("code object from ", 1)[1].strip("'")
        for line in job.stderr.splitlines()
        if "code object from " in line
    ]
    ours = [p for p in loaded if p.startswith(str(app))]
    assert len(ours) >= 4, job.stderr  # app, lib.util, greet, greet.helpers
    assert all(p.endswith(".pyc") for p in ours), [p for p in ours if not p.endswith(".pyc")]
    # And one that could write: it has nothing to write.
    job = run_app(app, "-c", "import app, lib.util, greet.helpers")
    assert job.returncode == 0, job.stderr
    assert tree(app) == before


# -- the virtualenv kept in the build cache ----------------------------------------------


def test_same_requirements_reuse_an_identical_venv_and_leave_the_cache_alone(
    tmp_path: Path,
) -> None:
    builds = Builds(tmp_path)
    app = tmp_path / "app"
    _, first = builds.run(at=app)
    assert fresh(first)
    venv = tree(app / ".venv")
    cache = scan(builds.cache)
    builds.files["app.py"] = APP_PY + "# a one-line change\n"
    _, second = builds.run(at=app)  # a new build at the same path (as at /app)
    assert not fresh(second)
    assert "(requirements.txt unchanged)" in second
    assert tree(app / ".venv") == venv
    assert scan(builds.cache) == cache  # nothing written: the builder stores nothing again
    with tarfile.open(builds.entry / "venv.tar") as kept:
        assert "./bin/python" not in kept.getnames()  # the stack's interpreter: not kept
        assert "./bin/python3" in kept.getnames()
    assert run_app(app, "app.py").stdout == "hello from greet 1.0\n"


def test_a_venv_reused_at_another_path_runs_from_there(tmp_path: Path) -> None:
    builds = Builds(tmp_path)
    first, _ = builds.run()
    second, output = builds.run()
    assert not fresh(output)
    shutil.rmtree(first)  # nothing may point into the first build dir
    script = second / ".venv" / "bin" / "greet"
    assert script.read_text().startswith(f"#!{second}/.venv/bin/python")
    assert f"{second}/.venv" in (second / ".venv" / "bin" / "activate").read_text()
    ran = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello from greet 1.0\n"
    prefix = run_app(second, "-c", "import sys; print(sys.prefix)").stdout.strip()
    assert prefix == str(second / ".venv")


def test_a_venv_kept_through_the_builders_cache_blob_is_reused(tmp_path: Path) -> None:
    # The cache goes to another node as the builder packs it and unpacks it there
    # (through tar's "data" filter: modes may change).
    builds = Builds(tmp_path)
    builds.run()
    pack(builds.cache, tmp_path / "cache.tar.gz")
    builds.cache = tmp_path / "elsewhere" / "cache"
    unpack(tmp_path / "cache.tar.gz", builds.cache)
    app, output = builds.run()
    assert not fresh(output)
    assert run_app(app, "app.py").stdout == "hello from greet 1.0\n"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("requirements", "requirements.txt changed"),
        ("index", "the installer's settings (PIP_*, UV_*) changed"),
        ("wheels", "the find-links directories changed"),
    ],
)
def test_what_shapes_the_venv_changed_builds_it_fresh(
    tmp_path: Path, change: str, says: str
) -> None:
    builds = Builds(tmp_path)
    builds.run()
    if change == "requirements":
        builds.files["requirements.txt"] = "greet==1.1\n"
    elif change == "index":
        builds.set_env(PIP_EXTRA_INDEX_URL="https://index.invalid/simple")
    else:  # a wheel of the find-links directory changed, its name the same
        wheel(builds.wheels, "greet", "1.0", greet_code("1.0 rebuilt"), script="greet")
    app, output = builds.run()
    assert fresh(output)
    assert says in output
    if change != "wheels":  # (which greet a fresh install takes from uv's cache is uv's say)
        want = "1.1" if change == "requirements" else "1.0"
        assert run_app(app, "app.py").stdout == f"hello from greet {want}\n"
    _, again = builds.run()  # the new venv is the one kept now
    assert not fresh(again)


def _remove_entry_json(entry: Path) -> None:
    (entry / "entry.json").unlink()


def _garble_entry_json(entry: Path) -> None:
    (entry / "entry.json").write_text('{"key": ')


def _change_a_module(entry: Path) -> None:
    archive = entry / "venv.tar"
    data = archive.read_bytes()
    assert b"hello from greet 1.0" in data  # in the source and in its .pyc
    archive.write_bytes(data.replace(b"hello from greet 1.0", b"HELLO FROM GREET 1.0"))


def _truncate_the_tar(entry: Path) -> None:
    archive = entry / "venv.tar"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])


def _remove_the_tar(entry: Path) -> None:
    (entry / "venv.tar").unlink()


def _saved_without_pyvenv_cfg(entry: Path) -> None:
    # A venv kept whole by its digest but broken when it was saved: its python runs
    # as the stack's own (sys.prefix /usr), not from the venv.
    archive = entry / "venv.tar"
    rebuilt = entry / "rebuilt.tar"
    with tarfile.open(archive) as src, tarfile.open(rebuilt, "w") as dest:
        for member in src.getmembers():
            if member.name != "./pyvenv.cfg":
                dest.addfile(member, src.extractfile(member) if member.isfile() else None)
    rebuilt.replace(archive)
    meta = json.loads((entry / "entry.json").read_text())
    meta["tar"] = hashlib.sha256(archive.read_bytes()).hexdigest()
    (entry / "entry.json").write_text(json.dumps(meta))


def _half_written(entry: Path) -> None:
    # What a build killed while saving leaves: the copy under its temporary name.
    entry.rename(entry.with_name("python-venv.tmp-4242"))


@pytest.mark.parametrize(
    "damage",
    [
        _remove_entry_json,
        _garble_entry_json,
        _change_a_module,
        _truncate_the_tar,
        _remove_the_tar,
        _saved_without_pyvenv_cfg,
        _half_written,
    ],
)
def test_a_damaged_cached_venv_is_never_used(tmp_path: Path, damage: object) -> None:
    builds = Builds(tmp_path)
    builds.run()
    assert callable(damage)
    damage(builds.entry)
    app, output = builds.run()
    assert fresh(output)
    assert run_app(app, "app.py").stdout == "hello from greet 1.0\n"
    assert sorted(p.name for p in builds.cache.iterdir()) == ["python-venv", "uv"]
    entry = json.loads((builds.entry / "entry.json").read_text())
    assert entry["venv"] == str(app / ".venv")
    _, again = builds.run()  # kept afresh, whole
    assert not fresh(again)


def test_requirements_from_local_paths_are_never_kept(tmp_path: Path) -> None:
    builds = Builds(tmp_path)
    builds.run()
    assert builds.entry.is_dir()
    builds.files["requirements.txt"] = f"{builds.wheels}/greet-1.1-py3-none-any.whl\n"
    app, output = builds.run()
    assert "installs from local paths or version control" in output
    assert fresh(output)
    assert not builds.entry.exists()  # the old one is not for this app any more
    assert run_app(app, "app.py").stdout == "hello from greet 1.1\n"
    _, again = builds.run()
    assert fresh(again)


def test_included_requirements_are_part_of_the_key(tmp_path: Path) -> None:
    builds = Builds(tmp_path)
    builds.files["requirements.txt"] = "-r requirements/base.txt\n"
    builds.files["requirements/base.txt"] = "greet==1.0\n"
    builds.run()
    _, same = builds.run()
    assert not fresh(same)
    builds.files["requirements/base.txt"] = "greet==1.1\n"
    app, changed = builds.run()
    assert fresh(changed)
    assert run_app(app, "app.py").stdout == "hello from greet 1.1\n"


# -- in the real sandbox -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    detect_isolation() != "namespaces", reason="builds at /app need mount namespaces (root)"
)
async def test_sandbox_builds_reuse_the_venv_and_slugs_carry_bytecode(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "requirements.txt").write_text("greet==1.0\n")
    (src / "app.py").write_text(APP_PY)
    wheel(src / "vendor", "greet", "1.0", greet_code("1.0"))
    env = {"PIP_FIND_LINKS": "/app/vendor", "PIP_NO_INDEX": "1"}
    outputs = []
    for n in range(2):
        lines: list[str] = []

        async def on_line(line: str, lines: list[str] = lines) -> None:
            lines.append(line)

        result = await build(
            src,
            app_id="app-1",
            work_dir=tmp_path / f"work-{n}",
            cache_dir=tmp_path / "cache",
            env=env,
            on_line=on_line,
        )
        outputs.append("\n".join(lines))
    assert fresh(outputs[0])
    assert not fresh(outputs[1])
    with tarfile.open(result.slug_path, "r:gz") as tar:
        names = set(tar.getnames())
    tag = sys.implementation.cache_tag
    assert f"./app/__pycache__/app.{tag}.pyc" in names
    assert any(n.endswith(f"/site-packages/greet/__pycache__/__init__.{tag}.pyc") for n in names)
    assert "./app/.venv/bin/python" in names
