"""The output of a buildpack's ``bin/release``: a small YAML subset, parsed without PyYAML.

What a Heroku buildpack prints there is, in practice, a top-level mapping such as::

    ---
    addons: []
    config_vars:
      LANG: en_US.UTF-8
    default_process_types:
      web: gunicorn app:app --bind 0.0.0.0:$PORT

Only ``default_process_types`` is used (``config_vars`` and ``addons`` are read
past: env is the app's to set). Accepted: ``---``/``...`` markers, ``#`` comments,
top-level ``key:`` followed by an indented block of ``name: value`` lines, or
``key: {}`` / ``key: []`` / a scalar on the same line. A value is a plain scalar
(a `` #`` starts a comment), or a single-quoted (``''`` is a quote) or
double-quoted (``\\"``, ``\\\\``, ``\\n``, ``\\t``) string. Anything else under
``default_process_types`` (nesting, block scalars, flow mappings with content)
is an error that names the line; the rest of the document is not judged.
"""

from __future__ import annotations

import re

from flynnp2p import vocab
from flynnp2p.errors import UserError

_KEY = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)\s*:(?:\s+(.*?))?\s*$")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "/": "/"}


class ReleaseError(UserError):
    """A buildpack's ``bin/release`` printed something this subset does not read."""

    code = "bad_release"


def _scalar(raw: str, n: int) -> str:
    if raw.startswith("'"):
        if len(raw) < 2 or not raw.endswith("'"):
            raise ReleaseError(f"bin/release line {n}: unterminated single-quoted string")
        body = raw[1:-1]
        if "'" in body.replace("''", ""):
            raise ReleaseError(f"bin/release line {n}: a lone quote inside a quoted string")
        return body.replace("''", "'")
    if raw.startswith('"'):
        out, i = [], 1
        while i < len(raw):
            ch = raw[i]
            if ch == "\\" and i + 1 < len(raw):
                esc = _ESCAPES.get(raw[i + 1])
                if esc is None:
                    raise ReleaseError(f"bin/release line {n}: unsupported escape \\{raw[i + 1]}")
                out.append(esc)
                i += 2
                continue
            if ch == '"':
                if raw[i + 1 :].strip() and not raw[i + 1 :].strip().startswith("#"):
                    raise ReleaseError(f"bin/release line {n}: text after a closing quote")
                return "".join(out)
            out.append(ch)
            i += 1
        raise ReleaseError(f"bin/release line {n}: unterminated double-quoted string")
    value = re.split(r"\s#", raw, maxsplit=1)[0].strip()
    if value[:1] in ("|", ">", "{", "[", "&", "*", "!"):
        raise ReleaseError(f"bin/release line {n}: {value[:1]!r} values are not supported here")
    return value


def parse_default_process_types(text: str) -> dict[str, str]:
    """``default_process_types`` of a ``bin/release`` output ({} when absent)."""
    types: dict[str, str] = {}
    in_block = False
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped in ("---", "..."):
            continue
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise ReleaseError(f"bin/release line {n}: tabs cannot indent YAML")
        indented = line[:1] == " "
        if not indented:
            m = _KEY.match(line)
            if m is None:
                raise ReleaseError(f"bin/release line {n}: expected 'key:' at the top level")
            in_block = m.group(1) == "default_process_types"
            rest = (m.group(2) or "").split(" #")[0].strip()
            if in_block and rest not in ("", "{}", "~", "null"):
                raise ReleaseError(
                    f"bin/release line {n}: default_process_types must be a block of "
                    "'type: command' lines"
                )
            continue
        if not in_block:
            continue
        m = _KEY.match(stripped)
        if m is None or not m.group(2):
            raise ReleaseError(
                f"bin/release line {n}: expected 'type: command' under default_process_types"
            )
        name = m.group(1)
        if not vocab.PROCESS_TYPE.ok(name):
            raise ReleaseError(f"bin/release line {n}: {name!r} is not a valid process type")
        if name in types:
            raise ReleaseError(f"bin/release line {n}: process type {name!r} is defined twice")
        command = _scalar(m.group(2), n)
        if not command:
            raise ReleaseError(f"bin/release line {n}: process type {name!r} has no command")
        types[name] = command
    return types
