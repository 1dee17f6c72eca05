"""``.slugignore``: paths removed from the build tree before any buildpack runs.

One pattern a line, as in ``.gitignore`` without negation: blank lines and ``#``
comments are skipped; ``*``, ``?`` and ``[...]`` match within one path segment,
``**`` any number of segments; a pattern with a ``/`` (other than a trailing one)
is anchored at the top of the app, one without matches the name at any depth; a
trailing ``/`` matches directories only. A matched directory goes whole. A line
starting with ``!`` is refused (Heroku does not support negation either).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flynnp2p.errors import UserError


@dataclass(frozen=True, slots=True)
class _Pattern:
    regex: re.Pattern[str]
    dirs_only: bool


def _segment(seg: str) -> str:
    """A regex for one glob segment: ``*`` and ``?`` never cross a ``/``."""
    out, i = [], 0
    while i < len(seg):
        ch = seg[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and (end := seg.find("]", i + 2)) != -1:
            body = seg[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _compile(pattern: str) -> _Pattern:
    dirs_only = pattern.endswith("/")
    body = pattern.rstrip("/")
    anchored = "/" in body
    segs = [s for s in body.lstrip("/").split("/") if s]
    parts: list[str] = []
    for i, seg in enumerate(segs):
        if seg == "**":
            parts.append("(?:[^/]+/)*" if i < len(segs) - 1 else ".*")
        else:
            parts.append(_segment(seg) + ("/" if i < len(segs) - 1 else ""))
    rx = "".join(parts)
    prefix = "" if anchored else "(?:.*/)?"
    return _Pattern(re.compile(f"^{prefix}{rx}$", re.S), dirs_only)


def parse_slugignore(text: str) -> list[str]:
    """The patterns of a ``.slugignore`` file; UserError on a negation."""
    patterns = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("!"):
            raise UserError(f".slugignore line {n}: negation ('!') is not supported")
        if s.strip("/") in ("", ".", "**"):
            raise UserError(f".slugignore line {n}: {s!r} would remove the whole app")
        patterns.append(s)
    return patterns


class SlugIgnore:
    """Matches app-relative POSIX paths (``dir/file.txt``) against the patterns."""

    def __init__(self, patterns: list[str]) -> None:
        self._patterns = [_compile(p) for p in patterns]

    def ignores(self, relpath: str, *, is_dir: bool) -> bool:
        return any(p.regex.match(relpath) and (is_dir or not p.dirs_only) for p in self._patterns)
