"""The builder: a source tree in, a slug and its process types out (Heroku buildpack API).

Theory of operation
-------------------
``build`` runs one build in a fresh `sandbox.Sandbox` (see there for the
isolation, the layout and what the programs see):

1. the source is copied into the build tree, without ``.git`` and without what
   ``.slugignore`` names (`slugignore`), nor anything but files, directories and
   symlinks;
2. the buildpacks are chosen (`selection.chosen_buildpacks`) and put into the
   sandbox: built-ins from this package's ``buildpacks/`` directory, local paths
   copied, git URLs cloned with the real ``git`` client (on the host, before the
   build's uid owns anything);
3. the app's env is written to ENV_DIR, one file per variable, and the tree and
   the cache are handed to the build's uid; the tools the builder lends
   (``uv``, from the ``uv`` package, for the python buildpack) are linked in;
4. ``bin/detect BUILD_DIR`` of each: with detection, the built-ins in
   ``BUILTIN_ORDER`` until one says yes (none: an error naming what each looks
   for); with chosen buildpacks, each must say yes (one without a ``bin/detect``
   is taken as it is);
5. ``bin/compile BUILD_DIR CACHE_DIR ENV_DIR`` of each, in order, its output
   streamed line by line to ``on_line``; a non-zero exit fails the build with the
   exit code and the last lines of the buildpack's output;
6. ``bin/release BUILD_DIR`` of each: its ``default_process_types``
   (`release_yaml`);
7. the slug: ``tar`` of ``./app`` run in the sandbox as the build's uid (so it can
   read nothing the build could not), owners set to 0, gzipped into the build's
   /tmp; meanwhile, in one pass over the file as it grows (decompressed once,
   hashed as it is read: the pass after the packing took 0.14 s of every push of
   the Python example), every member is checked as a job host will check it
   (``host.slug.check_members``: no absolute or escaping links, no devices), its
   ``Procfile`` parsed and its digest computed;
8. process types: the buildpacks' defaults, the app's ``Procfile`` over them,
   written into the slug as its ``Procfile`` (before 7) when the defaults add
   any, so that the slug says what it runs (a release of a slug reads its
   Procfile);
9. last, when nothing can fail any more, the slug is moved next to the sandbox:
   a slug file exists only for a build that succeeded, and only complete.

The whole build runs under one wall-clock limit (``BuildLimits.timeout_s``):
when it passes, the running program and everything it started are killed and
the build fails saying so. Memory is ``RLIMIT_AS`` per program
(``BuildLimits.memory_mb``); a compile that fails for want of it (`out_of_memory`:
what the program printed last, or the signal it died of) fails saying so. Both
messages name the limit and the ``flynnp2p app set`` that raises it. Either way
the sandbox is removed (or, with ``remove_sandbox=False``, left to the caller). A
disk that fills up under the build (a write that fails with ENOSPC, or ``tar``
saying so while it packs the slug) fails it saying "no space left on <node>"
(`flynnp2p.host.space`), the sandbox removed too (or left to the caller).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tarfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import BinaryIO, cast

import trio

from flynnp2p import vocab
from flynnp2p.build.procfile import MAX_PROCFILE, PROCFILE_MEMBERS, parse_procfile
from flynnp2p.build.release_yaml import parse_default_process_types
from flynnp2p.build.sandbox import BuildLimits, LineCallback, Sandbox, open_sandbox
from flynnp2p.build.selection import (
    BUILTIN_ORDER,
    BuildpackRef,
    chosen_buildpacks,
    process_types,
)
from flynnp2p.build.slugignore import SlugIgnore, parse_slugignore
from flynnp2p.errors import UserError, first_in
from flynnp2p.host.process import app_uid, detect_isolation
from flynnp2p.host.slug import READ_ERRORS, SlugError, check_members, open_tar_stream
from flynnp2p.host.space import is_full, no_space

__all__ = ["BuildError", "BuildLimits", "BuildResult", "build", "memory_message", "out_of_memory"]

_CLONE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "GIT_TERMINAL_PROMPT": "0", "LANG": "C"}
_MAX_SMALL_FILE = 64 * 1024  # .slugignore, .buildpacks


class BuildError(UserError):
    """The build failed; the message says why, ``output`` holds the last lines."""

    code = "build_failed"

    def __init__(self, message: str, output: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.output = tuple(output)


@dataclass(frozen=True, slots=True)
class BuildResult:
    slug_path: Path  # the gzipped tar of ./app, in ``work_dir``; the caller owns it
    digest: str  # "sha256:<hex>" of the slug file
    size: int
    process_types: dict[str, str] = field(default_factory=dict)
    buildpacks: tuple[str, ...] = ()  # what each buildpack's bin/detect called the app
    sandbox: Path | None = None  # left for the caller to remove (``remove_sandbox=False``)
    # With the sandbox left: the built ./app in it, what the slug holds (a node may take
    # it as the slug unpacked, `flynnp2p.host.slug.adopt_built`).
    app_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class _Placed:
    ref: BuildpackRef
    path: Path  # its directory on the host, inside the sandbox


def builtin_dir(name: str) -> Path:
    """The directory of a built-in buildpack shipped in this package."""
    return Path(str(resources.files("flynnp2p.build") / "buildpacks" / name))


def _default_tools() -> list[Path]:
    """Programs the builder lends to buildpacks: ``uv`` (a dependency) for the python one."""
    try:
        from uv import find_uv_bin

        return [Path(find_uv_bin())]
    except (ImportError, FileNotFoundError):
        return []  # the python buildpack falls back to pip


def build_uid(app_id: str) -> int:
    """The uid an app's builds run as: not its jobs' uid (``app_uid``), its own."""
    return app_uid(f"{app_id}/build")


async def build(
    source: Path,
    *,
    app_id: str,
    work_dir: Path,
    cache_dir: Path,
    env: Mapping[str, str],
    on_line: LineCallback,
    buildpacks: Sequence[str] | None = None,
    limits: BuildLimits | None = None,
    isolation: str | None = None,
    tools: Sequence[Path] | None = None,
    remove_sandbox: bool = True,
    node: str = "this node",
) -> BuildResult:
    """Build ``source`` into a slug (see the module docstring); BuildError if it fails.

    ``remove_sandbox=False``: the sandbox's directory (under ``work_dir``) is left,
    whether the build succeeds or not, for the caller to remove when it suits it
    (``BuildResult.sandbox``): removing a virtualenv's thousand files need not hold
    up the release.

    ``isolation`` is what ``host.process.detect_isolation`` says unless given;
    ``tools`` are the programs lent to buildpacks (default: ``uv`` when installed);
    ``cache_dir`` is the app's build cache (kept between builds); ``buildpacks``
    are references as in ``selection.parse_ref`` (an app setting); ``limits``
    default to ``BuildLimits()``; ``node`` names this node in a full disk's message."""
    for key in env:
        if not vocab.ENV_NAME.ok(key):
            raise UserError(f"env key {key!r} is not valid; expected [A-Za-z_][A-Za-z0-9_]*")
    limits = limits or BuildLimits()
    if not await trio.to_thread.run_sync(source.is_dir):
        raise UserError(f"build source {source} is not a directory")
    if isolation is None:
        isolation = await trio.to_thread.run_sync(detect_isolation)
    with trio.move_on_after(limits.timeout_s):
        try:
            return await _build(
                source,
                app_id=app_id,
                work_dir=work_dir,
                cache_dir=cache_dir,
                env=env,
                on_line=on_line,
                buildpacks=buildpacks,
                limits=limits,
                isolation=isolation,
                tools=_default_tools() if tools is None else list(tools),
                remove_sandbox=remove_sandbox,
            )
        except (OSError, ExceptionGroup) as exc:
            full = first_in(exc, OSError, is_full)
            if full is None:
                raise
            why = full.strerror or str(full)
            await on_line(f" !     Build stopped: {why}")
            raise BuildError(
                no_space(node, "the build could not write its files", why)
                + "; free space there and push again"
            ) from None
    await on_line(f" !     Build stopped: it took longer than {limits.timeout_s:g} s")
    raise BuildError(
        f"the build took longer than its time limit of {limits.timeout_s:g} s and was "
        f"stopped; raise the limit with 'flynnp2p app set build_timeout_s={int(limits.timeout_s) * 2}'"
    )


