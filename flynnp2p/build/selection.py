"""Which buildpacks a build runs, and what the app's process types are: the pure core.

Theory of operation
-------------------
A build runs an ordered list of buildpacks. Who chooses, first match wins:

1. the caller (``buildpacks=`` of ``builder.build``: an app setting),
2. the app's ``BUILDPACK_URL`` (one reference),
3. a ``.buildpacks`` file at the top of the source (one reference per line;
   blank lines and ``#`` comments skipped),
4. else detection: the built-ins of ``BUILTIN_ORDER`` are asked in turn
   (``bin/detect``) and the first that says yes is the only one run.

A reference (`parse_ref`) is the name of a built-in (``python``), an absolute path
to a buildpack directory, or a git URL (``https://``, ``http://``, ``git://``,
``ssh://``, ``file://``, ``user@host:path``) with an optional ``#ref`` (branch,
tag or commit). Anything else is refused with the accepted forms.

Process types: each buildpack's ``bin/release`` may name
``default_process_types``; later buildpacks override earlier ones type by type,
and the built app's ``Procfile`` overrides them all (`process_types`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from flynnp2p.errors import UserError

BUILTIN_ORDER = ("python", "nodejs", "static", "procfile")
MAX_BUILDPACKS = 8

_GIT_SCHEMES = ("https://", "http://", "git://", "ssh://", "file://")
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s]+$")  # git@host:owner/repo.git
_GIT_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
ACCEPTED = (
    "a built-in name (" + ", ".join(BUILTIN_ORDER) + "), an absolute path to a buildpack "
    "directory, or a git URL (https://, http://, git://, ssh://, file:// or user@host:path, "
    "optionally #branch-tag-or-commit)"
)


@dataclass(frozen=True, slots=True)
class BuildpackRef:
    kind: Literal["builtin", "path", "git"]
    location: str  # the built-in's name, the path, or the URL without its #ref
    ref: str | None = None  # git only: what to check out

    @property
    def name(self) -> str:
        """A short name for output and directory names."""
        if self.kind == "builtin":
            return self.location
        tail = self.location.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        tail = tail.removesuffix(".git")
        return re.sub(r"[^A-Za-z0-9._-]", "-", tail)[:60] or "buildpack"

    def __str__(self) -> str:
        return self.location + (f"#{self.ref}" if self.ref else "")


def parse_ref(text: str) -> BuildpackRef:
    """One buildpack reference (see the module docstring); UserError if it is none."""
    s = text.strip()
    if s in BUILTIN_ORDER:
        return BuildpackRef("builtin", s)
    if any(ch.isspace() for ch in s) or not s:
        raise UserError(f"buildpack {text!r} is not valid; expected {ACCEPTED}")
    if s.startswith("/"):
        if "\x00" in s or "/../" in f"{s}/":
            raise UserError(f"buildpack path {s!r} must be absolute, without '..'")
        return BuildpackRef("path", s.rstrip("/") or "/")
    if s.startswith(_GIT_SCHEMES) or _SCP_LIKE.match(s):
        url, _, ref = s.partition("#")
        if ref and not _GIT_REF.match(ref):
            raise UserError(f"buildpack {s!r}: the git ref {ref!r} is not a branch, tag or commit")
        return BuildpackRef("git", url, ref or None)
    raise UserError(f"buildpack {text!r} is not valid; expected {ACCEPTED}")


def parse_buildpacks_file(text: str) -> list[BuildpackRef]:
    """The references of a ``.buildpacks`` file, in order."""
    refs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            refs.append(parse_ref(line))
        except UserError as exc:
            raise UserError(f".buildpacks line {n}: {exc.message}") from None
    if len(refs) > MAX_BUILDPACKS:
        raise UserError(f".buildpacks lists {len(refs)} buildpacks; at most {MAX_BUILDPACKS}")
    return refs


def chosen_buildpacks(
    explicit: Iterable[str] | None, env: Mapping[str, str], buildpacks_file: str | None
) -> list[BuildpackRef] | None:
    """The buildpacks chosen for this build, or None when detection decides."""
    if explicit is not None:
        refs = [parse_ref(r) for r in explicit]
        if refs:
            return refs[:MAX_BUILDPACKS]
    url = env.get("BUILDPACK_URL", "").strip()
    if url:
        return [parse_ref(url)]
    if buildpacks_file is not None:
        refs = parse_buildpacks_file(buildpacks_file)
        if refs:
            return refs
    return None


def process_types(
    defaults: Iterable[Mapping[str, str]], procfile: Mapping[str, str] | None
) -> dict[str, str]:
    """Each buildpack's default process types in order, then the Procfile's over them."""
    types: dict[str, str] = {}
    for d in defaults:
        types.update(d)
    types.update(procfile or {})
    return dict(sorted(types.items()))
