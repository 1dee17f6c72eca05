"""Memory cgroups (``host.cgroup``): the controller finder over fake /proc and /sys
trees, then real jobs and builds held to their limits by the kernel (root, where
this host has a usable memory controller)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import pytest
import trio

from flynnp2p.build.sandbox import open_sandbox
from flynnp2p.host.cgroup import (
    Controller,
    MemoryGroups,
    agent_parent_name,
    build_group_sync,
    find_controller,
    group_name,
    parse_mountinfo,
    parse_proc_cgroup,
    sweep_sync,
)
from flynnp2p.host.process import ProcessBackend, detect_isolation
from flynnp2p.host.slug import unpack_slug
from tests.harness import gone_or_zombie
from tests.test_host_process import PY, add_file, build_slug, spec, texts

MiB = 1024 * 1024

# -- the finder, over fake trees -------------------------------------------------------

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUP = "4:memory:/box/agent\n2:cpu,cpuacct:/\n0::/\n"


def fake_root(tmp: Path, mountinfo: str, proc_cgroup: str, files: dict[str, str]) -> Path:
    root = tmp / "fake"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/self/cgroup").write_text(proc_cgroup)
    for name, text in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_parse_mountinfo_and_proc_cgroup() -> None:
    mounts = parse_mountinfo(
        V1_MOUNTINFO + "50 31 0:40 /sub /mnt/with\\040space rw - cgroup2 cgroup2 rw\n"
    )
    assert [(m.fstype, m.mount_point) for m in mounts] == [
        ("cgroup", "/sys/fs/cgroup/cpu,cpuacct"),
        ("cgroup", "/sys/fs/cgroup/memory"),
        ("cgroup2", "/sys/fs/cgroup/unified"),
        ("cgroup2", "/mnt/with space"),
    ]
    assert "memory" in mounts[1].options and "cpuacct" in mounts[0].options
    assert mounts[3].root == "/sub"
    assert parse_proc_cgroup(V1_CGROUP) == {
        "memory": "/box/agent", "cpu": "/", "cpuacct": "/", "": "/",
    }  # fmt: skip


def test_v1_memory_is_found_in_the_agents_own_group(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V1_MOUNTINFO, V1_CGROUP, {
        "/sys/fs/cgroup/memory/box/agent/memory.limit_in_bytes": "9223372036854771712\n",
        "/sys/fs/cgroup/unified/cgroup.controllers": "hugetlb\n",
        "/sys/fs/cgroup/unified/cgroup.subtree_control": "\n",
    })  # fmt: skip
    found = find_controller(root)
    assert found == Controller(1, root / "sys/fs/cgroup/memory/box/agent")


def test_v2_with_memory_enabled_below_the_agent_comes_first(tmp_path: Path) -> None:
    files = {
        "/sys/fs/cgroup/memory/box/agent/memory.limit_in_bytes": "max\n",
        "/sys/fs/cgroup/unified/svc/cgroup.controllers": "cpu memory pids\n",
        "/sys/fs/cgroup/unified/svc/cgroup.subtree_control": "memory\n",
    }
    root = fake_root(tmp_path, V1_MOUNTINFO, "4:memory:/box/agent\n0::/svc\n", files)
    assert find_controller(root) == Controller(2, root / "sys/fs/cgroup/unified/svc")


def test_v2_root_may_enable_memory_itself_a_non_root_group_may_not(tmp_path: Path) -> None:
    mountinfo = "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    files = {
        "/sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
        "/sys/fs/cgroup/cgroup.subtree_control": "\n",
        "/sys/fs/cgroup/svc/cgroup.controllers": "cpu memory\n",
        "/sys/fs/cgroup/svc/cgroup.subtree_control": "cpu\n",
    }
    at_root = fake_root(tmp_path / "a", mountinfo, "0::/\n", files)
    assert find_controller(at_root) == Controller(2, at_root / "sys/fs/cgroup", is_root=True)
    in_svc = fake_root(tmp_path / "b", mountinfo, "0::/svc\n", files)
    reason = find_controller(in_svc)
    assert isinstance(reason, str) and "memory is not enabled below" in reason


def test_no_usable_controller_says_why(tmp_path: Path) -> None:
    # v2 without the memory controller and no v1 memory mount: the RLIMIT_AS fallback.
    mountinfo = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    root = fake_root(tmp_path / "a", mountinfo, "0::/\n", {
        "/sys/fs/cgroup/unified/cgroup.controllers": "hugetlb\n",
    })  # fmt: skip
    reason = find_controller(root)
    assert isinstance(reason, str) and "no memory controller" in reason
    bare = fake_root(tmp_path / "b", "22 1 0:5 / /proc rw - proc proc rw\n", "0::/\n", {})
    assert find_controller(bare) == "no cgroup memory controller is mounted"
    # the agent's group outside what a bind mount shows
    outside = fake_root(tmp_path / "c", "35 31 0:32 /other /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
                        "4:memory:/box/agent\n", {})  # fmt: skip
    assert isinstance(find_controller(outside), str)
    assert isinstance(find_controller(tmp_path / "nothing"), str)


def test_group_names_are_safe_directory_names() -> None:
    assert group_name("node-1.local") == "node-1.local"
    assert group_name("../x y") == ".._x_y"
    assert group_name("..") == "_.."
    assert len(group_name("n" * 500)) == 200


# -- real groups -------------------------------------------------------------------------

FOUND = find_controller() if os.geteuid() == 0 else "not root"
needs_cgroup = pytest.mark.skipif(
    isinstance(FOUND, str), reason=f"no usable memory cgroup here: {FOUND}"
)


def controller() -> Controller:
    assert not isinstance(FOUND, str)
    return FOUND


def allocate(mb: int) -> str:
    # Touches every page (bytes * n writes them): the charge is real, not just mapped.
    return f'{PY} -c \'b = b"x" * ({mb} * 1024 * 1024); print("allocated", len(b) >> 20)\''


@pytest.fixture
async def cg_backend(tmp_path: Path) -> AsyncIterator[ProcessBackend]:
    backend = ProcessBackend(
        tmp_path / "root", shutdown_grace_s=1.0, node_name=f"test-{uuid.uuid4().hex[:8]}"
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        yield backend
        nursery.cancel_scope.cancel()


@pytest.fixture
async def slug_app(tmp_path: Path) -> Path:
    return await unpack_slug(build_slug(tmp_path / "slug.tgz"), tmp_path / "root", "sha256-abc")


def parent_of(backend: ProcessBackend) -> Path:
    assert backend.memory_groups is not None
    return backend.memory_groups.parent


@needs_cgroup
async def test_a_job_over_its_cgroup_limit_is_killed_and_says_out_of_memory(
    cg_backend: ProcessBackend, slug_app: Path, tmp_path: Path
) -> None:
    assert cg_backend.memory_limits == f"cgroup v{controller().version}"
    parent = parent_of(cg_backend)
    await cg_backend.start(spec(slug_app, "job-big", allocate(200), memory_mb=64))
    assert (parent / "job-big").is_dir()  # the job's group, while it runs
    assert await cg_backend.wait("job-big") == -signal.SIGKILL
    reason = cg_backend.exit_reason("job-big")
    assert reason is not None and reason.startswith("out of memory") and "64 MiB" in reason
    assert ("stderr", f"flynnp2p: {reason}") in texts(cg_backend, "job-big")
    assert reason in (tmp_path / "root" / "logs" / "demo.log").read_text()
    assert not (parent / "job-big").exists()  # removed once the job is reaped


@needs_cgroup
async def test_a_job_within_its_limit_lives_and_its_group_goes(
    cg_backend: ProcessBackend, slug_app: Path
) -> None:
    parent = parent_of(cg_backend)
    # No RLIMIT_AS under a cgroup: the address space is not what is limited.
    await cg_backend.start(spec(slug_app, "job-small", f"ulimit -v; {allocate(20)}", memory_mb=64))
    assert await cg_backend.wait("job-small") == 0
    assert cg_backend.exit_reason("job-small") is None
    assert texts(cg_backend, "job-small") == [("stdout", "unlimited"), ("stdout", "allocated 20")]
    assert not (parent / "job-small").exists()


@needs_cgroup
async def test_a_job_whose_child_is_oom_killed_says_so_and_leftovers_are_killed(
    cg_backend: ProcessBackend, slug_app: Path
) -> None:
    # The kill hits the child; the shell goes on and exits 0, but the reason tells.
    # A daemon that left the job's process group is still in its cgroup: killed.
    cmd = f"setsid sleep 300 & echo daemon=$!; {allocate(200)}; echo after"
    await cg_backend.start(spec(slug_app, "job-child", cmd, memory_mb=64))
    assert await cg_backend.wait("job-child") == 0
    assert (cg_backend.exit_reason("job-child") or "").startswith("out of memory")
    lines = texts(cg_backend, "job-child")
    assert ("stdout", "after") in lines
    daemon = next(int(t.split("=")[1]) for _, t in lines if t.startswith("daemon="))
    assert gone_or_zombie(daemon)


DEAD = 2**22 + 1  # above the kernel's pid_max: never a live pid


@needs_cgroup
async def test_the_next_run_removes_what_a_killed_agent_left(tmp_path: Path) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    base = controller().group
    # An earlier run of this agent (same node and data dir, another pid), with a
    # process still in its job's group...
    earlier = MemoryGroups(controller(), agent_parent_name(name, tmp_path / "root"), pid=DEAD)
    earlier.open_sync()
    left = earlier.create_sync("job-left", 64 * MiB)
    sleeper = subprocess.Popen(["sleep", "300"], preexec_fn=left.join)
    # ...a build and an agent's jobs of agent processes that are gone, and the
    # groups of a live one (this process), which stay.
    gone_build = base / f"flynnp2p-build-{DEAD}-build-x"
    gone_jobs = base / f"{agent_parent_name(f'gone-{name}', tmp_path / 'gone')}-{DEAD}"
    live_jobs = base / f"{agent_parent_name(f'live-{name}', tmp_path / 'live')}-{os.getpid()}"
    made = [gone_build, gone_jobs, gone_jobs / "job-1", live_jobs, live_jobs / "job-1"]
    try:
        for path in made:
            path.mkdir()
        backend = ProcessBackend(tmp_path / "root", shutdown_grace_s=1.0, node_name=name)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            assert backend.memory_groups is not None
            assert backend.memory_groups.parent.name.endswith(f"-{os.getpid()}")
            assert not left.path.exists() and not earlier.parent.exists()
            assert sleeper.wait(timeout=5) == -signal.SIGKILL
            assert not gone_build.exists() and not gone_jobs.exists()
            assert (live_jobs / "job-1").is_dir()
            parent = backend.memory_groups.parent
            nursery.cancel_scope.cancel()
        assert not parent.exists()  # the parent goes with the backend
    finally:
        sleeper.kill()
        sleeper.wait()
        for path in [left.path, earlier.parent, *reversed(made)]:
            if path.exists():
                path.rmdir()


@needs_cgroup
async def test_a_job_starts_even_if_its_empty_parent_was_removed(
    cg_backend: ProcessBackend, slug_app: Path
) -> None:
    parent_of(cg_backend).rmdir()  # by someone else, while no job runs: it comes back
    await cg_backend.start(spec(slug_app, "job-after", "echo ok", memory_mb=64))
    assert await cg_backend.wait("job-after") == 0
    assert texts(cg_backend, "job-after") == [("stdout", "ok")]


def test_parent_names_are_per_node_and_data_dir(tmp_path: Path) -> None:
    a = agent_parent_name("n1", tmp_path / "a")
    assert a.startswith("flynnp2p-jobs-n1-") and a == agent_parent_name("n1", tmp_path / "a")
    assert a != agent_parent_name("n1", tmp_path / "b")  # same node name, other cluster
    assert agent_parent_name(None, tmp_path / "a").startswith("flynnp2p-jobs-")


@needs_cgroup
def test_build_groups_of_live_agents_are_kept(tmp_path: Path) -> None:
    mine = build_group_sync(controller(), "build-live", 64 * MiB)
    try:
        assert mine.path.name == f"flynnp2p-build-{os.getpid()}-build-live"
        assert mine.path.name not in sweep_sync(controller(), keep=tmp_path)
        assert mine.path.is_dir()
    finally:
        assert mine.remove_sync()


# -- Node.js under the default limit -----------------------------------------------------

NODE = shutil.which("node", path="/usr/local/bin:/usr/bin:/bin")
NODE_PROFILE = (resources.files("flynnp2p.build") / "buildpacks/nodejs/lib/nodejs.sh").read_bytes()
# What node runs with, and that it runs JIT-compiled code at all.
NODE_CMD = "node -e " + shlex.quote(
    'console.log("options=" + (process.env.NODE_OPTIONS || "") + " sum=" +'
    " [1, 2, 3].reduce((a, b) => a + b))"
)


async def node_job_lines(backend: ProcessBackend, tmp_path: Path) -> list[tuple[str, str]]:
    slug = build_slug(
        tmp_path / "node.tgz", lambda tar: add_file(tar, "./app/.profile.d/nodejs.sh", NODE_PROFILE)
    )
    app = await unpack_slug(slug, tmp_path / "root", "sha256-node")
    await backend.start(spec(app, "job-node", NODE_CMD, memory_mb=512))
    status = await backend.wait("job-node")
    assert status == 0, texts(backend, "job-node")
    return texts(backend, "job-node")


@needs_cgroup
@pytest.mark.skipif(NODE is None, reason="the stack has no node")
async def test_node_starts_under_512_mb_with_its_jit_under_a_cgroup(
    cg_backend: ProcessBackend, tmp_path: Path
) -> None:
    assert ("stdout", "options= sum=6") in await node_job_lines(cg_backend, tmp_path)


@pytest.mark.skipif(NODE is None, reason="the stack has no node")
async def test_node_gets_jitless_only_on_the_rlimit_fallback(tmp_path: Path) -> None:
    backend = ProcessBackend(tmp_path / "root", shutdown_grace_s=1.0, cgroups=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        assert ("stdout", "options=--jitless sum=6") in await node_job_lines(backend, tmp_path)
        nursery.cancel_scope.cancel()


# -- the build sandbox ----------------------------------------------------------------------


@needs_cgroup
async def test_a_build_program_over_the_limit_is_oom_killed_and_the_group_goes(
    tmp_path: Path,
) -> None:
    isolation = await trio.to_thread.run_sync(detect_isolation)
    lines: list[str] = []

    async def on_line(line: str) -> None:
        lines.append(line)

    async with open_sandbox(
        tmp_path / "work", isolation=isolation, uid=250_001, cache_dir=tmp_path / "cache",
        memory_mb=64,
    ) as box:  # fmt: skip
        assert box.group is not None
        group = box.group.path
        small = await box.run(
            ["python3", "-c", "print(len(b'x' * (20 << 20)))"], env={}, on_line=on_line
        )
        assert (small.status, small.oom_killed) == (0, False)
        big = await box.run(["python3", "-c", "b = b'x' * (200 << 20)"], env={}, on_line=on_line)
        # (unshare, whose child was killed, exits 1 with namespaces; -9 without)
        assert big.status != 0 and big.oom_killed
        assert big.tail[-1].startswith("flynnp2p: out of memory") and "64 MiB" in big.tail[-1]
        # the next program of the build is not blamed for the earlier kill
        after = await box.run(["true"], env={}, on_line=on_line)
        assert (after.status, after.oom_killed) == (0, False)
    assert str(20 << 20) in lines
    assert not group.exists()


async def test_a_build_without_cgroups_keeps_rlimit_as(tmp_path: Path) -> None:
    isolation = await trio.to_thread.run_sync(detect_isolation)
    lines: list[str] = []

    async def on_line(line: str) -> None:
        lines.append(line)

    async with open_sandbox(
        tmp_path / "work", isolation=isolation, uid=250_001, cache_dir=tmp_path / "cache",
        memory_mb=256, cgroups=False,
    ) as box:  # fmt: skip
        assert box.group is None
        result = await box.run(["sh", "-c", "ulimit -v"], env={}, on_line=on_line)
    assert result.status == 0 and lines == [str(256 * 1024)]
