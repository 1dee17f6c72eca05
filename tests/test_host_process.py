"""The process backend against real processes (bash, python, sleep) in tmp dirs."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import signal
import socket
import sys
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from flynnp2p.errors import Conflict, NotFound, UserError
from flynnp2p.host.backend import JobBackend, JobSpec
from flynnp2p.host.process import ProcessBackend, app_uid, open_process_backend
from flynnp2p.host.slug import SlugError, prepare_job_dir, unpack_slug
from tests.harness import gone_or_zombie, wait_for

# The system's python: isolated jobs (the agent is root) cannot reach a venv under /root.
PY = shlex.quote(shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable)


def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def build_slug(path: Path, extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for d in ("./app", "./app/.profile.d"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        add_file(tar, "./app/.profile.d/env.sh", b"export GREETING=hi\n")
        add_file(tar, "./app/index.html", b"hello from the slug\n")
        if extra is not None:
            extra(tar)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def slug_app(tmp_path: Path) -> Path:
    return await unpack_slug(build_slug(tmp_path / "slug.tgz"), tmp_path / "root", "sha256-abc")


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[ProcessBackend]:
    async with open_process_backend(tmp_path / "root", shutdown_grace_s=1.0) as b:
        yield b


def spec(slug_app: Path, job_id: str, command: str, **kw: object) -> JobSpec:
    fields: dict[str, object] = dict(
        job_id=job_id,
        app_name="demo",
        app_id="app-1",
        release_id="rel-1",
        process_type="web",
        command=command,
        env={"RELEASE_VAR": "from-release"},
        port=None,
        slug_dir=slug_app,
        memory_mb=0,
    )
    fields.update(kw)
    return JobSpec(**fields)  # type: ignore[arg-type]


def texts(b: ProcessBackend, job_id: str) -> list[tuple[str, str]]:
    return [(ln.stream, ln.text) for ln in b.logs(job_id)]


def child_pid(b: ProcessBackend, job_id: str) -> int | None:
    """The pid a job printed as ``child=<pid>``, once it has."""
    for _, text in texts(b, job_id):
        if text.startswith("child="):
            return int(text.removeprefix("child="))
    return None


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_env_profile_d_and_logs_with_stream_names(
    backend: ProcessBackend, slug_app: Path
) -> None:
    _: JobBackend = backend  # the process backend satisfies the seam
    job = await backend.start(
        spec(
            slug_app,
            "job-env",
            'echo "$GREETING $PORT $JOB_ID $APP_NAME $RELEASE_VAR $HOME"; echo oops >&2; pwd',
            port=5555,
        )
    )
    assert await backend.wait("job-env") == 0
    logs = texts(backend, "job-env")
    # in its own mount namespace, the job sees its copy on /app (as on Heroku)
    app_dir = "/app" if backend.isolation == "namespaces" else str(job.app_dir)
    assert ("stdout", f"hi 5555 job-env demo from-release {app_dir}") in logs
    assert ("stderr", "oops") in logs
    assert ("stdout", app_dir) in logs
    assert job.app_dir != slug_app and (job.app_dir / "index.html").exists()
    assert all(ln.ts_ms > 0 for ln in backend.logs("job-env"))
    app_log = (backend.root_dir / "logs" / "demo.log").read_text()
    assert '"stream": "stderr", "text": "oops"' in app_log


async def test_http_server_answers_on_port(backend: ProcessBackend, slug_app: Path) -> None:
    port = free_port()
    await backend.start(
        spec(slug_app, "job-web", f"{PY} -m http.server $PORT --bind 127.0.0.1", port=port)
    )
    with trio.fail_after(5):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                break
            except OSError:
                await trio.sleep(0.05)
    async with stream:
        await stream.send_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    assert data.startswith(b"HTTP/1.0 200") and b"hello from the slug" in data
    await backend.stop("job-web", grace_s=2.0)
    assert await backend.wait("job-web") == -15


async def test_exit_status_is_propagated(backend: ProcessBackend, slug_app: Path) -> None:
    await backend.start(spec(slug_app, "job-exit", "exit 3"))
    assert await backend.wait("job-exit") == 3


async def test_stop_terminates_the_whole_process_group(
    backend: ProcessBackend, slug_app: Path
) -> None:
    # The child records that SIGTERM reached it, so signalling only the main process
    # (and SIGKILLing leftovers later) would fail this test.
    job = await backend.start(
        spec(
            slug_app,
            "job-tree",
            # The child says its pid once its trap is set (the parent's $! could be
            # read before it is, and a SIGTERM then would find no trap).
            "(trap 'touch child-got-term; exit 0' TERM; echo child=$BASHPID; sleep 1000 & wait) & wait",
        )
    )
    child = await wait_for(lambda: child_pid(backend, "job-tree"), 5, "the child's pid", 0.02)
    assert alive(child)
    await backend.stop("job-tree", grace_s=2.0)
    await wait_for(lambda: not alive(child), 2, "the child to die", 0.02)
    assert (job.app_dir / "child-got-term").exists()


async def test_leftover_children_are_killed_when_main_exits(
    backend: ProcessBackend, slug_app: Path
) -> None:
    await backend.start(spec(slug_app, "job-orphan", "sleep 1000 & echo child=$!"))
    assert await backend.wait("job-orphan") == 0
    child = child_pid(backend, "job-orphan")
    assert child is not None
    await wait_for(lambda: not alive(child), 2, "the leftover child to die", 0.02)


async def test_sigterm_ignoring_job_is_killed_after_grace(
    backend: ProcessBackend, slug_app: Path
) -> None:
    await backend.start(
        spec(slug_app, "job-stubborn", "trap '' TERM; echo ready; while true; do sleep 0.05; done")
    )
    await wait_for(lambda: ("stdout", "ready") in texts(backend, "job-stubborn"), 5, "ready", 0.02)
    t0 = trio.current_time()
    await backend.stop("job-stubborn", grace_s=0.5)
    elapsed = trio.current_time() - t0
    assert 0.5 <= elapsed < 1.5
    assert await backend.wait("job-stubborn") == -9


async def test_memory_limit_is_enforced(tmp_path: Path, slug_app: Path) -> None:
    # RLIMIT_AS, the fallback without a usable memory cgroup (tests/test_host_cgroup.py
    # has the cgroup limit): the allocation fails in the program.
    backend = ProcessBackend(tmp_path / "root", shutdown_grace_s=1.0, cgroups=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        assert backend.memory_limits == "rlimit"
        await backend.start(
            spec(slug_app, "job-mem", f"{PY} -c 'x = bytearray(400 * 1024 * 1024)'", memory_mb=200)
        )
        assert await backend.wait("job-mem") != 0
        assert any("MemoryError" in t for s, t in texts(backend, "job-mem") if s == "stderr")
        assert backend.exit_reason("job-mem") is None
        nursery.cancel_scope.cancel()


async def test_duplicate_and_unknown_job_ids(backend: ProcessBackend, slug_app: Path) -> None:
    await backend.start(spec(slug_app, "job-dup", "exit 0"))
    with pytest.raises(Conflict):
        await backend.start(spec(slug_app, "job-dup", "exit 0"))
    with pytest.raises(NotFound):
        backend.logs("no-such-job")
    with pytest.raises(UserError, match="job id"):
        await backend.start(spec(slug_app, "../escape", "exit 0"))
    assert await backend.wait("job-dup") == 0


async def test_leaving_the_backend_stops_running_jobs(tmp_path: Path, slug_app: Path) -> None:
    async with open_process_backend(tmp_path / "root", shutdown_grace_s=0.5) as b:
        job = await b.start(spec(slug_app, "job-left", "sleep 1000"))
    assert not alive(job.pid)


# -- slugs ----------------------------------------------------------------------------


async def test_unpack_is_once_per_digest_and_job_copy_is_separate(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tarball = build_slug(tmp_path / "s.tgz")
    app = await unpack_slug(tarball, root, "d1")
    assert app == root / "slugs" / "d1" / "app"
    assert (app / ".profile.d" / "env.sh").read_text() == "export GREETING=hi\n"
    (app / "marker").write_text("kept")
    assert await unpack_slug(tarball, root, "d1") == app
    assert (app / "marker").exists()  # not unpacked a second time
    job_app = await prepare_job_dir(app, root, "j1")
    assert job_app == root / "jobs" / "j1" / "app"
    (job_app / "index.html").write_text("changed by the job")
    assert (app / "index.html").read_text() == "hello from the slug\n"


@pytest.mark.parametrize(
    ("name", "kind", "target"),
    [
        ("../evil", tarfile.REGTYPE, ""),
        ("./app/../../evil", tarfile.REGTYPE, ""),
        ("/etc/evil", tarfile.REGTYPE, ""),
        ("./other/file", tarfile.REGTYPE, ""),
        ("./app/link", tarfile.SYMTYPE, "../../outside"),
        ("./app/abslink", tarfile.SYMTYPE, "/etc/passwd"),
        ("./app/hard", tarfile.LNKTYPE, "../etc/passwd"),
        ("./app/dev", tarfile.CHRTYPE, ""),
        ("./app/fifo", tarfile.FIFOTYPE, ""),
    ],
)
async def test_unsafe_slugs_are_rejected(
    tmp_path: Path, name: str, kind: bytes, target: str
) -> None:
    def evil(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = target
        tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)

    root = tmp_path / "root"
    with pytest.raises(SlugError):
        await unpack_slug(build_slug(tmp_path / "evil.tgz", evil), root, "bad")
    assert not (root / "slugs" / "bad").exists()
    assert os.listdir(root / "slugs") == []
    assert not (tmp_path / "evil").exists()


async def test_links_that_pass_the_check_one_by_one_but_escape_together_are_stopped(
    tmp_path: Path,
) -> None:
    """Checked a member at a time, each link stays inside the slug on paper; the data
    filter, extracting in the same pass, sees the chain leave it: nothing installed."""

    def chain(tar: tarfile.TarFile) -> None:
        for name, target in (("./app/up", ".."), ("./app/out", "up/..")):
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
        add_file(tar, "./app/out/escaped", b"outside\n")

    root = tmp_path / "root"
    with pytest.raises(SlugError):
        await unpack_slug(build_slug(tmp_path / "chain.tgz", chain), root, "chain")
    assert os.listdir(root / "slugs") == []
    assert not (root / "escaped").exists() and not (tmp_path / "escaped").exists()


async def test_a_truncated_slug_installs_nothing(tmp_path: Path) -> None:
    whole = build_slug(tmp_path / "s.tgz").read_bytes()
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(whole[: len(whole) // 2])
    root = tmp_path / "root"
    with pytest.raises(SlugError, match="not a readable"):
        await unpack_slug(cut, root, "cut")
    assert os.listdir(root / "slugs") == []


async def test_safe_relative_symlink_is_allowed(tmp_path: Path) -> None:
    def link(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("./app/alias.html")
        info.type = tarfile.SYMTYPE
        info.linkname = "index.html"
        tar.addfile(info)

    app = await unpack_slug(build_slug(tmp_path / "s.tgz", link), tmp_path / "root", "ok")
    assert (app / "alias.html").read_text() == "hello from the slug\n"


async def test_garbage_is_not_a_slug(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(SlugError, match="not a readable"):
        await unpack_slug(bad, tmp_path / "root", "garbage")


@pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs root")
async def test_as_root_jobs_run_as_their_apps_uid_in_their_own_namespaces(
    backend: ProcessBackend, slug_app: Path
) -> None:
    assert backend.isolation in ("namespaces", "user")
    uid = app_uid("app-1")
    job = await backend.start(
        spec(slug_app, "job-iso", 'id -u; id -g; id -G; touch made-here; cat /proc/self/status | grep CapEff')
    )
    assert await backend.wait("job-iso") == 0
    out = [t for _, t in texts(backend, "job-iso")]
    assert out[:3] == [str(uid), str(uid), str(uid)]  # no supplementary groups
    assert out[3].split() == ["CapEff:", "0000000000000000"]
    assert job.app_dir is not None and (job.app_dir / "made-here").stat().st_uid == uid
    assert app_uid("app-2") != uid  # another app, another uid
    if backend.isolation == "namespaces":
        assert not Path("/app/made-here").exists(), "the bind mount must not leak to the host"


PRELOAD_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void seen(void) {
    const char *log = getenv("PRELOAD_LOG");
    FILE *f = log ? fopen(log, "a") : NULL;
    if (f) { fprintf(f, "%d\n", (int)getuid()); fclose(f); }
}
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs root")
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the preload library")
async def test_an_apps_env_never_reaches_the_root_stages(backend: ProcessBackend, slug_app: Path) -> None:
    """An app's LD_PRELOAD runs in its job, as its uid, and in no process that runs as root."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="flynnp2p-preload-") as d:
        os.chmod(d, 0o777)  # the job's uid writes its line here
        (Path(d) / "seen.c").write_text(PRELOAD_C)
        lib, log = Path(d) / "seen.so", Path(d) / "log"
        done = await trio.run_process(
            ["cc", "-shared", "-fPIC", "-o", str(lib), str(Path(d) / "seen.c")], check=False
        )
        assert done.returncode == 0
        job_env = {"LD_PRELOAD": str(lib), "PRELOAD_LOG": str(log)}
        await backend.start(spec(slug_app, "job-preload", "exec /bin/true", env=job_env))
        assert await backend.wait("job-preload") == 0
        uids = log.read_text().split()
        assert str(app_uid("app-1")) in uids  # the job got its env
        assert "0" not in uids, uids  # and nothing that ran as root did


