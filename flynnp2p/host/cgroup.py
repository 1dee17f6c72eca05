"""Memory limits by cgroup: one group per job (and per build), under one group per agent.

Theory of operation
-------------------
``RLIMIT_AS`` caps address space, not memory: a runtime that reserves much more
than it touches (V8 reserves about 730 MB as it starts, the JVM its whole heap)
cannot start under a modest limit, and one that touches less than it maps is
never held to it. A memory cgroup caps what the kernel charges the group's
processes (resident pages, page cache, kernel memory), and when they go over it
the kernel's OOM killer kills one of them: the limit is real and a start-time
reservation costs nothing.

Finding a controller (`find_controller`, which only reads, under a root that
tests fake): the agent's own group in each hierarchy is in ``/proc/self/cgroup``
and the mounts in ``/proc/self/mountinfo``. Groups go under the agent's own group,
so they stay inside whatever limit the agent itself is given and never touch
anyone else's groups.

1. cgroup v2 (a ``cgroup2`` mount, the ``0::PATH`` line): usable when the agent's
   group is writable, ``memory`` is in its ``cgroup.controllers`` and either
   already in its ``cgroup.subtree_control`` or the group is the root of the
   hierarchy (only there may a group with processes, the agent, enable a
   controller for its children).
2. cgroup v1 (a ``cgroup`` mount with the ``memory`` option): usable when the
   agent's memory group is writable.
3. else none, and the caller falls back to ``RLIMIT_AS`` (the reason is returned
   so that it can say so).

Layout, under the agent's group:

* ``flynnp2p-jobs-<node>-<key>-<pid>/<job id>`` for jobs (`MemoryGroups`): one
  parent per agent run, named by its node and keyed by its data dir
  (`agent_parent_name`), so that several agents on one machine never collide, not
  even same-named nodes of two clusters; opening it removes the parents of this
  agent's earlier runs (same node and key, any pid), killing what is still in them.
* ``flynnp2p-build-<pid>-<name>`` for a build sandbox (the builder does not know
  the node).

The pid names the agent process that made a group: `sweep_sync`, when an agent
opens its parent, removes the groups of agent processes that are gone (killing
what is left in them), so that agents which never run again (a test cluster's)
leave nothing behind for long. A live agent's groups are never touched. (This
assumes the agents that share a cgroup share a pid namespace, as they do when
they share a machine's or a container's.)

A group (`JobGroup`) gets its limit before anything runs in it (v1:
``memory.limit_in_bytes`` then ``memory.memsw.limit_in_bytes`` to the same
value where that file exists, so swap cannot stretch it; v2: ``memory.max`` and
``memory.swap.max`` 0). The child joins it between fork and exec
(`JobGroup.join`, in the spawn's ``preexec_fn``, while it is still root), so
everything the job execs or forks is in it from its first allocation. An OOM
kill is counted by the kernel (v1 ``memory.oom_control``, v2 ``memory.events``:
``oom_kill N``), read when the job has exited. Removing a group SIGKILLs what is
left in it (a process that left the job's process group is still in its cgroup)
and then removes the directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

V1_LIMIT = "memory.limit_in_bytes"
_V1_SWAP_LIMIT = "memory.memsw.limit_in_bytes"
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_BUILD_PREFIX = "flynnp2p-build-"
_JOBS_PREFIX = "flynnp2p-jobs-"
_REMOVE_S = 5.0  # bound on waiting for a killed group's processes to leave it
_POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class Mount:
    """One cgroup line of ``/proc/self/mountinfo``."""

    root: str  # the hierarchy's directory mounted there ("/" unless a bind mount)
    mount_point: str
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: frozenset[str]  # the super options: a v1 mount's controllers


@dataclass(frozen=True, slots=True)
class Controller:
    """A usable memory controller: the agent's own group in it, where ours go."""

    version: int  # 1 or 2
    group: Path  # a directory; the agent's group
    is_root: bool = False  # the group is the hierarchy's root (v2 may then enable memory)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of a ``/proc/self/mountinfo``."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 4 or sep < 5:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(fields[sep + 3].split(","))
        mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), fstype, options))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; the v2 group is under ""."""
    groups: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            groups.setdefault(name, path)
    return groups


def _group_dir(root: Path, mount: Mount, path: str) -> Path | None:
    """Where the group `path` (as /proc/self/cgroup names it) is, under this mount."""
    base = mount.root.rstrip("/")
    if path != mount.root and not path.startswith(base + "/"):
        return None  # the group is outside what is mounted here
    rel = path[len(base) :].strip("/")
    return root / mount.mount_point.lstrip("/") / rel


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def find_controller(root: Path = Path("/")) -> Controller | str:
    """The memory controller to use (see the module docstring), or why there is none.

    ``root`` is where ``/proc`` and the cgroup mounts are (tests give a fake tree)."""
    try:
        mounts = parse_mountinfo((root / "proc/self/mountinfo").read_text())
        groups = parse_proc_cgroup((root / "proc/self/cgroup").read_text())
    except OSError as exc:
        return f"cannot read this process's cgroups: {exc}"
    reasons = []
    for mount in (m for m in mounts if m.fstype == "cgroup2"):
        if "" not in groups:
            break
        group = _group_dir(root, mount, groups[""])
        if group is None or not group.is_dir():
            continue
        is_root = groups[""] == mount.root
        if "memory" not in _words(group / "cgroup.controllers"):
            reasons.append(f"cgroup v2 at {mount.mount_point} has no memory controller here")
        elif "memory" not in _words(group / "cgroup.subtree_control") and not is_root:
            reasons.append(
                f"cgroup v2 at {mount.mount_point}: memory is not enabled below this "
                "process's group (only a delegated subtree or the root can enable it)"
            )
        elif not os.access(group, os.W_OK):
            reasons.append(f"cgroup v2 group {group} is not writable")
        else:
            return Controller(2, group, is_root)
    for mount in (m for m in mounts if m.fstype == "cgroup" and "memory" in m.options):
        group = _group_dir(root, mount, groups.get("memory", "/"))
        if group is None or not (group / V1_LIMIT).is_file():
            continue
        if not os.access(group, os.W_OK):
            reasons.append(f"cgroup v1 memory group {group} is not writable")
            continue
        return Controller(1, group)
    if not reasons:
        reasons.append("no cgroup memory controller is mounted")
    return "; ".join(reasons)


def group_name(name: str) -> str:
    """`name` (a node name, a job id) as a safe directory name."""
    safe = _NAME_UNSAFE.sub("_", name)[:200]
    return safe if safe not in ("", ".", "..") else "_" + safe


def oom_message(limit_bytes: int) -> str:
    """What a job or build killed at its memory limit says (the exit reason and the log)."""
    limit = f"{limit_bytes // (1024 * 1024)} MiB" if limit_bytes else "no limit set"
    return f"out of memory: the kernel killed a process at the memory limit ({limit})"


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _procs(group: Path) -> list[int]:
    try:
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _remove_dir(group: Path, deadline_s: float = _REMOVE_S) -> bool:
    """SIGKILL what is left in `group`, then remove it (blocking, bounded); True if gone."""
    deadline = time.monotonic() + deadline_s
    while True:
        for pid in _procs(group):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            group.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            # EBUSY: processes still in it (exiting) or child groups.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
        time.sleep(_POLL_S)


@dataclass(frozen=True, slots=True)
class JobGroup:
    """One job's (or build's) group: its limit, its members, its OOM kills."""

    path: Path
    version: int
    limit_bytes: int  # 0: no limit (the group still holds, and kills, what the job left)

    def set_limit_sync(self) -> None:
        if not self.limit_bytes:
            return
        value = str(self.limit_bytes)
        if self.version == 1:
            _write(self.path / V1_LIMIT, value)
            if (self.path / _V1_SWAP_LIMIT).exists():  # absent without swap accounting
                _write(self.path / _V1_SWAP_LIMIT, value)
        else:
            _write(self.path / "memory.max", value)
            if (self.path / "memory.swap.max").exists():
                _write(self.path / "memory.swap.max", "0")

    def join(self) -> None:
        """In the child, between fork and exec (a ``preexec_fn``): move into the group.

        Writing a pid moves that one process; its later children are born in it."""
        fd = os.open(self.path / "cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, b"%d" % os.getpid())
        finally:
            os.close(fd)

    def oom_kills_sync(self) -> int:
        """How many of the group's processes the kernel's OOM killer has killed."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove_sync(self) -> bool:
        return _remove_dir(self.path)


