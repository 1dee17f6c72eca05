"""The docker backend against a real Docker engine, plus its pure parts.

The engine tests are marked slow and skip, saying why, when no engine answers,
unless ``FLYNNP2P_REQUIRE_DOCKER`` is set (``scripts/test`` sets it after starting
one): then a missing engine is a failure. Every container they make carries this
session's own node name, and each test's backend fixture fails the test if any of
them survives its teardown (the fixture removes them first either way).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import trio

from flynnp2p.errors import Conflict, NotFound, UserError
from flynnp2p.host.backend import JobBackend, JobSpec
from flynnp2p.host.cgroup import oom_message
from flynnp2p.host.containers import (
    DockerLogLines,
    container_args,
    container_name,
    exit_status,
    job_env,
    job_labels,
    parse_timestamp_ns,
    spec_from_container,
    stop_signal,
)
from flynnp2p.host.docker import DockerBackend, open_docker_backend
from flynnp2p.host.logs import LogLine
from flynnp2p.host.slug import unpack_slug
from flynnp2p.host.stack import ensure_stack_image
from tests.harness import wait_for
from tests.test_host_process import build_slug
from tests.test_host_process import spec as process_spec

REQUIRE_DOCKER = os.environ.get("FLYNNP2P_REQUIRE_DOCKER", "") not in ("", "0")
ADDR = "127.0.0.1"


# -- pure parts (no engine needed) ----------------------------------------------------


def make_spec(job_id: str = "job-1", command: str = "run", **kw: Any) -> JobSpec:
    """The process tests' spec, with env values that test the label round trip."""
    kw.setdefault("env", {"RELEASE_VAR": "from-release", "EMPTY": "", "WITH_EQUALS": "a=b=c"})
    return process_spec(kw.pop("slug_dir", Path("/srv/slugs/d1/app")), job_id, command, **kw)


def test_timestamps_parse_to_nanoseconds() -> None:
    assert parse_timestamp_ns("1970-01-01T00:00:01.000000002Z") == 1_000_000_002
    assert parse_timestamp_ns("2024-05-01T12:00:00.5Z") == 1_714_564_800_500_000_000
    assert parse_timestamp_ns("2024-05-01T14:00:00+02:00") == 1_714_564_800_000_000_000
    assert parse_timestamp_ns("not-a-time") is None


def test_log_records_become_lines_and_split_records_are_joined() -> None:
    lines = DockerLogLines(max_line=10)
    t1, t2, t3 = (f"1970-01-01T00:00:0{i}.000000000Z" for i in (1, 2, 3))
    assert lines.feed(f"{t1} hello\n{t2} world\n".encode()) == [
        (1_000_000_000, "hello"),
        (2_000_000_000, "world"),
    ]
    # A long line comes as records without a newline; it is joined, then split at max_line.
    assert lines.feed(f"{t1} abcdefgh".encode()) == []
    assert lines.feed(f"{t2} ijklm".encode()) == [(1_000_000_000, "abcdefghij")]
    assert lines.feed(f"{t3} n\n".encode()) == [(1_000_000_000, "klmn")]
    assert lines.feed(f"{t3} tail only".encode()) == []
    assert lines.flush() == [(3_000_000_000, "tail only")]  # the stream ended mid-line
    assert lines.flush() == []
    assert lines.feed(b"garbage without a timestamp\n") == [
        (3_000_000_000, "garbage without a timestamp")
    ]
    assert lines.feed(f"{t1} caf\u00e9 \xff\n".encode("latin-1")) == [
        (1_000_000_000, "caf\ufffd \ufffd")
    ]


@pytest.mark.parametrize(
    "spec",
    [
        make_spec(port=5000, memory_mb=128),
        make_spec(image="registry.local/web:1", slug_dir=None, command=""),
        make_spec(host_addr="127.0.0.7", port=6000, command="exec 'quoted thing' \"$X\""),
    ],
)
def test_labels_and_env_rebuild_the_spec(spec: JobSpec) -> None:
    labels = job_labels(spec, "node-a")
    env = [f"{k}={v}" for k, v in job_env(spec, in_slug=spec.image is None).items()]
    env.append("PATH=/usr/bin")  # the image's own variables are not the release's
    assert spec_from_container(labels, env) == spec
    with pytest.raises(ValueError, match="not describe"):
        spec_from_container({"flynnp2p.job": "x"}, env)


