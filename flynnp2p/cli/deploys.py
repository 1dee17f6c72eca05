"""Deploy commands of the ``flynnp2p`` CLI: deployment, rollback, app set/show.

``deployment`` lists an app's deploys (newest first): the release each moved
from and to, its strategy, status, how long it took, and why it failed.
``rollback [ID|vN]`` moves the app back to an earlier release (default: the one
before the current), asks first unless ``-y``, then waits for that deployment
and prints how it ended (`wait_for_deploy`, which ``env set`` and others can use
on any release they deploy). ``app set KEY=VALUE…`` changes the app's settings
(strategy, deploy_timeout_s, build_memory_mb, build_timeout_s); ``app show``
prints them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from flynnp2p import deployments
from flynnp2p.cli.client import ApiClient
from flynnp2p.cli.common import app_of, app_options, app_path, client_for, print_json, table
from flynnp2p.errors import UserError

SETTINGS: Mapping[str, str] = {
    "strategy": "auto, all-at-once or one-by-one",
    "deploy_timeout_s": "seconds, 5 to 3600",
    "build_memory_mb": "MB, 128 to 65536",
    "build_timeout_s": "seconds, 10 to 86400",
}


def release_versions(client: ApiClient, args: argparse.Namespace) -> dict[str, int]:
    releases = client.get(app_path(args, "releases"))["releases"]
    return {r["id"]: int(r.get("version", 0)) for r in releases}


def deployment_rows(
    deps: Sequence[Mapping[str, Any]], versions: Mapping[str, int], now_ms: int
) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for d in deps:
        old = deployments.version_of(versions, d.get("old_release_id"))
        new = deployments.version_of(versions, d.get("new_release_id"))
        took = f"{deployments.duration_s(d, now_ms):.1f}s"
        rows.append(
            (d["id"][:8], f"{old} → {new}", d["strategy"], d["status"], took, d.get("reason") or "")
        )
    return rows


def cmd_deployment(args: argparse.Namespace) -> int:
    client = client_for(args)
    deps = client.get(app_path(args, "deployments"))["deployments"]
    if args.json:
        print_json({"deployments": deps})
        return 0
    if not deps:
        print(f"app {app_of(args)} has no deployments yet")
        return 0
    rows = deployment_rows(deps, release_versions(client, args), int(time.time() * 1000))
    print(table(rows, ("ID", "RELEASE", "STRATEGY", "STATUS", "DURATION", "REASON")))
    return 0


def deploy_wait_options(p: argparse.ArgumentParser) -> None:
    """The options of a command that waits for the deploy it starts."""
    p.add_argument("-n", "--no-wait", action="store_true", help="do not wait for the deploy")
    p.add_argument("--timeout", type=float, default=180.0, metavar="S",
                   help="how long to wait for the deploy, in seconds (default 180)")  # fmt: skip


def wait_for_deploy(client: ApiClient, app: str, release_id: str, timeout_s: float) -> int:
    """Wait for the deployment of `release_id` and print how it ended; 0 if it
    completed, else 1 (failed, rolled back, or not finished in `timeout_s`)."""
    dep = deployments.wait_for_sync(
        client.get, app, release_id, timeout_s=timeout_s, sleep=time.sleep, monotonic=time.monotonic
    )
    if dep is None or not deployments.finished(dep):
        print(
            f"the deploy is not finished after {timeout_s:.0f} s: see 'flynnp2p deployment -a {app}'"
        )
        return 1
    tail: list[str] = []
    params = deployments.log_params(dep)
    if params is not None:
        try:
            resp = client.http.get(f"/v1/apps/{quote(app)}/log", params=params, timeout=15)
            tail = deployments.log_tail(resp.text) if resp.status_code == 200 else []
        except httpx.HTTPError:
            tail = []  # best effort: the reason is printed anyway
    releases = client.get(f"/v1/apps/{quote(app)}/releases")["releases"]
    versions = {r["id"]: int(r.get("version", 0)) for r in releases}
    for line in deployments.report(dep, versions, tail):
        print(line)
    return 0 if dep["status"] == "complete" else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    client = client_for(args)
    app = app_of(args)
    target = args.release or "the release before the current one"
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("rollback needs -y when not run at a terminal")
        answer = input(f"roll app {app} back to {target}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not rolled back")
            return 1
    body = {} if args.release is None else {"release": args.release}
    made = client.request("POST", app_path(args, "rollback"), json=body)
    if args.json:
        print_json(made)
        return 0
    release = made["release"] or {}
    print(f"rolling back {app} to v{release.get('version', '?')} (deployment {made['deployment']['id'][:8]}, "
          f"{made['deployment']['strategy']})")  # fmt: skip
    if args.no_wait:
        return 0
    return wait_for_deploy(client, app, made["formation"]["release_id"], args.timeout)


def parse_settings(items: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs of app settings, each checked for what is accepted."""
    out: dict[str, object] = {}
    accepted = "; ".join(f"{k} ({v})" for k, v in SETTINGS.items())
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTINGS:
            raise UserError(f"expected KEY=VALUE with KEY one of: {accepted}; got {item!r}")
        if key == "strategy":  # (its choices are checked by the API, their one home)
            out[key] = value
        else:
            try:
                out[key] = int(value)
            except ValueError:
                raise UserError(
                    f"{key}: expected a whole number ({SETTINGS[key]}), got {value!r}"
                ) from None
    return out


def show_app(app: Mapping[str, Any]) -> str:
    rows = [("name", app["name"]), ("id", app["id"])]
    rows += [(k, str(app.get(k, ""))) for k in SETTINGS]
    rows += [(f"meta.{k}", v) for k, v in sorted((app.get("meta") or {}).items())]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cmd_app(args: argparse.Namespace) -> int:
    settings = parse_settings(args.pairs) if args.app_cmd == "set" else None
    client = client_for(args)
    if settings is not None:
        body = client.request("PATCH", app_path(args), json=settings)
    else:
        body = client.get(app_path(args))
    if args.json:
        print_json(body)
        return 0
    print(show_app(body["app"]))
    return 0


def add_deploy_commands(sub: Any) -> None:
    top, nested = [app_options(nested=False)], [app_options(nested=True)]

    p = sub.add_parser(
        "deployment",
        parents=top,
        help="list the app's deploys: releases, strategy, status, duration",
    )
    p.set_defaults(func=cmd_deployment)

    p = sub.add_parser(
        "rollback", parents=top,
        help="move the app back to an earlier release (default: the one before the current) and wait",
    )  # fmt: skip
    p.add_argument("release", nargs="?", metavar="ID|vN", help="the release to go back to")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    deploy_wait_options(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("app", parents=top, help="show or change the app's settings")
    p.set_defaults(func=cmd_app)
    cmds = p.add_subparsers(dest="app_cmd", metavar="SUBCOMMAND")
    cmds.add_parser("show", parents=nested, help="the app's settings")
    s = cmds.add_parser("set", parents=nested, help=f"change settings: {', '.join(SETTINGS)}")
    s.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