async def test_forget_drops_an_exited_job_and_its_copy(backend: ProcessBackend, slug_app: Path) -> None:
    job = await backend.start(spec(slug_app, "job-gone", "sleep 30"))
    assert job.app_dir is not None and job.app_dir.exists()
    backend.forget("job-gone")  # still running: nothing happens
    assert job.app_dir.exists()
    await backend.stop("job-gone", grace_s=1)
    backend.forget("job-gone")
    assert not job.app_dir.parent.exists()
    with pytest.raises(NotFound):
        backend.logs("job-gone")
    again = await backend.start(spec(slug_app, "job-gone", "exit 0"))  # the id can run again
    assert await backend.wait("job-gone") == 0 and again.pid != job.pid


async def test_jobs_die_with_a_killed_agent(tmp_path: Path) -> None:
    """A SIGKILLed agent takes its jobs along (the parent-death signal), though they
    run in sessions of their own."""
    slug = build_slug(tmp_path / "slug.tgz")
    script = f"""
import os, signal, sys, trio
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pathlib import Path
from flynnp2p.host.backend import JobSpec
from flynnp2p.host.process import open_process_backend
from flynnp2p.host.slug import unpack_slug

async def main():
    root = Path({str(tmp_path / "root")!r})
    app = await unpack_slug(Path({str(slug)!r}), root, "sha256-x")
    async with open_process_backend(root) as backend:
        job = await backend.start(JobSpec("j1", "demo", "app-1", "r1", "web", "sleep 300",
                                          {{}}, None, app, 0))
        print(job.pid, flush=True)
        await trio.sleep(12)  # longer than trio keeps an idle worker thread
        os.kill(os.getpid(), signal.SIGKILL)

trio.run(main)
"""
    with trio.fail_after(60):
        agent = await trio.run_process(
            [sys.executable, "-c", script], capture_stdout=True, capture_stderr=True, check=False
        )
    assert agent.returncode == -signal.SIGKILL, agent.stderr.decode()
    pid = int(agent.stdout.split()[0])
    await wait_for(lambda: gone_or_zombie(pid), 5, "the job to die with its agent", interval=0.05)
    # The next run on that data dir removes what the killed one left (its memory cgroups).
    async with open_process_backend(tmp_path / "root"):
        pass

