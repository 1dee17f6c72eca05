"""What more than one command of the ``flynnp2p`` CLI needs: one home for each.

Which cluster (`client_for`), which app (`app_of`, `app_path`, the shared
``-a/--app --json`` options, ``NAME=VALUE`` pairs), how output looks (`table`,
`print_json`) and how a job or a blocked process type is named in a line
(`short_job`, `reason_text`, `blocked_text`).

The CLI's modules import as a tree, never in a cycle (``tests/test_cli_imports.py``
keeps it so)::

    main    → apps, jobs, common, client; join lazily (it imports the agent)
    apps    → scale, common, client
    jobs    → common, client
    scale   → common, client
    common  → client

A helper that a second command module needs moves here; nothing here imports
a command module.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from flynnp2p import vocab
from flynnp2p.cli.client import ApiClient, ClientConfig
from flynnp2p.errors import UserError

_REMOTE_APP = re.compile(r"[/:]([^/:]+?)\.git/?$")
REASON_STATES = ("crashed", "down", "stopping", "lost")


# -- which cluster, which app -------------------------------------------------


def client_for(args: argparse.Namespace) -> ApiClient:
    conf = ClientConfig.load()
    url, token = conf.target(args.cluster)
    return ApiClient(url, token, ca=conf.ca_of(args.cluster))


def app_from_git_remote() -> str | None:
    """The app named by the ``flynnp2p`` git remote of the current directory, if any."""
    try:
        out = subprocess.run(
            ["git", "remote", "get-url", "flynnp2p"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _REMOTE_APP.search(out.stdout.strip()) if out.returncode == 0 else None
    return match.group(1) if match else None


def app_of(args: argparse.Namespace) -> str:
    app: str | None = getattr(args, "app", None) or app_from_git_remote()
    if not app:
        raise UserError("no app: pass -a APP (or run in a git checkout with a 'flynnp2p' remote)")
    return app


def app_path(args: argparse.Namespace, *rest: str) -> str:
    return "/".join(["/v1/apps", *(quote(p, safe="") for p in (app_of(args), *rest))])


def app_options(*, nested: bool) -> argparse.ArgumentParser:
    """-a/--app and --json; nested parsers must not overwrite values given above them."""
    p = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS if nested else None
    p.add_argument("-a", "--app", default=default, help="the app (default: from the 'flynnp2p' git remote)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if nested else False,
                   help="print the API's JSON")  # fmt: skip
    return p


def env_pairs(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not vocab.ENV_NAME.ok(key):
            raise UserError(f"expected NAME=VALUE with NAME like [A-Za-z_][A-Za-z0-9_]*, got {item!r}")
        out[key] = value
    return out


# -- output -------------------------------------------------------------------


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def print_json(body: Any) -> None:
    print(json.dumps(body, indent=2))


def short_job(job_id: str, mark: str = "") -> str:
    """``web-3f2a`` for ``web-3f2a9c0e…``: the type and four characters; `mark` if cut."""
    head, sep, tail = job_id.rpartition("-")
    if sep and head and len(tail) > 4:
        return f"{head}-{tail[:4]}{mark}"
    return job_id


def reason_text(job: Mapping[str, Any]) -> str:
    """Why a crashed, down, stopping or lost job is what it is ('' for the others)."""
    if job.get("state") not in REASON_STATES:
        return ""
    parts = [str(job["reason"])] if job.get("reason") else []
    if job.get("exit_code") is not None:
        parts.append(f"exit {job['exit_code']}")
    if job.get("restarts"):
        parts.append(f"{job['restarts']} restarts")
    return "; ".join(parts)


def blocked_what(entry: Mapping[str, Any]) -> str:
    """``2 x web``, ``omni web runs nowhere`` (count 0), or a one-off's job id."""
    if entry.get("job_id"):
        return str(entry["job_id"])
    if entry["count"] == 0:
        return f"omni {entry['process_type']} runs nowhere"
    return f"{entry['count']} x {entry['process_type']}"


def blocked_text(entry: Mapping[str, Any]) -> str:
    """``2 x web: no host with tag disk=ssd`` (all reasons, ``; ``-separated)."""
    return f"{blocked_what(entry)}: {'; '.join(entry.get('reasons') or ()) or 'no reason given'}"