def test_container_args_for_slugs_and_images() -> None:
    slug = container_args(
        make_spec(port=5000, memory_mb=64), "node a/1", image="stack:1", app_dir=Path("/j/app")
    )
    assert slug["name"] == "flynnp2p-node_a_1-job-1"
    assert slug["command"][:2] == ["bash", "-c"] and slug["command"][-1] == "run"
    assert slug["volumes"] == {"/j/app": {"bind": "/app", "mode": "rw"}}
    assert slug["working_dir"] == "/app" and slug["init"] is True
    assert slug["ports"] == {"5000/tcp": ("127.0.0.1", 5000)}
    assert slug["mem_limit"] == slug["memswap_limit"] == "64m"
    env = slug["environment"]
    assert env["PORT"] == "5000" and env["HOST"] == "0.0.0.0" and env["HOME"] == "/app"
    assert env["RELEASE_VAR"] == "from-release" and env["JOB_ID"] == "job-1"

    image = container_args(
        make_spec(image="web:1", slug_dir=None, command=""), "n", image="web:1", app_dir=None
    )
    assert "command" not in image and "volumes" not in image and "ports" not in image
    assert "mem_limit" not in image and "HOME" not in image["environment"]
    with_cmd = container_args(
        make_spec(image="web:1", command="x y"), "n", image="web:1", app_dir=None
    )
    assert with_cmd["command"] == ["sh", "-c", "x y"]
    assert container_name("n", "j") == "flynnp2p-n-j"


def test_exit_status_and_stop_signal() -> None:
    assert exit_status({"ExitCode": 3}) == 3
    assert exit_status({"ExitCode": 137}) == -9
    assert exit_status({"ExitCode": 143}) == -15
    assert exit_status({"ExitCode": 255}) == 255
    assert exit_status({"ExitCode": 0, "OOMKilled": True}) == -9
    assert stop_signal(None) == stop_signal("") == signal.SIGTERM
    assert stop_signal("SIGQUIT") == stop_signal("QUIT") == stop_signal("3") == signal.SIGQUIT
    assert stop_signal("SIGBOGUS") == signal.SIGTERM


# -- against a real engine --------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as e:
        if REQUIRE_DOCKER:
            pytest.fail(f"FLYNNP2P_REQUIRE_DOCKER is set but no Docker engine answers: {e}")
        pytest.skip(
            f"no Docker engine reachable ({e}); set FLYNNP2P_REQUIRE_DOCKER=1 to fail instead"
        )
    yield client
    client.close()


def remove_containers(client: Any, node: str) -> list[str]:
    """Force-remove every container of ``node``; return the names that were there."""
    found = client.containers.list(all=True, filters={"label": f"flynnp2p.node={node}"})
    for c in found:
        c.remove(force=True)
    return sorted(c.name for c in found)


@pytest.fixture(scope="session")
def node(docker_client: Any) -> Iterator[str]:
    name = f"test-{os.getpid()}-{secrets.token_hex(3)}"
    yield name
    remove_containers(docker_client, name)


@pytest.fixture(scope="session")
def stack_image(docker_client: Any) -> str:
    t0 = time.monotonic()
    tag = trio.run(ensure_stack_image)
    print(f"\nstack image {tag} ready in {time.monotonic() - t0:.2f}s")
    return tag


@pytest.fixture
async def slug_app(tmp_path: Path) -> Path:
    return await unpack_slug(build_slug(tmp_path / "slug.tgz"), tmp_path / "root", "sha256-abc")


@pytest.fixture
def seen() -> list[tuple[str, LogLine]]:
    return []