def agent_parent_name(node: str | None, data_dir: Path) -> str:
    """An agent's parent group without the pid of its run (see the module docstring)."""
    key = hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:8]
    return f"{_JOBS_PREFIX}{group_name(node)}-{key}" if node else f"{_JOBS_PREFIX}{key}"


class MemoryGroups:
    """One agent's parent group and the job groups in it (blocking calls: use a thread)."""

    def __init__(self, controller: Controller, name: str, pid: int | None = None) -> None:
        self.controller = controller
        self.name = group_name(name)  # from `agent_parent_name`
        self.parent = controller.group / f"{self.name}-{os.getpid() if pid is None else pid}"

    def open_sync(self) -> list[str]:
        """Remove the parents of this agent's earlier runs (killing what is still in
        them), then make its own (enabling memory for it on v2): the groups removed."""
        stale = []
        for path in sorted(self.controller.group.glob(f"{self.name}-*")):
            if path != self.parent and path.name.rsplit("-", 1)[1].isdigit():
                stale += [p.name for p in path.iterdir() if p.is_dir()]
                _remove_tree(path)
        self._make_parent()
        for path in sorted(p for p in self.parent.iterdir() if p.is_dir()):
            stale.append(path.name)  # an earlier run with the same pid
            _remove_dir(path)
        return stale

    def _make_parent(self) -> None:
        if self.controller.version == 2:
            _enable_memory(self.controller.group)
        self.parent.mkdir(exist_ok=True)
        if self.controller.version == 2:
            _enable_memory(self.parent)

    def create_sync(self, name: str, limit_bytes: int) -> JobGroup:
        """A fresh group for `name` with its limit set (one left by a crash is replaced)."""
        path = self.parent / group_name(name)
        self._make_parent()  # again: cheap, and a parent someone removed comes back
        if path.exists():
            _remove_dir(path)
        return make_group(path, self.controller.version, limit_bytes)

    def close_sync(self) -> None:
        with contextlib.suppress(OSError):  # busy: a group is left; the next run removes it
            self.parent.rmdir()


