"""Procfiles: ``type: command`` per line, as Heroku reads them; and a slug's Procfile.

A process type is letters, digits, ``_`` and ``-``; blank lines and lines starting
with ``#`` are skipped; anything else is an error that names the line. The
``web`` type gets a port (``$PORT``) and a TCP health check by default.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from flynnp2p.errors import UserError
from flynnp2p.state.records import ProcessSpec

_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]{0,62})\s*:\s*(\S.*?)\s*$")
MAX_PROCFILE = 64 * 1024
PROCFILE_MEMBERS = ("./app/Procfile", "app/Procfile")


def parse_procfile(text: str) -> dict[str, str]:
    types: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise UserError(
                f"Procfile line {n}: expected 'TYPE: COMMAND' (TYPE of letters, digits, _ and -), "
                f"got {line[:80]!r}"
            )
        if m.group(1) in types:
            raise UserError(f"Procfile line {n}: process type {m.group(1)!r} is defined twice")
        if len(m.group(2)) > 4096:
            raise UserError(f"Procfile line {n}: the command is longer than 4096 characters")
        types[m.group(1)] = m.group(2)
    return types


def process_specs(types: dict[str, str], memory_mb: int = 512) -> dict[str, ProcessSpec]:
    return {
        name: ProcessSpec(command=cmd, ports=(0,) if name == "web" else (), memory_mb=memory_mb)
        for name, cmd in types.items()
    }


def read_slug_procfile(tarball: Path) -> dict[str, str]:
    """The Procfile of a slug tarball (gzipped tar with ./app); {} when it has none."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for name in PROCFILE_MEMBERS:
                try:
                    member = tar.getmember(name)
                except KeyError:
                    continue
                if not member.isfile() or member.size > MAX_PROCFILE:
                    raise UserError(f"slug: {name} must be a regular file of at most 64 KiB")
                f = tar.extractfile(member)
                assert f is not None
                return parse_procfile(f.read().decode("utf-8", "replace"))
    except (tarfile.TarError, OSError, EOFError) as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"slug: not a gzipped tar archive ({why[:200]})") from None
    return {}