# What programs print when an allocation fails under RLIMIT_AS (Python, libc, C++,
# V8, Go, the JVM); a program may also die of the signal its failed allocation raised.
_OOM_MARKERS = (
    "MemoryError", "Cannot allocate memory", "out of memory", "std::bad_alloc",
    "heap out of memory", "OutOfMemoryError", "ENOMEM", "failed to allocate",
)  # fmt: skip
_OOM_SIGNALS = (6, 9, 11)  # SIGABRT, SIGKILL, SIGSEGV


def out_of_memory(status: int, tail: Sequence[str]) -> bool:
    """Whether a program that exited with `status` (-signal if killed) and printed
    `tail` last most likely failed for want of memory."""
    if status < 0 and -status in _OOM_SIGNALS:
        return True
    return any(marker.lower() in line.lower() for line in tail[-20:] for marker in _OOM_MARKERS)


def memory_message(memory_mb: int) -> str:
    """What a build over its memory limit says: the limit and how to raise it."""
    return (
        f"the build ran out of memory (memory limit {memory_mb} MiB per program, the app's "
        f"build_memory_mb); raise it with 'flynnp2p app set build_memory_mb={memory_mb * 2}'"
    )


async def _build(
    source: Path,
    *,
    app_id: str,
    work_dir: Path,
    cache_dir: Path,
    env: Mapping[str, str],
    on_line: LineCallback,
    buildpacks: Sequence[str] | None,
    limits: BuildLimits,
    isolation: str,
    tools: list[Path],
    remove_sandbox: bool,
) -> BuildResult:
    async with open_sandbox(
        work_dir, isolation=isolation, uid=build_uid(app_id), cache_dir=cache_dir,
        memory_mb=limits.memory_mb, remove=remove_sandbox,
    ) as box:  # fmt: skip
        if isolation != "namespaces":
            await on_line(f"-----> Warning: this host builds without namespaces ({isolation})")
        buildpacks_file = await trio.to_thread.run_sync(_copy_source, source, box.app)
        refs = chosen_buildpacks(buildpacks, env, buildpacks_file)
        detecting = refs is None
        placed = [
            await _place(box, i, ref, on_line)
            for i, ref in enumerate(refs or [BuildpackRef("builtin", n) for n in BUILTIN_ORDER])
        ]
        await trio.to_thread.run_sync(box.write_env_sync, env)
        await trio.to_thread.run_sync(box.hand_over_sync)
        for tool in tools:
            await trio.to_thread.run_sync(box.add_tool_sync, tool)

        chosen = await _detect(box, placed, detecting, on_line)
        defaults = []
        for bp, name in chosen:
            await on_line(f"-----> {name} app detected")
            await _compile(box, bp, name, limits, on_line)
        for bp, name in chosen:
            defaults.append(await _release(box, bp, name, on_line))
        own = await trio.to_thread.run_sync(_app_procfile, box.app)
        types = process_types(defaults, own)
        if types != own:  # the slug says what it runs, as a release of a slug reads it
            await trio.to_thread.run_sync(_write_procfile, box.app, types)
        slug = await _pack(box, on_line)
        await on_line("-----> Discovering process types")
        await on_line("       Procfile declares types -> " + (", ".join(sorted(own)) or "(none)"))
        extra = sorted(set(types) - set(own))
        if extra:
            await on_line("       Default types for buildpack -> " + ", ".join(extra))
        await on_line(f"-----> Compressed slug: {slug.size / 1e6:.1f} MB")
        # Last: from here on nothing can fail, so a slug file only exists for a build
        # that succeeded.
        final = work_dir / f"{box.root.name}.tgz"
        await trio.to_thread.run_sync(os.replace, slug.path, final)
        left = None if remove_sandbox else box.root
        return BuildResult(
            final, slug.digest, slug.size, types, tuple(n for _, n in chosen), left,
            None if remove_sandbox else box.app,
        )  # fmt: skip


