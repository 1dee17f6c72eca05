"""Real builds: the built-in and third-party buildpacks in the real sandbox, no mocks.

Every build here runs its buildpack programs for real (as the build's uid in its
own namespaces when the tests run as root); dependencies come from a wheel made in
the test (no index), third-party buildpacks from a local directory and a local
git repository. The last tests run built slugs with the process backend and GET
them over loopback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from flynnp2p.build.builder import BuildError, BuildLimits, BuildResult, build
from flynnp2p.host.backend import JobSpec
from flynnp2p.host.cgroup import find_controller
from flynnp2p.host.process import detect_isolation, open_process_backend
from flynnp2p.host.slug import unpack_slug
from tests.harness import wait_for
from tests.wheels import wheel

ISOLATION = detect_isolation()


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def write(root: Path, files: dict[str, str], mode: int = 0o644) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        path.chmod(mode)
    return root


async def run_build(
    tmp_path: Path, source: Path, env: dict[str, str] | None = None, **kw: object
) -> tuple[BuildResult, Lines]:
    lines = Lines()
    result = await build(
        source,
        app_id="app-1",
        work_dir=tmp_path / "work",
        cache_dir=tmp_path / "cache",
        env=env or {},
        on_line=lines,
        **kw,  # type: ignore[arg-type]
    )
    return result, lines


def slug_members(result: BuildResult) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(result.slug_path, "r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def slug_file(result: BuildResult, name: str) -> str:
    with tarfile.open(result.slug_path, "r:gz") as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read().decode()


def only_slug_left(tmp_path: Path, result: BuildResult | None) -> None:
    """The work dir holds the slug (if any) and nothing else: the sandbox is gone."""
    left = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert left == ([result.slug_path.name] if result else [])


# -- the built-in buildpacks -----------------------------------------------------------


async def test_procfile_only_app(tmp_path: Path) -> None:
    src = write(
        tmp_path / "src", {"Procfile": "web: ./run\nworker: sleep 1\n", "run": "#!/bin/sh\n"}
    )
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    result, lines = await run_build(tmp_path, src)
    assert result.buildpacks == ("Procfile",)
    assert result.process_types == {"web": "./run", "worker": "sleep 1"}
    members = slug_members(result)
    assert {"./app", "./app/Procfile", "./app/run"} <= set(members)
    assert not any(".git" in n for n in members)
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert result.digest == "sha256:" + hashlib.sha256(result.slug_path.read_bytes()).hexdigest()
    assert result.size == result.slug_path.stat().st_size
    assert "-----> Procfile app detected" in lines.lines
    only_slug_left(tmp_path, result)


async def test_slugignore_removes_before_compile(tmp_path: Path) -> None:
    src = write(
        tmp_path / "src",
        {
            "Procfile": "web: true\n",
            ".slugignore": "# big things\n*.log\n/docs\n",
            "keep.txt": "k",
            "build.log": "x",
            "sub/deep.log": "x",
            "docs/manual.txt": "x",
            "sub/docs/kept.txt": "k",
        },
    )
    result, _ = await run_build(tmp_path, src)
    names = set(slug_members(result))
    assert {"./app/keep.txt", "./app/sub/docs/kept.txt"} <= names
    assert not {"./app/build.log", "./app/sub/deep.log", "./app/docs"} & names


async def test_static_app(tmp_path: Path) -> None:
    src = write(tmp_path / "src", {"index.html": "<h1>hi</h1>\n", "css/site.css": "h1{}\n"})
    result, lines = await run_build(tmp_path, src)
    assert result.buildpacks == ("Static",)
    assert result.process_types == {"web": "python3 .flynnp2p/static-server.py"}
    assert "./app/.flynnp2p/static-server.py" in slug_members(result)
    assert "-----> Static app detected" in lines.lines


async def test_no_buildpack_detected_names_every_marker(tmp_path: Path) -> None:
    src = write(tmp_path / "src", {"README.md": "nothing to build\n"})
    with pytest.raises(BuildError) as e:
        await run_build(tmp_path, src)
    message = e.value.message
    for words in ("requirements.txt", "package.json", "index.html", "Procfile", "BUILDPACK_URL"):
        assert words in message
    only_slug_left(tmp_path, None)


def python_app(tmp_path: Path, *, django: bool = False) -> Path:
    src = write(
        tmp_path / "src",
        {
            "requirements.txt": "greet==1.0\n",
            "Procfile": "web: python app.py\n",
            "app.py": """\
                import http.server, os, sys, greet
                class H(http.server.BaseHTTPRequestHandler):
                    def do_GET(self):
                        body = f"{greet.hello()} on {sys.prefix}".encode()
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                http.server.HTTPServer((os.environ["HOST"], int(os.environ["PORT"])), H).serve_forever()
                """,
        },
    )
    wheel(src / "vendor", "greet", "1.0", "def hello():\n    return 'hello from greet'\n")
    if django:
        # What the buildpack does for Django apps is run the app's manage.py once
        # `import django` works: a stand-in package and manage.py are enough.
        (src / "requirements.txt").write_text("greet==1.0\ndjango==0.0.1\n")
        wheel(src / "vendor", "django", "0.0.1", "")
        write(src, {"manage.py": MANAGE_PY})
    return src


MANAGE_PY = """\
    import os, sys
    os.makedirs("staticfiles", exist_ok=True)
    with open("staticfiles/collected.txt", "w") as f:
        f.write(" ".join(sys.argv[1:]) + " in " + os.getcwd())
    """


# The app's env is handed to the installer: a local wheel directory, no index.
LOCAL_WHEELS = {"PIP_FIND_LINKS": "/app/vendor", "PIP_NO_INDEX": "1"}


@pytest.mark.slow
@pytest.mark.skipif(ISOLATION != "namespaces", reason="builds at /app need mount namespaces (root)")
async def test_python_app_venv_in_the_slug(tmp_path: Path) -> None:
    src = python_app(tmp_path, django=True)
    result, lines = await run_build(tmp_path, src, env=LOCAL_WHEELS)
    assert result.buildpacks == ("Python",)
    assert slug_file(result, "./app/staticfiles/collected.txt") == "collectstatic --noinput in /app"
    members = slug_members(result)
    assert any(n.endswith("/site-packages/greet/__init__.py") for n in members)
    assert members["./app/.venv/bin/python3"].issym()  # one interpreter file, not three
    assert "VIRTUAL_ENV" in slug_file(result, "./app/.profile.d/python.sh")
    # uv (a dependency of flynnp2p, lent to the build) installs, with pip's settings.
    assert any("with uv" in line for line in lines.lines)
    assert any("+ greet==1.0" in line for line in lines.lines)
    # pip's caches go to the build cache, not into the slug (HOME is /app).
    assert not any(n.startswith("./app/.cache") for n in members)


@pytest.mark.skipif(ISOLATION != "namespaces", reason="the requested version is checked at /app")
async def test_python_version_the_stack_lacks(tmp_path: Path) -> None:
    src = write(tmp_path / "src", {"requirements.txt": "", ".python-version": "3.4\n"})
    with pytest.raises(BuildError) as e:
        await run_build(tmp_path, src)
    assert "exit code 1" in e.value.message
    assert any("asks for Python 3.4; this stack has Python 3." in line for line in e.value.output)
    only_slug_left(tmp_path, None)


@pytest.mark.skipif(ISOLATION != "namespaces", reason="builds at /app need mount namespaces (root)")
async def test_python_runtime_txt_with_another_patch_release_uses_the_stacks(
    tmp_path: Path,
) -> None:
    minor = subprocess.run(
        ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    src = write(tmp_path / "src", {"requirements.txt": "", "runtime.txt": f"python-{minor}.99\n"})
    result, lines = await run_build(tmp_path, src)
    assert any(f"asks for Python {minor}.99; using {minor}." in line for line in lines.lines)
    assert "./app/.venv/bin/python" in slug_members(result)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="no npm on this machine")
async def test_nodejs_app_runs_its_build_script(tmp_path: Path) -> None:
    src = write(
        tmp_path / "src",
        {
            "package.json": """\
                {"name": "demo", "version": "1.0.0",
                 "scripts": {"build": "node -e \\"require('fs').writeFileSync('built.txt', 'ok')\\"",
                             "start": "node server.js"}}
                """,
            "server.js": "console.log('hi')\n",
        },
    )
    result, lines = await run_build(tmp_path, src)
    assert result.buildpacks == ("Node.js",)
    assert result.process_types == {"web": "npm start"}
    assert slug_file(result, "./app/built.txt") == "ok"
    assert "node_modules/.bin" in slug_file(result, "./app/.profile.d/nodejs.sh")
    assert any("npm run build" in line for line in lines.lines)


# -- third-party buildpacks --------------------------------------------------------------

HELLO_DETECT = '#!/bin/sh\n[ -f "$1/hello.txt" ] && echo Hello && exit 0\nexit 1\n'
HELLO_COMPILE = """\
    #!/bin/sh
    set -e
    echo "compiling in $1 (cwd $(pwd)) as uid $(id -u)"
    echo "greeting: $(cat "$3/GREETING")"
    count=$(cat "$2/count" 2>/dev/null || echo 0)
    echo $((count + 1)) > "$2/count"
    echo "build number $((count + 1))"
    mkdir -p "$1/bin" && printf '#!/bin/sh\\necho %s\\n' "$(cat "$3/GREETING")" > "$1/bin/hello"
    chmod +x "$1/bin/hello"
    echo "to stderr" >&2
    """
HELLO_RELEASE = "#!/bin/sh\nprintf -- '---\\ndefault_process_types:\\n  web: bin/hello\\n  worker: bin/hello w\\n'\n"


def hello_buildpack(root: Path) -> Path:
    return write(
        root,
        {"bin/detect": HELLO_DETECT, "bin/compile": HELLO_COMPILE, "bin/release": HELLO_RELEASE},
        mode=0o755,
    )


async def test_buildpack_url_local_path_with_env_and_cache(tmp_path: Path) -> None:
    bp = hello_buildpack(tmp_path / "hello-bp")
    src = write(tmp_path / "src", {"hello.txt": "x"})
    env = {"BUILDPACK_URL": str(bp), "GREETING": "good day"}
    result, lines = await run_build(tmp_path, src, env=env)
    assert result.buildpacks == ("Hello",)
    assert result.process_types == {"web": "bin/hello", "worker": "bin/hello w"}
    assert "greeting: good day" in lines.lines
    assert "to stderr" in lines.lines
    assert "build number 1" in lines.lines
    if ISOLATION == "namespaces":
        assert "compiling in /app (cwd /app) as uid 0" not in lines.lines
        assert any(line.startswith("compiling in /app (cwd /app) as uid 2") for line in lines.lines)
    assert "echo good day" in slug_file(result, "./app/bin/hello")
    result2, lines2 = await run_build(tmp_path, src, env=env)  # the cache is kept
    assert "build number 2" in lines2.lines
    assert result2.slug_path != result.slug_path


def git(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


async def test_buildpacks_file_git_repo_then_builtin_procfile_wins(tmp_path: Path) -> None:
    work = hello_buildpack(tmp_path / "bp-work")
    git("init", "-q", cwd=work)
    git("add", ".", cwd=work)
    git("commit", "-qm", "bp", cwd=work)
    git("clone", "-q", "--bare", str(work), str(tmp_path / "bp.git"))
    src = write(
        tmp_path / "src",
        {
            "hello.txt": "x",
            "Procfile": "web: bin/hello --from-procfile\n",
            ".buildpacks": f"# ours, then the built-in\nfile://{tmp_path / 'bp.git'}#main\nprocfile\n",
        },
    )
    result, lines = await run_build(tmp_path, src, env={"GREETING": "hey"})
    assert result.buildpacks == ("Hello", "Procfile")
    assert result.process_types == {"web": "bin/hello --from-procfile", "worker": "bin/hello w"}
    assert lines.lines.index("-----> Hello app detected") < lines.lines.index(
        "-----> Procfile app detected"
    )


async def test_unreachable_git_buildpack(tmp_path: Path) -> None:
    src = write(tmp_path / "src", {"Procfile": "web: true\n"})
    with pytest.raises(BuildError, match="could not fetch buildpack file://"):
        await run_build(tmp_path, src, env={"BUILDPACK_URL": f"file://{tmp_path}/none.git"})


async def test_chosen_buildpack_that_says_no(tmp_path: Path) -> None:
    bp = hello_buildpack(tmp_path / "hello-bp")
    src = write(tmp_path / "src", {"Procfile": "web: true\n"})
    with pytest.raises(BuildError, match="not compatible with buildpack"):
        await run_build(tmp_path, src, buildpacks=[str(bp)])


# -- failures and limits -------------------------------------------------------------------


def failing_buildpack(root: Path, compile_body: str, *, detect: bool = True) -> Path:
    files = {"bin/compile": "#!/bin/sh\n" + compile_body, "bin/release": "#!/bin/sh\necho '---'\n"}
    if detect:
        files["bin/detect"] = "#!/bin/sh\necho Failing\n"
    return write(root, files, mode=0o755)


async def test_failing_compile_reports_output_and_exit_code(tmp_path: Path) -> None:
    body = "echo step one\necho 'boom: no such thing' >&2\nexit 3\n"
    bp = failing_buildpack(tmp_path / "bp", body, detect=False)  # chosen: taken as it is
    src = write(tmp_path / "src", {"Procfile": "web: true\n"})
    with pytest.raises(BuildError) as e:
        await run_build(tmp_path, src, buildpacks=[str(bp)])
    assert "exit code 3" in e.value.message
    assert "boom: no such thing" in e.value.message
    assert e.value.output[-2:] == ("step one", "boom: no such thing")
    only_slug_left(tmp_path, None)


def processes_with(marker: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(d.name))
    return found


async def test_time_limit_kills_the_build_and_what_it_started(tmp_path: Path) -> None:
    marker = "31.41592"
    # A sleeper in a session of its own too: only the PID namespace ends it with the build.
    body = f"echo sleeping\nsetsid sleep {marker} &\nsleep {marker}\n"
    bp = failing_buildpack(tmp_path / "bp", body)
    src = write(tmp_path / "src", {"Procfile": "web: true\n"})
    start = trio.current_time()
    with pytest.raises(BuildError, match="time limit of 1.5 s"):
        await run_build(tmp_path, src, buildpacks=[str(bp)], limits=BuildLimits(timeout_s=1.5))
    assert trio.current_time() - start < 10
    if ISOLATION == "namespaces":
        await wait_for(lambda: not processes_with(marker), 5, "the sleepers to be gone")
    only_slug_left(tmp_path, None)


async def test_memory_limit(tmp_path: Path) -> None:
    grab = "python3 -c 'b = bytearray(600 * 1024 * 1024); print(len(b))'\n"
    bp = failing_buildpack(tmp_path / "bp", grab)
    src = write(tmp_path / "src", {"Procfile": "web: true\n"})
    with pytest.raises(BuildError) as e:
        await run_build(tmp_path, src, buildpacks=[str(bp)], limits=BuildLimits(memory_mb=256))
    assert "memory limit 256 MiB" in e.value.message
    # The program's own MemoryError under RLIMIT_AS; the kernel's kill under a cgroup.
    cgroup = not isinstance(find_controller(), str) and os.geteuid() == 0
    assert ("out of memory: the kernel killed" if cgroup else "MemoryError") in e.value.message
    # The same compile under the default limit (1 GiB) succeeds.
    _, lines = await run_build(tmp_path, src, buildpacks=[str(bp)])
    assert str(600 * 1024 * 1024) in lines.lines


async def test_megabytes_of_output_stream_in_bounded_lines(tmp_path: Path) -> None:
    # 3 MB without a newline, then 20,000 short lines.
    body = "head -c 3000000 /dev/zero | tr '\\0' x\necho\nseq 1 20000\n"
    bp = failing_buildpack(tmp_path / "bp", body)
    src = write(tmp_path / "src", {"Procfile": "web: true\n"})
    result, lines = await run_build(tmp_path, src, buildpacks=[str(bp)])
    long_parts = [line for line in lines.lines if set(line) == {"x"}]
    assert sum(map(len, long_parts)) == 3_000_000
    assert max(map(len, long_parts)) == 64 * 1024
    assert lines.lines.index("20000") == lines.lines.index("1") + 19_999
    assert result.process_types == {"web": "true"}


async def test_invalid_procfile_fails_the_build_and_leaves_no_slug(tmp_path: Path) -> None:
    src = write(tmp_path / "src", {"Procfile": "web: true\nthis is not a process line\n"})
    with pytest.raises(BuildError, match="Procfile line 2"):
        await run_build(tmp_path, src)
    only_slug_left(tmp_path, None)


async def test_absolute_symlink_out_of_the_app_is_refused(tmp_path: Path) -> None:
    src = write(tmp_path / "src", {"Procfile": "web: true\n"})
    (src / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(BuildError, match="cannot be a slug.*leaves the slug"):
        await run_build(tmp_path, src)
    only_slug_left(tmp_path, None)


async def test_bad_env_key_and_bad_buildpack_are_refused(tmp_path: Path) -> None:
    src = write(tmp_path / "src", {"Procfile": "web: true\n"})
    with pytest.raises(Exception, match="env key"):
        await run_build(tmp_path, src, env={"../x": "1"})
    with pytest.raises(Exception, match="expected a built-in name"):
        await run_build(tmp_path, src, env={"BUILDPACK_URL": "ruby"})


async def test_build_without_isolation(tmp_path: Path) -> None:
    src = write(tmp_path / "src", {"Procfile": "web: true\n"})
    result, lines = await run_build(tmp_path, src, isolation="none")
    assert result.process_types == {"web": "true"}
    assert any("without namespaces" in line for line in lines.lines)


# -- a built slug runs -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve_slug(tmp_path: Path, result: BuildResult, check: Callable[[str], bool]) -> str:
    """Unpack the slug as a host would, start its web process, return the body of GET /."""
    root = tmp_path / "host"
    slug_app = await unpack_slug(result.slug_path, root, result.digest.replace(":", "-"))
    port = free_port()
    spec = JobSpec(
        job_id="web-1",
        app_name="demo",
        app_id="app-1",
        release_id="rel-1",
        process_type="web",
        command=result.process_types["web"],
        env={},
        port=port,
        slug_dir=slug_app,
        memory_mb=512,
    )
    async with (
        open_process_backend(root, shutdown_grace_s=1.0) as backend,
        httpx.AsyncClient() as http,
    ):
        await backend.start(spec)

        async def body() -> str | None:
            try:
                r = await http.get(f"http://127.0.0.1:{port}/", timeout=2)
            except httpx.TransportError:
                return None
            return r.text if r.status_code == 200 and check(r.text) else None

        try:
            return await wait_for(body, 20, "the slug's web process to answer")
        except AssertionError:
            print("\n".join(line.text for line in backend.logs("web-1")))
            raise
        finally:
            hidden = await http.get(f"http://127.0.0.1:{port}/.profile.d/python.sh", timeout=2)
            if "static" in spec.command:
                assert hidden.status_code == 404


async def test_static_slug_serves(tmp_path: Path) -> None:
    src = write(tmp_path / "src", {"index.html": "<h1>hello static</h1>\n"})
    result, _ = await run_build(tmp_path, src)
    assert await serve_slug(tmp_path, result, lambda b: "hello static" in b)


@pytest.mark.slow
@pytest.mark.skipif(ISOLATION != "namespaces", reason="builds at /app need mount namespaces (root)")
async def test_python_slug_serves_from_its_venv(tmp_path: Path) -> None:
    env = {**LOCAL_WHEELS, "DISABLE_COLLECTSTATIC": "1"}
    # No tools lent: the stack's pip installs, aimed at the venv.
    result, lines = await run_build(tmp_path, python_app(tmp_path, django=True), env=env, tools=[])
    assert any("Successfully installed" in ln and "greet-1.0" in ln for ln in lines.lines)
    assert "./app/staticfiles" not in slug_members(result)
    assert any("Skipping collectstatic" in line for line in lines.lines)
    body = await serve_slug(tmp_path, result, lambda b: "greet" in b)
    assert body == "hello from greet on /app/.venv"


async def test_a_sandbox_left_to_the_caller_is_there_after_the_build_whether_it_failed_or_not(
    tmp_path: Path,
) -> None:
    src = write(tmp_path / "src", {"Procfile": "web: ./run\n", "run": "#!/bin/sh\n"})
    result, _ = await run_build(tmp_path, src, remove_sandbox=False)
    assert result.sandbox is not None and result.sandbox.parent == tmp_path / "work"
    assert (result.sandbox / "app" / "Procfile").is_file()  # nothing removed it
    left = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert left == sorted([result.slug_path.name, result.sandbox.name])
    shutil.rmtree(tmp_path / "work")

    empty = write(tmp_path / "empty", {"README": "nothing to build\n"})
    with pytest.raises(BuildError):
        await run_build(tmp_path, empty, remove_sandbox=False)
    [sandbox] = (tmp_path / "work").iterdir()
    assert sandbox.name.startswith("build-") and (sandbox / "app" / "README").is_file()

    # By default the builder removes it itself.
    result, _ = await run_build(tmp_path / "again", src)
    assert result.sandbox is None
