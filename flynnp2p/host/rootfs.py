"""Image archives on disk: checked when deployed, unpacked once per digest on a host.

Theory of operation
-------------------
`read_archive` is what the API runs on a ``docker save`` upload before it makes a
release: the manifest, the config (`flynnp2p.host.image`) and the image id, and
every layer's members planned (`flynnp2p.host.imagearchive.plan_layer`), so a
hostile or broken archive is refused with a 400 then, not on a host later.

`unpack_image` is what a process-backend host runs before a job of the image
starts: the root filesystem is built in ``<root>/images/<digest>/`` exactly once
(a temporary sibling renamed into place, as slugs are: a reader never sees half
an image, two concurrent unpacks leave one), with the image's config beside it
in ``config.json``. That directory is root's alone (0700): a job sees the image
only through its chroot, read-only, so no other app's job on the host can reach
the files an image left world-writable. The layers are applied in order by `_apply_layer`: first the
layer's opaque directories are emptied and its whiteouts deleted, then its
entries are written.

The writer never follows a symlink: every parent of a path it touches must be a
real directory (missing ones are made), else the archive is refused; files are
created with ``O_EXCL | O_NOFOLLOW`` after whatever was at the path is removed;
hard links must name a path inside the root that does not pass through a link.
So no member, whatever the order of the layers, writes outside the root. The
total written is bounded (`MAX_ROOTFS_BYTES`, `MAX_ENTRIES`).

A full disk: before a layer's files are written, their size must fit with
`flynnp2p.host.space.RESERVE_BYTES` to spare (else the unpack stops before it
fills the disk the node's state lives on); a write that fails with ENOSPC all
the same stops it too. Either way the temporary sibling is removed (nothing
half-unpacked is left for a later unpack to trip over) and the error is
`InsufficientStorage`, "no space left on <node>: image … was not unpacked (…)",
which the job that needed the image reports as its reason.

The job's own mounts go on ``/tmp``, ``/dev`` and ``/proc`` of the root
(`flynnp2p.host.chroot`), so those three are made plain empty directories here,
whatever the image had there (a symlink there would point a mount out of the root).

Blocking (tarfile, the file system): the async entry points run it in a thread.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import trio

from flynnp2p.errors import InsufficientStorage
from flynnp2p.host.image import ImageConfig, image_config
from flynnp2p.host.imagearchive import (
    MANIFEST,
    MAX_CONFIG,
    MAX_MANIFEST,
    ArchiveError,
    Kind,
    LayerPlan,
    Manifest,
    Member,
    config_section,
    parse_manifest,
    plan_layer,
)
from flynnp2p.host.slug import move_into_place
from flynnp2p.host.space import is_full, no_space, room_for

MAX_ROOTFS_BYTES = 16 << 30  # what one image may unpack to
MAX_ENTRIES = 1_000_000
MOUNT_POINTS = ("tmp", "dev", "proc")  # the job's own mounts (flynnp2p.host.chroot)
_CHUNK = 1 << 20
_DIGEST = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # as host.slug checks it


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    manifest: Manifest
    config: ImageConfig
    image_id: str  # sha256:<hex> of the config document, as the engine names the image


@dataclass(frozen=True, slots=True)
class UnpackedImage:
    rootfs: Path
    config: ImageConfig


def _kind(info: tarfile.TarInfo) -> Kind:
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    return "other"


def _members(tar: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, Member]]:
    return [(i, Member(i.name, _kind(i), i.mode, i.linkname)) for i in tar.getmembers()]


def _open_outer(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(
            f"not a docker save archive (an uncompressed tar with {MANIFEST}): {exc}; "
            "make one with 'docker save IMAGE -o FILE' (gunzip it first if it is gzipped)"
        ) from None


def _read(tar: tarfile.TarFile, name: str, limit: int) -> bytes:
    try:
        info = tar.getmember(name)
    except KeyError:
        raise ArchiveError(f"image archive: it has no member {name!r}") from None
    f = tar.extractfile(info)
    if f is None:
        raise ArchiveError(f"image archive: member {name!r} is not a file")
    data = f.read(limit + 1)
    if len(data) > limit:
        raise ArchiveError(f"image archive: member {name!r} is over {limit} bytes")
    return data


def _layer(tar: tarfile.TarFile, name: str) -> tarfile.TarFile:
    try:
        f = tar.extractfile(tar.getmember(name))
    except KeyError:
        raise ArchiveError(
            f"image archive: the manifest names layer {name!r}, which it lacks"
        ) from None
    if f is None:
        raise ArchiveError(f"image archive: layer {name!r} is not a file")
    try:
        return tarfile.open(fileobj=f, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"image archive: layer {name!r} is not a tar: {exc}") from None


def _layer_members(
    tar: tarfile.TarFile, name: str
) -> tuple[tarfile.TarFile, list[tarfile.TarInfo], LayerPlan]:
    layer = _layer(tar, name)
    try:
        pairs = _members(layer)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"image archive: layer {name!r} is not a readable tar: {exc}") from None
    if len(pairs) > MAX_ENTRIES:
        raise ArchiveError(f"image archive: layer {name!r} has over {MAX_ENTRIES} members")
    return layer, [i for i, _ in pairs], plan_layer(m for _, m in pairs)


def read_archive(path: Path, *, check_layers: bool = True) -> ArchiveInfo:
    """The image a ``docker save`` archive holds (blocking); ArchiveError if it is not one."""
    with _open_outer(path) as tar:
        manifest = parse_manifest(_read(tar, MANIFEST, MAX_MANIFEST))
        raw = _read(tar, manifest.config, MAX_CONFIG)
        config = image_config(config_section(raw))
        if check_layers:
            for name in manifest.layers:
                layer, _, _ = _layer_members(tar, name)
                layer.close()
    return ArchiveInfo(manifest, config, "sha256:" + hashlib.sha256(raw).hexdigest())


async def inspect_archive(path: Path) -> ArchiveInfo:
    return await trio.to_thread.run_sync(read_archive, path)


# -- applying layers ---------------------------------------------------------------


def _parent(root: Path, rel: str, *, create: bool) -> Path | None:
    """``root/<rel's parent>``, every component a real directory (made when `create`);
    None if one is missing and not made. ArchiveError if one is a symlink or a file."""
    current = root
    for part in rel.split("/")[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(current, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise ArchiveError(f"image archive: {rel!r} goes through the symlink {part!r}; refused")
        if not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(
                f"image archive: {rel!r} goes through {part!r}, which is not a directory"
            )
    return current


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class _Budget:
    def __init__(self) -> None:
        self.bytes = 0

    def copy(self, src: IO[bytes], fd: int) -> None:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                self.bytes += len(chunk)
                if self.bytes > MAX_ROOTFS_BYTES:
                    raise ArchiveError(f"image archive unpacks to over {MAX_ROOTFS_BYTES} bytes")
                out.write(chunk)


def _apply_layer(
    layer: tarfile.TarFile,
    infos: list[tarfile.TarInfo],
    plan: LayerPlan,
    root: Path,
    budget: _Budget,
) -> None:
    for directory in plan.opaque:
        parent = _parent(root, f"{directory}/x" if directory else "x", create=False)
        if parent is not None and _is_real_dir(parent):
            for child in os.listdir(parent):
                _remove(parent / child)
    for rel in plan.deletions:
        parent = _parent(root, rel, create=False)
        if parent is not None:
            _remove(parent / rel.rpartition("/")[2])
    needed = sum(infos[e.index].size for e in plan.entries if e.kind == "file")
    short = room_for(root, needed)
    if short is not None:
        raise OSError(errno.ENOSPC, f"a layer's files do not fit: {short}")
    for entry in plan.entries:
        if not entry.path:
            os.chmod(root, entry.mode | 0o700)
            continue
        parent = _parent(root, entry.path, create=True)
        assert parent is not None
        target = parent / entry.path.rpartition("/")[2]
        if entry.kind == "dir":
            if not _is_real_dir(target):
                _remove(target)
                os.mkdir(target, 0o700)
            os.chmod(target, entry.mode | 0o700, follow_symlinks=False)
            continue
        _remove(target)
        if entry.kind == "symlink":
            os.symlink(entry.link, target)
        elif entry.kind == "hardlink":
            src_parent = _parent(root, entry.link, create=False)
            source = None if src_parent is None else src_parent / entry.link.rpartition("/")[2]
            if source is None or not os.path.lexists(source) or source.is_dir():
                raise ArchiveError(
                    f"image archive: hard link {entry.path!r} -> {entry.link!r} has no file to link"
                )
            os.link(source, target, follow_symlinks=False)
        else:
            src = layer.extractfile(infos[entry.index])
            if src is None:
                raise ArchiveError(f"image archive: {entry.path!r} has no data")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, entry.mode)
            budget.copy(src, fd)


def apply_layers(archive: Path, root: Path) -> ImageConfig:
    """Build the image's root filesystem in the (empty) directory `root` (blocking)."""
    with _open_outer(archive) as tar:
        manifest = parse_manifest(_read(tar, MANIFEST, MAX_MANIFEST))
        config = image_config(config_section(_read(tar, manifest.config, MAX_CONFIG)))
        budget = _Budget()
        for name in manifest.layers:
            layer, infos, plan = _layer_members(tar, name)
            with layer:
                try:
                    _apply_layer(layer, infos, plan, root, budget)
                except (tarfile.TarError, EOFError) as exc:
                    raise ArchiveError(
                        f"image archive: layer {name!r} is truncated: {exc}"
                    ) from None
    for name in MOUNT_POINTS:
        _remove(root / name)
        os.mkdir(root / name, 0o755)
    os.chmod(root, 0o755)
    return config