# -- 1. the source -----------------------------------------------------------------------


def _read_small(path: Path) -> str | None:
    """A small regular file's text (never through a symlink), or None."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SMALL_FILE:
        raise UserError(f"{path.name} must be a regular file of at most 64 KiB")
    return path.read_text(errors="replace")


def _copy_source(source: Path, dest: Path) -> str | None:
    """Copy the app into ``dest`` (see the module doc); return its .buildpacks text."""
    ignore_text = _read_small(source / ".slugignore")
    ignore = SlugIgnore(parse_slugignore(ignore_text) if ignore_text else [])
    for base, dirs, files in os.walk(source):
        rel_base = Path(base).relative_to(source)
        keep_dirs = []
        for name in sorted(dirs):
            rel = (rel_base / name).as_posix()
            full = Path(base) / name
            if full.is_symlink():  # os.walk lists links to dirs as dirs: copy the link
                files.append(name)
                continue
            if rel == ".git" or ignore.ignores(rel, is_dir=True):
                continue
            (dest / rel).mkdir()
            keep_dirs.append(name)
        dirs[:] = keep_dirs
        for name in sorted(files):
            rel = (rel_base / name).as_posix()
            full = Path(base) / name
            if ignore.ignores(rel, is_dir=False):
                continue
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(full), dest / rel)
            elif stat.S_ISREG(mode):
                shutil.copy2(full, dest / rel, follow_symlinks=False)
    return _read_small(source / ".buildpacks")


# -- 2. the buildpacks -------------------------------------------------------------------


async def _place(box: Sandbox, index: int, ref: BuildpackRef, on_line: LineCallback) -> _Placed:
    dest = box.buildpacks_dir / f"{index:02d}-{ref.name}"
    if ref.kind == "builtin":
        await trio.to_thread.run_sync(_copy_buildpack, builtin_dir(ref.location), dest)
    elif ref.kind == "path":
        src = Path(ref.location)
        if not (src / "bin" / "compile").is_file():
            raise BuildError(f"buildpack {ref}: no bin/compile there (is it a buildpack?)")
        await trio.to_thread.run_sync(_copy_buildpack, src, dest)
    else:
        await on_line(f"-----> Fetching buildpack {ref}")
        await _clone(ref, dest)
        if not (dest / "bin" / "compile").is_file():
            raise BuildError(f"buildpack {ref}: the repository has no bin/compile")
    return _Placed(ref, dest)


def _copy_buildpack(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    bindir = dest / "bin"
    for prog in bindir.iterdir() if bindir.is_dir() else []:
        if prog.is_file() and not prog.is_symlink():
            prog.chmod(0o755)  # package data may lose its exec bit on the way


async def _clone(ref: BuildpackRef, dest: Path) -> None:
    argv = ["git", "clone", "--quiet"] + ([] if ref.ref else ["--depth", "1"])
    steps = [[*argv, "--", ref.location, str(dest)]]
    if ref.ref:
        steps.append(
            [
                "git",
                "-C",
                str(dest),
                "-c",
                "advice.detachedHead=false",
                "checkout",
                "--quiet",
                ref.ref,
            ]
        )
    for step in steps:
        env = {**_CLONE_ENV, "HOME": str(dest.parent)}
        done = await trio.run_process(
            step, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip().splitlines()
            raise BuildError(
                f"could not fetch buildpack {ref}: {' / '.join(why[-3:]) or 'git failed'}"
            )


# -- 4-6. the buildpack API --------------------------------------------------------------


async def _detect(
    box: Sandbox, placed: list[_Placed], detecting: bool, on_line: LineCallback
) -> list[tuple[_Placed, str]]:
    app = box.inside(box.app)
    chosen: list[tuple[_Placed, str]] = []
    wants: list[str] = []
    for bp in placed:
        if not detecting and not (bp.path / "bin" / "detect").is_file():
            chosen.append((bp, bp.ref.name))  # chosen, and it cannot say: taken as it is
            continue
        result = await box.run(
            [box.inside(bp.path / "bin" / "detect"), app],
            env={},
            on_line=on_line,
            capture_stdout=True,
        )
        said = result.stdout.strip().splitlines()[0][:80] if result.stdout.strip() else ""
        if result.status == 0:
            chosen.append((bp, said or bp.ref.name))
            if detecting:
                return chosen
        elif detecting:
            wants.append(f"{bp.ref.name} looks for {said or 'its own markers'}")
        else:
            raise BuildError(f"app not compatible with buildpack {bp.ref} (its bin/detect said no)")
    if not chosen:
        raise BuildError(
            "no buildpack detected this app: "
            + "; ".join(wants)
            + ". Add one of these, or choose buildpacks with BUILDPACK_URL or a .buildpacks file."
        )
    return chosen


async def _compile(
    box: Sandbox, bp: _Placed, name: str, limits: BuildLimits, on_line: LineCallback
) -> None:
    argv = [
        box.inside(bp.path / "bin" / "compile"),
        box.inside(box.app),
        box.inside(box.cache_dir),
        box.inside(box.env_dir),
    ]
    env = {"STACK": "flynnp2p", "LANG": "C.UTF-8"}
    result = await box.run(argv, env=env, on_line=on_line, merge_stderr=True)
    if result.status != 0:
        how = f"exit code {result.status}" if result.status > 0 else f"signal {-result.status}"
        await on_line(f" !     {name} buildpack failed to compile: {how}")
        if limits.memory_mb and out_of_memory(result.status, result.tail):
            reason = f"{memory_message(limits.memory_mb)} ({bp.ref} failed: {how})"
        else:
            hint = f", memory limit {limits.memory_mb} MiB" if limits.memory_mb else ""
            reason = f"buildpack {bp.ref} failed to compile this app ({how}{hint})"
        raise BuildError(
            f"{reason}; its output ends:\n" + "\n".join(result.tail[-20:]), result.tail
        )


async def _release(box: Sandbox, bp: _Placed, name: str, on_line: LineCallback) -> dict[str, str]:
    argv = [box.inside(bp.path / "bin" / "release"), box.inside(box.app)]
    if not (bp.path / "bin" / "release").is_file():
        return {}
    result = await box.run(argv, env={"STACK": "flynnp2p"}, on_line=on_line, capture_stdout=True)
    if result.status != 0:
        raise BuildError(
            f"buildpack {bp.ref}: bin/release exited with {result.status}", result.tail
        )
    try:
        return parse_default_process_types(result.stdout)
    except UserError as exc:
        raise BuildError(f"buildpack {bp.ref}: {exc.message}") from None


# -- 7. the slug -------------------------------------------------------------------------


def _app_procfile(app: Path) -> dict[str, str]:
    """The built app's own Procfile, parsed ({} when it has none); never through a
    link the build left (the build's uid owns the tree, this runs as the agent)."""
    path = app / "Procfile"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError:  # ELOOP: a symlink
        raise BuildError("the built app's Procfile must be a regular file of at most 64 KiB") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SMALL_FILE:
            raise BuildError("the built app's Procfile must be a regular file of at most 64 KiB")
        text = f.read(_MAX_SMALL_FILE + 1).decode("utf-8", "replace")
    try:
        return parse_procfile(text)
    except UserError as exc:
        raise BuildError(f"the built app's {exc.message}") from None


def _write_procfile(app: Path, types: Mapping[str, str]) -> None:
    """Write the process types (the buildpacks' defaults, the app's Procfile over
    them) as the slug's Procfile: a new file, never through what the build left."""
    path = app / "Procfile"
    with contextlib.suppress(FileNotFoundError):
        if not path.is_dir() or path.is_symlink():
            path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{name}: {command}\n" for name, command in sorted(types.items())))


@dataclass(frozen=True, slots=True)
class _Slug:
    path: Path  # still inside the sandbox
    digest: str
    size: int
    procfile: dict[str, str]


async def _pack(box: Sandbox, on_line: LineCallback) -> _Slug:
    tmp_slug = box.tmp / "slug.tgz"
    # Made here, so the check can follow it from the start; the build's to write.
    await trio.to_thread.run_sync(_own_empty_file, tmp_slug, box.uid if box.isolation != "none" else None)
    parent = "/" if box.isolation == "namespaces" else str(box.app.parent)
    argv = [
        # gzip -1: the default -6 took twice the time of -3 for a slug 4 % smaller, and
        # -3 about 1.5x the time of -1 (the example's slug, 8.8 MB of files, most of
        # them the venv's interpreter: 3.41 MB at -3, 3.58 MB at -1). The slug is
        # packed on the path of every git push; the 5 % more bytes cost less to move.
        "tar", "--create", "--use-compress-program=gzip -1", "--file", box.inside(tmp_slug),
        "--owner=0", "--group=0",
        "--numeric-owner", "--directory", parent, "./app",
    ]  # fmt: skip
    packed = threading.Event()
    checked: list[_Slug | SlugError | UserError] = []

    async def check() -> None:
        try:
            checked.append(await trio.to_thread.run_sync(_check_slug, tmp_slug, packed))
        except (SlugError, UserError) as exc:  # (others: raised, bugs)
            checked.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        try:
            result = await box.run(argv, env={}, on_line=on_line, merge_stderr=True)
        finally:
            packed.set()  # the check reads to the file's end, then stops
    if result.status != 0 and any("No space left on device" in line for line in result.tail):
        raise OSError(errno.ENOSPC, "No space left on device (packing the slug)")
    if result.status != 0:
        raise BuildError(f"packing the slug failed (tar exited with {result.status})", result.tail)
    try:
        if not isinstance(checked[0], _Slug):
            raise checked[0]
        await trio.to_thread.run_sync(_give_back, tmp_slug)
        return checked[0]
    except SlugError as exc:
        raise BuildError(f"the built app cannot be a slug: {exc.message}") from None
    except UserError as exc:  # the Procfile
        raise BuildError(f"the built app's {exc.message}") from None


def _own_empty_file(path: Path, uid: int | None) -> None:
    path.write_bytes(b"")
    if uid is not None:
        os.chown(path, uid, uid)


def _give_back(path: Path) -> None:
    os.chown(path, os.geteuid(), os.getegid())  # it was the build's; now the caller's


class _HashingReader:
    """A binary file read through sha256: every byte the tar reader takes is hashed.
    With `written`: a file another process is writing, followed as it grows, its end
    the end once `written` is set."""

    def __init__(self, f: BinaryIO, written: threading.Event | None = None) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.written = written

    def read(self, size: int = -1) -> bytes:
        want = size if size > 0 else 1 << 20
        while True:
            data = self.f.read(want)
            if data or self.written is None:
                break
            if self.written.is_set():  # nothing more comes: what is left, then the end
                data = self.f.read(want)
                break
            self.written.wait(0.005)
        self.h.update(data)
        return data


def _check_slug(tmp_slug: Path, written: threading.Event | None = None) -> _Slug:
    """Check the members as a job host will, read the Procfile, hash the file: in one
    pass over the file (decompressed once, each byte hashed as it is read); with
    `written`, while it is being written (followed until `written` is set)."""
    procfiles: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}  # the last of each name
    with tmp_slug.open("rb") as raw:
        reader = _HashingReader(raw, written)
        try:
            with open_tar_stream(cast(BinaryIO, reader)) as tar:
                for member in tar:
                    check_members([member])
                    if member.name in PROCFILE_MEMBERS:
                        f = tar.extractfile(member) if _procfile_ok(member) else None
                        procfiles[member.name] = (member, f.read() if f is not None else None)
        except READ_ERRORS as exc:
            raise SlugError(f"the packed slug is not readable: {exc}") from None
        while reader.read(1 << 20):  # anything after the gzip stream: the digest is the file's
            pass
    procfile = _slug_procfile(procfiles)
    if written is None:
        _give_back(tmp_slug)
    return _Slug(tmp_slug, f"sha256:{reader.h.hexdigest()}", tmp_slug.stat().st_size, procfile)


def _procfile_ok(member: tarfile.TarInfo) -> bool:
    return member.isfile() and member.size <= MAX_PROCFILE


def _slug_procfile(found: Mapping[str, tuple[tarfile.TarInfo, bytes | None]]) -> dict[str, str]:
    """The Procfile a host reads from the slug (`procfile.read_slug_procfile`'s choice:
    the last member of the first name in ``PROCFILE_MEMBERS``), from the members the
    pass kept; {} when it has none."""
    for name in PROCFILE_MEMBERS:
        if name not in found:
            continue
        member, data = found[name]
        if data is None or not _procfile_ok(member):
            raise UserError(f"slug: {name} must be a regular file of at most 64 KiB")
        return parse_procfile(data.decode("utf-8", "replace"))
    return {}
