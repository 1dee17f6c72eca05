"""The stack image: the small root filesystem that slugs run on in the docker backend.

Theory of operation
-------------------
There is no registry to pull a base image from, so the image is made from this
machine's own files: ``ensure_stack_image`` returns ``STACK_TAG`` when the engine
already has it, and otherwise writes a root filesystem tarball and ``docker import``\\ s
it (once per engine; a second agent on the same engine finds the tag). The tag
carries a version: change what goes into the image and bump it.

What is in it (and nothing else; a slug brings its own code in ``/app``):

- ``python3``: the host's interpreter (``/usr/bin/python3`` by default) with its
  standard library compiled into the ``pythonXY.zip`` that CPython always has on
  ``sys.path`` (bytecode only: tracebacks through the stdlib show no source lines,
  and the few modules that read data files beside them, e.g. ``venv``, do not
  work), its extension modules (``lib-dynload``) and ``os.py`` as the landmark by
  which the interpreter finds its prefix. Left out: the test suites, ``lib2to3``,
  ``idlelib``, ``tkinter``, ``turtledemo``, ``ensurepip``, ``pydoc_data``, the static
  ``config-*`` directory, ``dist-packages`` (a slug vendors its packages), and the
  ``dbm``/``nis``/``curses``/``readline`` modules whose libraries outweigh their use.
- ``bash``, ``sh`` and the coreutils/grep/sed basics a Procfile or ``.profile.d``
  script uses (``_PROGRAMS``).
- every shared library ``ldd`` lists for those binaries and extension modules, and
  the dynamic loader.
- ``/etc/passwd`` and ``/etc/group`` with root and nobody, ``/tmp`` (mode 1777), the
  usual empty mount points, and ``PATH``/``LANG=C.UTF-8``/``CMD ["/bin/bash"]``.

Why a zip: with the vfs storage driver every container starts as a full copy of its
image, and that copy costs per file (about 1.5 ms each here) far more than per byte:
the plain stdlib (1,300 files) made ``docker create`` take 2 s; ~150 files take a
tenth of that.

Paths are kept as they are on the host, symlinked components included (Debian's
merged ``/usr`` has ``/lib -> usr/lib``, ``/bin -> usr/bin``): ``_RootFs.add`` records
each symlink it meets on the way and then the file at its real path, so the ELF
interpreter path baked into every binary (``/lib64/ld-linux-x86-64.so.2``) resolves
inside the image exactly as on the host.

Everything here blocks (subprocesses, file and Docker I/O); ``ensure_stack_image``
runs it in a worker thread.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import trio

STACK_TAG = "flynnp2p/stack:1"
DEFAULT_PYTHON = "/usr/bin/python3"

# Not procps (kill, ps): it pulls in libsystemd and friends, and bash has a kill builtin.
_PROGRAMS = [
    *("bash", "sh", "env", "cat", "ls", "echo", "printf", "true", "false", "sleep"),
    *("mkdir", "rmdir", "rm", "cp", "mv", "ln", "touch", "chmod", "pwd", "id", "whoami"),
    *("head", "tail", "wc", "sort", "uniq", "tr", "cut", "date", "dirname", "basename"),
    *("readlink", "realpath", "uname", "test", "expr", "seq", "tee", "grep", "sed"),
]
_STDLIB_SKIP = {
    "test",
    "tests",
    "idle_test",
    "lib2to3",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
    "__pycache__",
}
# Extension modules whose libraries (Berkeley DB, NIS/Kerberos, ncurses, readline) cost
# more than a job is likely to use them, and the interpreter's own test modules.
_DYNLOAD_SKIP = (
    *("nis", "_dbm", "_gdbm", "_curses", "readline"),
    *("_test", "_ctypes_test", "_xx", "xx"),
)
_MOUNT_POINTS = ("/proc", "/sys", "/dev", "/run", "/root", "/home", "/var/tmp", "/usr/local/bin")
_PASSWD = (
    b"root:x:0:0:root:/root:/bin/bash\n"
    b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
_GROUP = b"root:x:0:\nnogroup:x:65534:\n"
_CHANGES = [
    "ENV PATH=/usr/local/bin:/usr/bin:/bin",
    "ENV LANG=C.UTF-8",
    "WORKDIR /",
    'CMD ["/bin/bash"]',
]
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")

# Run by the stack's own interpreter (so the bytecode is its own): writes its standard
# library, compiled, into a zip and prints where things are. A fresh ``__pycache__``
# file is reused; otherwise the module is compiled in memory (nothing on the host is
# written). Top-level directories count only if they are packages, which leaves out
# lib-dynload, config-*, site-packages and dist-packages. Entries get a fixed date,
# so the same files give the same zip.
_ZIP_STDLIB = """
import importlib.util, json, marshal, os, sys, sysconfig, zipfile
out, skip = sys.argv[1], set(sys.argv[2].split(","))
stdlib = sysconfig.get_path("stdlib")
dynload = os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload")