@pytest.fixture
async def backend(
    tmp_path: Path,
    node: str,
    stack_image: str,
    docker_client: Any,
    seen: list[tuple[str, LogLine]],
) -> AsyncIterator[DockerBackend]:
    try:
        async with open_docker_backend(
            tmp_path / "root",
            node,
            stack_image=stack_image,
            shutdown_grace_s=2.0,
            on_lines=lambda spec, lines: seen.extend((spec.job_id, ln) for ln in lines),
        ) as b:
            yield b
    finally:
        leaked = remove_containers(docker_client, node)
    assert not leaked, f"containers left behind: {leaked}"


def spec(slug_app: Path | None, job_id: str, command: str, **kw: Any) -> JobSpec:
    return make_spec(job_id, command, slug_dir=slug_app, env={"RELEASE_VAR": "from-release"}, **kw)


def free_port(addr: str = ADDR) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def texts(b: DockerBackend, job_id: str) -> list[tuple[str, str]]:
    return [(ln.stream, ln.text) for ln in b.logs(job_id)]


async def http_get(addr: str, port: int, path: str) -> bytes | None:
    """The raw response, or None while nothing answers (docker-proxy accepts, then closes)."""
    try:
        stream = await trio.open_tcp_stream(addr, port)
    except OSError:
        return None
    async with stream:
        try:
            await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            return None
    return data or None


def containers_named(client: Any, name: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"name": f"^/{name}$"}))


@pytest.mark.slow
async def test_slug_app_answers_on_host_addr_and_port(
    backend: DockerBackend, slug_app: Path
) -> None:
    _: JobBackend = backend  # the docker backend satisfies the seam
    port = free_port()
    t0 = trio.current_time()
    job = await backend.start(spec(slug_app, "job-web", "python3 -m http.server $PORT", port=port))
    started = trio.current_time()
    data = await wait_for(lambda: http_get(ADDR, port, "/index.html"), 20, "the app to answer")
    answered = trio.current_time()
    print(f"\nstart() {started - t0:.2f}s, start() to HTTP 200 {answered - t0:.2f}s")
    assert data.startswith(b"HTTP/1.0 200") and b"hello from the slug" in data
    assert job.pid > 0 and job.app_dir is None
    await wait_for(
        lambda: any("GET /index.html" in t for s, t in texts(backend, "job-web") if s == "stderr"),
        5,
        "the request in the job's stderr",
    )
    await backend.stop("job-web", grace_s=5.0)
    assert trio.current_time() - answered < 4  # SIGTERM ended it; no waiting for SIGKILL
    assert await backend.wait("job-web") == -signal.SIGTERM


@pytest.mark.slow
async def test_env_logs_exit_code_and_cleanup(
    backend: DockerBackend,
    slug_app: Path,
    docker_client: Any,
    seen: list[tuple[str, LogLine]],
) -> None:
    await backend.start(
        spec(
            slug_app,
            "job-env",
            'echo "$GREETING $PORT $HOST $JOB_ID $APP_NAME $RELEASE_VAR $HOME $PROCESS_TYPE";'
            " echo oops >&2; pwd; exit 3",
            port=free_port(),
        )
    )
    assert await backend.wait("job-env") == 3
    port = backend._jobs["job-env"].spec.port
    logs = texts(backend, "job-env")
    assert ("stdout", f"hi {port} 0.0.0.0 job-env demo from-release /app web") in logs
    assert ("stderr", "oops") in logs and ("stdout", "/app") in logs
    now_ms = time.time_ns() // 1_000_000
    assert all(now_ms - 60_000 < ln.ts_ms <= now_ms for ln in backend.logs("job-env"))
    assert [(j, ln.stream, ln.text) for j, ln in seen if ln.text == "oops"] == [
        ("job-env", "stderr", "oops")
    ]
    app_log = (backend.root_dir / "logs" / "demo.log").read_text()
    assert '"stream": "stderr", "text": "oops"' in app_log
    # An exited job's container and working copy are gone once wait() has the status.
    assert containers_named(docker_client, container_name(backend.node, "job-env")) == []
    assert not (backend.root_dir / "jobs" / "job-env").exists()


