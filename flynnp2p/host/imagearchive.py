"""``docker save`` archives, read: the manifest, the layer order, whiteouts, path checks.

Theory of operation
-------------------
A ``docker save`` archive is an uncompressed tar holding ``manifest.json`` (a list
with one entry per image: the member holding its config, its repo tags, and the
members holding its layers, bottom layer first), the config (JSON), and one tar
per layer. The legacy layout (``<id>/layer.tar``, ``<hex>.json``) and the OCI one
(``blobs/sha256/<hex>``) both name their members in the manifest, so the manifest
is the only thing trusted for the layout (`parse_manifest`). An archive of one
image is deployable; one of several is refused (say which to deploy by saving it
alone). The image's id is the sha256 of its config document, as the engine counts
it, so a host on the docker backend can tell whether it already has the image.

The root filesystem is the layers applied in order. In a layer, ``D/.wh.NAME``
deletes ``D/NAME`` of the layers below it, and ``D/.wh..wh..opq`` makes ``D``
opaque: what the layers below put in ``D`` goes. Whiteouts act on the lower layers
only, so a layer's deletions are all made before any of its entries is written:
`plan_layer` splits a layer's members into the two, in that order.

Everything here is hostile input. Every member name is normalised
(`member_path`) and refused when it is absolute, climbs with ``..``, is empty or
holds a NUL; a whiteout naming ``.`` or ``..`` is refused too; a hard link's target
is checked like a name. A symlink's target is kept as it is: absolute targets are
normal in a root filesystem and are resolved inside the chroot when the job runs,
so the writer (`flynnp2p.host.rootfs`) never follows a symlink and refuses a member
whose parent is one (that is how a layer would write through a link out of the
root). Device files, FIFOs and sockets are skipped (a job must not get a device
node, and has no use for the others); setuid, setgid and sticky... bits beyond
``0o1777`` are dropped (the files belong to the agent's root, the job is not root).

Pure: no I/O. `Member` is what the reader takes from each tar header.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from flynnp2p.errors import UserError

MANIFEST = "manifest.json"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MODE_BITS = 0o1777  # what is kept of a member's mode: no setuid, no setgid
MAX_LAYERS = 256  # docker's own limit is 127; more is not an image
MAX_MANIFEST = 1 << 20
MAX_CONFIG = 1 << 20

Kind = Literal["file", "dir", "symlink", "hardlink", "other"]


class ArchiveError(UserError):
    """The upload is not a ``docker save`` archive, or it is one that cannot be used safely."""

    code = "bad_image_archive"


@dataclass(frozen=True, slots=True)
class Member:
    """A tar header, as much of it as the rules need."""

    name: str
    kind: Kind
    mode: int = 0o644
    linkname: str = ""


@dataclass(frozen=True, slots=True)
class Manifest:
    config: str  # the member holding the config document
    layers: tuple[str, ...]  # the members holding the layer tars, bottom first
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    """Something a layer writes: `index` is its member's position in the layer."""

    index: int
    path: str  # normalised, relative to the root
    kind: Kind
    mode: int
    link: str = ""  # a symlink's target as it is, or a hard link's normalised target


@dataclass(frozen=True, slots=True)
class LayerPlan:
    opaque: tuple[str, ...]  # directories whose lower contents go ("" is the root)
    deletions: tuple[str, ...]  # paths of the lower layers that go
    entries: tuple[Entry, ...]  # then these are written, in order
    skipped: tuple[str, ...] = ()  # devices, FIFOs and the like, left out