def _enable_memory(group: Path) -> None:
    if "memory" not in _words(group / "cgroup.subtree_control"):
        _write(group / "cgroup.subtree_control", "+memory")


def make_group(path: Path, version: int, limit_bytes: int) -> JobGroup:
    """Create the group directory `path` and set its limit (blocking); removed again
    if the limit cannot be set."""
    path.mkdir()
    group = JobGroup(path, version, limit_bytes)
    try:
        group.set_limit_sync()
    except OSError:
        _remove_dir(path)
        raise
    return group


def build_group_sync(controller: Controller, name: str, limit_bytes: int) -> JobGroup:
    """A build sandbox's group (see the module docstring for the name)."""
    if controller.version == 2:
        _enable_memory(controller.group)
    path = controller.group / group_name(f"{_BUILD_PREFIX}{os.getpid()}-{name}")
    return make_group(path, controller.version, limit_bytes)


def sweep_sync(controller: Controller, keep: Path) -> list[str]:
    """Tidy up after agents that are gone (see the module docstring): the names of
    the groups removed. ``keep`` is the caller's own parent."""
    removed = []
    for path in sorted(controller.group.glob("flynnp2p-*")):
        if path == keep or not path.is_dir():
            continue
        if path.name.startswith(_BUILD_PREFIX):
            pid_text = path.name.removeprefix(_BUILD_PREFIX).split("-", 1)[0]
        elif path.name.startswith(_JOBS_PREFIX):
            pid_text = path.name.rsplit("-", 1)[1]
        else:
            continue
        if pid_text.isdigit() and not _alive(int(pid_text)) and _remove_tree(path):
            removed.append(path.name)
    return removed


def _remove_tree(group: Path) -> bool:
    """`group` and the groups in it (one level: ours have no deeper ones)."""
    try:
        children = sorted(p for p in group.iterdir() if p.is_dir())
    except FileNotFoundError:
        return True
    for child in children:
        _remove_dir(child)
    return _remove_dir(group)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