@pytest.mark.slow
async def test_an_image_runs_as_it_is(backend: DockerBackend, stack_image: str) -> None:
    await backend.start(
        spec(
            None,
            "job-image",
            'test -d /app && echo has-app || echo no-app; echo "home=$HOME";'
            " python3 -c 'import ssl, sqlite3, json, http.server, decimal; print(\"py-ok\")';"
            " exit 5",
            image=stack_image,
        )
    )
    assert await backend.wait("job-image") == 5
    assert ("stdout", "no-app") in texts(backend, "job-image")
    assert ("stdout", "py-ok") in texts(backend, "job-image")  # the stack's stdlib works ...
    assert [t for s, t in texts(backend, "job-image") if s == "stderr"] == []  # ... quietly
    assert ("stdout", "home=") not in texts(backend, "job-image")  # HOME is the image's
    await backend.start(spec(None, "job-default", "", image=stack_image))
    assert await backend.wait("job-default") == 0  # the image's CMD: bash, with no input


@pytest.mark.slow
async def test_a_missing_image_is_a_user_error(backend: DockerBackend) -> None:
    with pytest.raises(UserError, match="no registry"):
        await backend.start(spec(None, "job-noimg", "true", image="flynnp2p/no-such-image:0"))
    with pytest.raises(NotFound):
        backend.logs("job-noimg")