def member_path(name: str, what: str = "member") -> str:
    """`name` normalised to a relative path ("" is the root itself); ArchiveError if it is unsafe."""
    if "\0" in name:
        raise ArchiveError(f"image archive: {what} {name[:80]!r} has a NUL in its name")
    if name.startswith("/"):
        raise ArchiveError(f"image archive: {what} {name[:80]!r} is an absolute path; refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"image archive: {what} {name[:80]!r} climbs out with '..'; refused")
    return "/".join(parts)


def _child(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def plan_layer(members: Iterable[Member]) -> LayerPlan:
    """What applying one layer does, in order: opaque dirs, deletions, then entries."""
    opaque: list[str] = []
    deletions: list[str] = []
    entries: list[Entry] = []
    skipped: list[str] = []
    for index, m in enumerate(members):
        path = member_path(m.name)
        directory, _, base = path.rpartition("/")
        if base == OPAQUE:
            opaque.append(directory)
            continue
        if base.startswith(WHITEOUT):
            target = base[len(WHITEOUT) :]
            if target.startswith(WHITEOUT):
                continue  # aufs bookkeeping (.wh..wh.plnk and the like): nothing to apply
            if target in ("", ".", ".."):
                raise ArchiveError(
                    f"image archive: whiteout {m.name[:80]!r} names no file; refused"
                )
            deletions.append(_child(directory, target))
            continue
        if not path:
            if m.kind != "dir":
                raise ArchiveError(f"image archive: member {m.name[:80]!r} would replace the root")
            entries.append(Entry(index, "", "dir", m.mode & MODE_BITS))
            continue
        if m.kind == "hardlink":
            link = member_path(m.linkname, "hard link target")
            if not link:
                raise ArchiveError(f"image archive: hard link {m.name[:80]!r} points at the root")
            entries.append(Entry(index, path, "hardlink", 0, link))
        elif m.kind == "symlink":
            if not m.linkname or "\0" in m.linkname:
                raise ArchiveError(f"image archive: symlink {m.name[:80]!r} has no usable target")
            entries.append(Entry(index, path, "symlink", 0o777, m.linkname))
        elif m.kind in ("file", "dir"):
            entries.append(Entry(index, path, m.kind, m.mode & MODE_BITS))
        else:
            skipped.append(path)
    return LayerPlan(tuple(opaque), tuple(deletions), tuple(entries), tuple(skipped))


def _load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"image archive: {what} is not JSON ({exc})") from None


def parse_manifest(data: bytes) -> Manifest:
    """The one image a ``docker save`` archive's ``manifest.json`` describes."""
    if len(data) > MAX_MANIFEST:
        raise ArchiveError(f"image archive: {MANIFEST} is over {MAX_MANIFEST} bytes")
    doc = _load_json(data, MANIFEST)
    if not isinstance(doc, list) or not doc:
        raise ArchiveError(f"image archive: {MANIFEST} must be a list of images")
    if len(doc) > 1:
        raise ArchiveError(
            f"image archive holds {len(doc)} images; save the one to deploy alone (docker save IMAGE)"
        )
    image = doc[0]
    if not isinstance(image, dict):
        raise ArchiveError(f"image archive: {MANIFEST}[0] must be an object")
    config, layers, tags = image.get("Config"), image.get("Layers"), image.get("RepoTags") or []
    if not isinstance(config, str) or not config:
        raise ArchiveError(f"image archive: {MANIFEST}[0].Config must name the config member")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ArchiveError(f"image archive: {MANIFEST}[0].Layers must be a list of member names")
    if len(layers) > MAX_LAYERS:
        raise ArchiveError(f"image archive: {len(layers)} layers; at most {MAX_LAYERS} are taken")
    if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
        raise ArchiveError(f"image archive: {MANIFEST}[0].RepoTags must be a list of strings")
    return Manifest(
        config=member_path(config, "config"),
        layers=tuple(member_path(x, "layer") for x in layers),
        tags=tuple(tags),
    )


def config_section(data: bytes) -> Any:
    """The ``config`` object of an image config document (its run configuration)."""
    if len(data) > MAX_CONFIG:
        raise ArchiveError(f"image archive: the image config is over {MAX_CONFIG} bytes")
    doc = _load_json(data, "the image config")
    if not isinstance(doc, dict):
        raise ArchiveError("image archive: the image config must be an object")
    return doc.get("config")