def _config_file(dest: Path) -> Path:
    return dest / "config.json"


def _unpack_sync(archive: Path, dest: Path, node: str) -> ImageConfig:
    if not dest.is_dir():
        tmp: Path | None = None
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            (tmp / "rootfs").mkdir()
            config = apply_layers(archive, tmp / "rootfs")
            _config_file(tmp).write_text(json.dumps(asdict(config)))
            move_into_place(tmp, dest)
        except OSError as exc:
            if not is_full(exc):
                raise
            why = exc.strerror or str(exc)
            raise InsufficientStorage(
                no_space(node, f"image {dest.name} was not unpacked", why)
            ) from None
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return _load_config(_config_file(dest))


def _load_config(path: Path) -> ImageConfig:
    doc = json.loads(path.read_text())
    return ImageConfig(
        entrypoint=tuple(doc["entrypoint"]),
        cmd=tuple(doc["cmd"]),
        env=tuple((k, v) for k, v in doc["env"]),
        workdir=doc["workdir"],
        ports=tuple(doc["ports"]),
    )


async def unpack_image(
    archive: Path, root: Path, digest: str, *, node: str = "this host"
) -> UnpackedImage:
    """The image of `archive` unpacked once into ``root/images/<digest>``;
    `InsufficientStorage` (naming `node`) when it does not fit."""
    if not _DIGEST.match(digest):
        raise ArchiveError(
            f"image digest {digest!r} is not valid; expected [A-Za-z0-9_.:-]{{1,128}}"
        )
    dest = root / "images" / digest
    config = await trio.to_thread.run_sync(_unpack_sync, archive, dest, node)
    return UnpackedImage(dest / "rootfs", config)
