"""git commands of the ``flynnp2p`` CLI: the ``flynnp2p`` remote and git's credential helper.

    flynnp2p git remote add [-a APP] [--remote NAME]
        adds (or repoints) the remote NAME (default ``flynnp2p``) of the current
        git work tree to ``http://NODE:PORT/git/APP.git`` (the configured cluster's
        node), with ``flynnp2p git-credentials`` as its credential helper
    flynnp2p git-credentials get|store|erase
        git's credential helper protocol (gitcredentials(7)): ``get`` reads
        ``key=value`` lines on stdin and, for the configured cluster's scheme and
        host:port only, prints ``username=flynnp2p`` and ``password=<API key>``;
        ``store`` and ``erase`` do nothing (the CLI's config holds the token)

The helper is configured per remote URL (``credential.<url>.helper``), after an
empty value that clears the helpers of the user's own config for that URL, and
runs as ``<this python> -m flynnp2p``: it works when flynnp2p is only in a venv.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

from flynnp2p.cli.client import ClientConfig
from flynnp2p.cli.common import app_of, client_for
from flynnp2p.errors import UserError
from flynnp2p.token import api_key_from

DEFAULT_REMOTE = "flynnp2p"
USERNAME = "flynnp2p"


def git(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot run git ({exc}); is git installed?") from None
    if check and done.returncode != 0:
        raise UserError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def in_work_tree() -> bool:
    try:
        return git("rev-parse", "--is-inside-work-tree", check=False).stdout.strip() == "true"
    except UserError:
        return False


def remote_url(cluster_url: str, app: str) -> str:
    return f"{cluster_url.rstrip('/')}/git/{quote(app, safe='')}.git"


def helper_command(cluster: str | None) -> str:
    """The credential helper as git runs it (``!`` = a shell command; git appends
    ``get``)."""
    words = [sys.executable, "-m", "flynnp2p"]
    if cluster:
        words += ["-c", cluster]
    return "!" + " ".join(shlex.quote(w) for w in [*words, "git-credentials"])


def add_remote(app: str, cluster: str | None, remote: str = DEFAULT_REMOTE) -> str:
    """Point `remote` of the current work tree at `app`; its URL."""
    cluster_url, _ = ClientConfig.load().target(cluster)
    url = remote_url(cluster_url, app)
    if git("remote", "get-url", remote, check=False).returncode == 0:
        git("remote", "set-url", remote, url)
    else:
        git("remote", "add", remote, url)
    key = f"credential.{url}.helper"
    git("config", "--unset-all", key, check=False)
    git("config", "--add", key, "")
    git("config", "--add", key, helper_command(cluster))
    return url


def cmd_git_remote_add(args: argparse.Namespace) -> int:
    if not in_work_tree():
        raise UserError("not in a git work tree (run 'git init' first, or cd into one)")
    app = client_for(args).get(f"/v1/apps/{quote(app_of(args), safe='')}")["app"]["name"]
    url = add_remote(app, args.cluster, args.remote)
    print(f"git remote {args.remote}: {url}  (push with: git push {args.remote} main)")
    return 0


def read_credential_request(stream: TextIO) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stream:
        line = line.rstrip("\n")
        if not line:
            break
        key, eq, value = line.partition("=")
        if eq:
            fields[key] = value
    return fields


def credential_answer(fields: dict[str, str], cluster_url: str, token: str) -> str:
    """What ``get`` prints: the credential, for the cluster's own scheme and host only."""
    target = urlsplit(cluster_url)
    if fields.get("protocol") != target.scheme or fields.get("host") != target.netloc:
        return ""
    return f"username={USERNAME}\npassword={api_key_from(token)}\n"


def cmd_git_credentials(args: argparse.Namespace) -> int:
    fields = read_credential_request(sys.stdin)
    if args.operation != "get":
        return 0
    url, token = ClientConfig.load().target(args.cluster)
    sys.stdout.write(credential_answer(fields, url, token))
    return 0


def add_git_commands(sub: Any) -> None:
    p = sub.add_parser("git", help="the git remote of an app")
    cmds = p.add_subparsers(dest="git_cmd", metavar="SUBCOMMAND", required=True)
    remote = cmds.add_parser("remote", help="the app's git remote").add_subparsers(
        dest="remote_cmd", metavar="SUBCOMMAND", required=True
    )
    add = remote.add_parser("add", help="add the app's remote (with its credential helper)")
    add.add_argument("-a", "--app", help="app name (default: from the 'flynnp2p' remote)")
    add.add_argument("--remote", default=DEFAULT_REMOTE, help="remote name (default flynnp2p)")
    add.set_defaults(func=cmd_git_remote_add)
    cred = sub.add_parser("git-credentials", help="git's credential helper (used by git itself)")
    cred.add_argument("operation", choices=("get", "store", "erase"))
    cred.set_defaults(func=cmd_git_credentials)
