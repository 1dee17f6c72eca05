"""``docker save``-shaped archives made in Python, for the image tests (no engine needed)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# One layer member: (name, kind, payload, mode); payload is a file's bytes or a link's target.
Spec = tuple[str, str, bytes | str, int]

_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chr": tarfile.CHRTYPE,
}


def layer_tar(members: Sequence[Spec]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, mode in members:
            info = tarfile.TarInfo(name)
            info.type = _TYPES[kind]
            info.mode = mode
            data = b""
            if kind == "file":
                assert isinstance(payload, bytes)
                data = payload
                info.size = len(data)
            elif kind in ("symlink", "hardlink"):
                assert isinstance(payload, str)
                info.linkname = payload
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def config_doc(**config: Any) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": config}).encode()


def save_archive(
    path: Path,
    layers: Sequence[Sequence[Spec]],
    config: bytes | None = None,
    *,
    manifest: Any = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """An archive laid out as ``docker save`` (legacy layout) lays one out."""
    config = config if config is not None else config_doc(Cmd=["/bin/sh"])
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    files: dict[str, bytes] = {config_name: config}
    names = []
    for i, members in enumerate(layers):
        name = f"{i:064x}/layer.tar"
        files[name] = layer_tar(members)
        names.append(name)
    if manifest is None:
        manifest = [{"Config": config_name, "RepoTags": ["test:1"], "Layers": names}]
    files["manifest.json"] = json.dumps(manifest).encode()
    files.update(extra or {})
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