@pytest.mark.slow
async def test_a_taken_port_is_a_conflict(backend: DockerBackend, slug_app: Path) -> None:
    with socket.socket() as taken:
        taken.bind((ADDR, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Conflict, match="already in use"):
            await backend.start(spec(slug_app, "job-port", "sleep 1000", port=port))
    # The container that could not start is gone (the fixture checks), and the id is free.
    await backend.start(spec(slug_app, "job-port", "exit 0", port=free_port()))
    assert await backend.wait("job-port") == 0


@pytest.mark.slow
async def test_death_by_signal_is_negative(backend: DockerBackend, slug_app: Path) -> None:
    await backend.start(spec(slug_app, "job-sig", "kill -KILL $$"))
    assert await backend.wait("job-sig") == -signal.SIGKILL


@pytest.mark.slow
async def test_stop_lets_a_job_finish_within_the_grace(
    backend: DockerBackend, slug_app: Path
) -> None:
    await backend.start(
        spec(
            slug_app,
            "job-grace",
            "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
        )
    )
    await wait_for(lambda: ("stdout", "ready") in texts(backend, "job-grace"), 10, "ready")
    t0 = trio.current_time()
    await backend.stop("job-grace", grace_s=10.0)
    assert trio.current_time() - t0 < 5
    assert await backend.wait("job-grace") == 0
    assert ("stdout", "got-term") in texts(backend, "job-grace")


@pytest.mark.slow
async def test_stop_kills_after_the_grace(backend: DockerBackend, slug_app: Path) -> None:
    await backend.start(
        spec(slug_app, "job-stubborn", "trap '' TERM; echo ready; while true; do sleep 0.05; done")
    )
    await wait_for(lambda: ("stdout", "ready") in texts(backend, "job-stubborn"), 10, "ready")
    t0 = trio.current_time()
    await backend.stop("job-stubborn", grace_s=1.0)
    elapsed = trio.current_time() - t0
    assert 1.0 <= elapsed < 4.0
    assert await backend.wait("job-stubborn") == -signal.SIGKILL


@pytest.mark.slow
async def test_signal_reaches_the_job(backend: DockerBackend, slug_app: Path) -> None:
    await backend.start(
        spec(
            slug_app,
            "job-usr1",
            "trap 'echo got-usr1' USR1; echo ready; while true; do sleep 0.05; done",
        )
    )
    await wait_for(lambda: ("stdout", "ready") in texts(backend, "job-usr1"), 10, "ready")
    backend.signal("job-usr1", signal.SIGUSR1)
    await wait_for(lambda: ("stdout", "got-usr1") in texts(backend, "job-usr1"), 10, "got-usr1")
    await backend.stop("job-usr1", grace_s=5.0)
    assert await backend.wait("job-usr1") == -signal.SIGTERM  # bash dies of an untrapped TERM


@pytest.mark.slow
async def test_memory_limit_is_set_and_enforced(
    backend: DockerBackend, slug_app: Path, docker_client: Any
) -> None:
    await backend.start(spec(slug_app, "job-mem-set", "sleep 1000", memory_mb=64))
    attrs = docker_client.api.inspect_container(container_name(backend.node, "job-mem-set"))
    assert attrs["HostConfig"]["Memory"] == 64 * 1024 * 1024
    await backend.stop("job-mem-set", grace_s=5.0)
    await backend.start(
        spec(slug_app, "job-mem", "python3 -c 'x = b\"x\" * (256 * 1024 * 1024)'", memory_mb=64)
    )
    assert await backend.wait("job-mem") == -signal.SIGKILL  # the OOM killer
    # ... and says so, as the process backend does (the job's reason and its log)
    assert backend.exit_reason("job-mem") == oom_message(64 << 20)
    assert backend.logs("job-mem")[-1].text == f"flynnp2p: {oom_message(64 << 20)}"


@pytest.mark.slow
async def test_ids_conflict_while_running_and_restart_after_exit(
    backend: DockerBackend, slug_app: Path
) -> None:
    await backend.start(spec(slug_app, "job-dup", "echo first; sleep 1000"))
    with pytest.raises(Conflict):
        await backend.start(spec(slug_app, "job-dup", "true"))
    with pytest.raises(NotFound):
        backend.logs("no-such-job")
    with pytest.raises(NotFound):
        backend.signal("no-such-job", signal.SIGTERM)
    with pytest.raises(NotFound):
        await backend.wait("no-such-job")
    with pytest.raises(NotFound):
        await backend.stop("no-such-job")
    with pytest.raises(UserError, match="job id"):
        await backend.start(spec(slug_app, "../escape", "true"))
    await backend.stop("job-dup", grace_s=5.0)
    await backend.start(spec(slug_app, "job-dup", "echo second"))
    assert await backend.wait("job-dup") == 0
    assert texts(backend, "job-dup") == [("stdout", "second")]


@pytest.mark.slow
async def test_recover_readopts_running_containers_and_removes_exited_ones(
    tmp_path: Path, node: str, stack_image: str, slug_app: Path, docker_client: Any
) -> None:
    root = tmp_path / "root"
    port = free_port()
    web = spec(slug_app, "job-keep", "python3 -m http.server $PORT", port=port, memory_mb=128)
    try:
        # The first agent run: starts two jobs, then goes away without stopping them.
        async with open_docker_backend(
            root, node, stack_image=stack_image, stop_jobs_on_exit=False
        ) as first:
            await first.start(web)
            await wait_for(lambda: http_get(ADDR, port, "/index.html"), 20, "the app to answer")
            await first.start(spec(slug_app, "job-done", "sleep 2; exit 4"))
        with pytest.raises(trio.ClosedResourceError):
            await first.wait("job-keep")
        done = container_name(node, "job-done")
        await wait_for(
            lambda: [c for c in containers_named(docker_client, done) if c.status == "exited"],
            20,
            "the short job's container to exit",
        )
        # The next agent run re-adopts the running job and cleans up the exited one.
        async with open_docker_backend(root, node, stack_image=stack_image) as second:
            assert await second.recover() == [web]
            assert containers_named(docker_client, done) == []
            assert not (root / "jobs" / "job-done").exists()
            assert await second.recover() == []  # idempotent: already ours
            data = await http_get(ADDR, port, "/index.html")
            assert data is not None and b"hello from the slug" in data
            await wait_for(
                lambda: any("GET /index.html" in t for _, t in texts(second, "job-keep")),
                10,
                "the new request in the re-adopted job's logs",
            )
            await second.stop("job-keep", grace_s=5.0)
            assert await second.wait("job-keep") == -signal.SIGTERM
    finally:
        leaked = remove_containers(docker_client, node)
    assert not leaked, f"containers left behind: {leaked}"