def pyc(path):
    st = os.stat(path)
    header = (importlib.util.MAGIC_NUMBER + bytes(4)
              + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
              + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little"))
    try:
        with open(importlib.util.cache_from_source(path), "rb") as f:
            data = f.read()
        if data[:16] == header:
            return data
    except OSError:
        pass
    with open(path, "rb") as f:
        return header + marshal.dumps(compile(f.read(), path, "exec", dont_inherit=True))

with zipfile.ZipFile(out, "w") as zf:
    for dirpath, dirnames, filenames in os.walk(stdlib):
        rel = os.path.relpath(dirpath, stdlib)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in skip
            and (rel != "." or os.path.isfile(os.path.join(dirpath, d, "__init__.py")))
        )
        for name in sorted(filenames):
            if name.endswith(".py"):
                arcname = os.path.normpath(os.path.join(rel, name[:-3] + ".pyc"))
                info = zipfile.ZipInfo(arcname, (1980, 1, 1, 0, 0, 0))
                zf.writestr(info, pyc(os.path.join(dirpath, name)))
zips = [p for p in sys.path if p.endswith(".zip")]
print(json.dumps({"stdlib": stdlib, "dynload": dynload, "zip": zips[0] if zips else None}))
"""

ClientFactory = Callable[[], Any]


class _RootFs:
    """Host paths to copy (with every symlink on the way to them) and made-up files."""

    def __init__(self) -> None:
        self.dirs: set[str] = set()
        self.files: dict[str, str] = {}  # path in the image -> file on the host
        self.links: dict[str, str] = {}

    def add(self, path: str) -> None:
        """Add ``path`` (absolute): its parents, any symlinks met, then the real thing."""
        real = "/"
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            here = os.path.join(real, part)
            if os.path.islink(here):
                if here not in self.links:
                    target = os.readlink(here)
                    self.links[here] = target
                    self.add(os.path.normpath(os.path.join(real, target)))
                here = os.path.realpath(here)
            elif i < len(parts) - 1 or os.path.isdir(here):
                self.dirs.add(here)
            else:
                self.files[here] = here
            real = here

    def add_file_as(self, image_path: str, host_file: Path) -> None:
        """Put ``host_file`` at ``image_path`` (whose parent exists on the host)."""
        parent = os.path.dirname(image_path)
        self.add(parent)
        self.files[os.path.join(os.path.realpath(parent), os.path.basename(image_path))] = str(
            host_file
        )


def _zip_stdlib(python: str, out: Path) -> tuple[str, str, str]:
    """Write ``python``'s compiled stdlib to ``out``; its stdlib, lib-dynload and zip paths."""
    proc = subprocess.run(
        [python, "-I", "-c", _ZIP_STDLIB, str(out), ",".join(sorted(_STDLIB_SKIP))],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    where = json.loads(proc.stdout)
    if not where["zip"]:
        raise FileNotFoundError(f"{python} has no stdlib zip on its sys.path")
    return where["stdlib"], where["dynload"], where["zip"]


def _shared_libraries(binaries: Iterable[str]) -> set[str]:
    """Every library path ``ldd`` resolves for ``binaries`` (unresolved ones are skipped)."""
    libs: set[str] = set()
    todo = sorted(binaries)
    for start in range(0, len(todo), 64):
        proc = subprocess.run(
            ["ldd", *todo[start : start + 64]], capture_output=True, text=True, timeout=60
        )  # exits 1 when one argument is not dynamic; its other lines are still good
        for line in proc.stdout.splitlines():
            m = _LDD_PATH.search(line)
            if m and "not found" not in line:
                libs.add(m.group(1))
    return libs


def stack_rootfs(work_dir: Path, python: str = DEFAULT_PYTHON) -> _RootFs:
    """Collect what goes into the image (see the module docstring); the zip goes in ``work_dir``."""
    fs = _RootFs()
    elves = []
    for name in _PROGRAMS:
        found = shutil.which(name, path="/usr/bin:/bin")
        if found is None:
            raise FileNotFoundError(f"stack image: {name!r} is not installed on this host")
        fs.add(found)
        elves.append(os.path.realpath(found))
    fs.add(python)
    elves.append(os.path.realpath(python))
    if os.path.lexists("/usr/bin/python3"):  # the name jobs call it by
        fs.add("/usr/bin/python3")
    stdlib_zip = work_dir / "stdlib.zip"
    stdlib, dynload, zip_path = _zip_stdlib(python, stdlib_zip)
    fs.add_file_as(zip_path, stdlib_zip)
    fs.add(os.path.join(stdlib, "os.py"))  # the landmark that tells Python its prefix
    for entry in sorted(os.listdir(dynload)):
        if entry.endswith(".so") and not entry.startswith(_DYNLOAD_SKIP):
            fs.add(os.path.join(dynload, entry))
            elves.append(os.path.realpath(os.path.join(dynload, entry)))
    for lib in _shared_libraries(elves):
        fs.add(lib)
    for d in _MOUNT_POINTS:
        if os.path.lexists(d):
            fs.add(d)
        else:
            fs.dirs.add(d)
    for d in ("/bin", "/sbin"):  # #!/bin/sh scripts; /sbin is where docker puts docker-init
        if os.path.lexists(d):
            fs.add(d)
    return fs


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_rootfs_tar(fs: _RootFs, out: Path) -> None:
    """Write ``fs`` as an uncompressed tarball (what ``docker import`` reads fastest)."""

    def synthetic(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int) -> None:
        info = _root_owned(tarfile.TarInfo(name))
        info.mode = mode
        if data is None:
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    with tarfile.open(out, "w") as tar:
        for d in sorted(fs.dirs | {"/etc", "/tmp"}):
            if d == "/tmp":
                synthetic(tar, "tmp", None, 0o1777)
            elif os.path.isdir(d):
                info = _root_owned(tar.gettarinfo(d, arcname=d.lstrip("/")))
                info.mode = stat.S_IMODE(os.stat(d).st_mode)
                tar.addfile(info)
            else:
                synthetic(tar, d.lstrip("/"), None, 0o755)
        synthetic(tar, "etc/passwd", _PASSWD, 0o644)
        synthetic(tar, "etc/group", _GROUP, 0o644)
        for path, source in sorted(fs.files.items()):
            tar.add(source, arcname=path.lstrip("/"), recursive=False, filter=_root_owned)
        for link, target in sorted(fs.links.items()):
            info = _root_owned(tarfile.TarInfo(link.lstrip("/")))
            info.type = tarfile.SYMTYPE
            info.linkname = target
            info.mode = 0o777
            tar.addfile(info)


def _ensure_sync(client_factory: ClientFactory, tag: str, python: str) -> str:
    client = client_factory()
    try:
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        repository, _, version = tag.rpartition(":")
        with tempfile.TemporaryDirectory(prefix="flynnp2p-stack-") as tmp:
            tarball = Path(tmp) / "rootfs.tar"
            write_rootfs_tar(stack_rootfs(Path(tmp), python), tarball)
            client.api.import_image_from_file(
                str(tarball),
                repository=repository,
                tag=version,
                changes=[*_CHANGES, f"LABEL flynnp2p.stack={version}"],
            )
        client.images.get(tag)  # raises ImageNotFound if the import did not take
        return tag
    finally:
        client.close()


async def ensure_stack_image(
    client_factory: ClientFactory = docker.from_env,
    *,
    tag: str = STACK_TAG,
    python: str = DEFAULT_PYTHON,
) -> str:
    """Return ``tag``, building the stack image from this host's files if it is missing."""
    return await trio.to_thread.run_sync(_ensure_sync, client_factory, tag, python)
