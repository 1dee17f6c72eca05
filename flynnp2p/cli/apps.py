"""App commands of the ``flynnp2p`` CLI: apps, env, releases, routes, scale.

``release add --slug FILE`` uploads a slug to the blobstore (streamed, under its
sha256 digest) and makes a release of it, which the API deploys. ``scale`` waits
until the new formation runs (see `flynnp2p.cli.scale.wait_for_formation`).

Every command but ``create`` and ``apps`` works on one app: ``-a/--app APP``, or
else the app named by the git remote ``flynnp2p`` of the current directory
(``http://NODE:7100/git/APP.git``). Output is a table for people and the API's
JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from flynnp2p import vocab
from flynnp2p.cli.client import IDEMPOTENCY_KEY, ApiClient
from flynnp2p.cli.common import (
    app_of,
    app_options,
    app_path,
    client_for,
    env_pairs,
    print_json,
    table,
)
from flynnp2p.cli.deploys import deploy_wait_options, wait_for_deploy
from flynnp2p.cli.git import add_remote, in_work_tree
from flynnp2p.cli.scale import wait_for_formation
from flynnp2p.errors import NotFound, UserError

# -- output -----------------------------------------------------------------


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def route_address(route: Mapping[str, Any]) -> str:
    if route["type"] == "tcp":
        return f":{route['port']}"
    path = route.get("path") or "/"
    return f"{route['domain']}{'' if path == '/' else path}"


def formation_text(formation: Mapping[str, Any] | None) -> str:
    if not formation:
        return "none"
    procs = formation.get("processes") or {}
    counts = " ".join(f"{t}={n}" for t, n in sorted(procs.items())) or "no processes"
    return f"{counts} (release {formation['release_id']})"


# -- commands ---------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    client = client_for(args)
    body = {"name": args.name} if args.name else {}
    resp = client.create("/v1/apps", json=body)
    if args.json:
        print_json(resp)
        return 0
    app = resp["app"]
    print(f"created app {app['name']} (id {app['id']}, on {resp['replicas']} node(s))")
    for route in resp["routes"]:
        print(f"  route: http://{route_address(route)}")

    if in_work_tree():
        url = add_remote(app["name"], args.cluster)
        print(f"  git remote flynnp2p: {url}  (deploy: git push flynnp2p main)")
    else:
        print(f"  deploy: flynnp2p release add -a {app['name']} --slug app.tgz, or in a git work "
              f"tree: flynnp2p git remote add -a {app['name']} && git push flynnp2p main")  # fmt: skip
    return 0


def cmd_apps(args: argparse.Namespace) -> int:
    resp = client_for(args).get("/v1/apps")
    if args.json:
        print_json(resp)
        return 0
    rows = [(a["name"], a["id"], when(a["created_at"])) for a in resp["apps"]]
    print(table(rows, ("NAME", "ID", "CREATED")))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    resp = client_for(args).get(app_path(args))
    if args.json:
        print_json(resp)
        return 0
    app, release = resp["app"], resp["release"]
    lines = [
        ("name", app["name"]),
        ("id", app["id"]),
        ("created", when(app["created_at"])),
        ("strategy", app["strategy"]),
        ("release", release["id"] if release else "none"),
        ("formation", formation_text(resp["formation"])),
    ]
    lines += [("route", f"{r['type']} {route_address(r)}") for r in resp["routes"]]
    lines += [("meta", f"{k}={v}") for k, v in sorted(app["meta"].items())]
    for key, value in lines:
        print(f"{key + ':':<11}{value}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    client = client_for(args)
    name = client.get(app_path(args))["app"]["name"]
    if not args.yes:
        if sys.stdin is None or not sys.stdin.isatty():
            raise UserError(f"not deleting app {name!r}: stdin is not a terminal; pass -y to confirm")
        try:
            answer = input(f"Delete app {name!r}, its routes and formation? Type its name to confirm: ")
        except EOFError:
            answer = ""
        if answer.strip() != name:
            raise UserError("the name did not match: nothing deleted")
    resp = client.request("DELETE", app_path(args))
    if args.json:
        print_json(resp)
        return 0
    routes = len(resp["deleted"]["routes"])
    print(f"deleted app {name} ({routes} route(s))")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    client = client_for(args)
    sub = getattr(args, "env_cmd", None)
    if sub is None or sub == "get":
        resp = client.get(app_path(args, "env"))
        env: dict[str, str] = resp["env"]
        if sub == "get":
            if args.name not in env:
                raise NotFound(f"{args.name} is not set")
            print(env[args.name])
        elif args.json:
            print_json(resp)
        else:
            for key in sorted(env):
                print(f"{key}={env[key]}")
        return 0
    body: dict[str, Any] = {"set": env_pairs(args.pairs)} if sub == "set" else {"unset": args.names}
    resp = client.request("PATCH", app_path(args, "env"), json=body)
    if args.json:
        print_json(resp)
        return 0
    names = ", ".join(body.get("set") or body["unset"])
    release = resp["release"]
    version = f"v{release['version']}" if release.get("version") else release["id"]
    print(f"{'set' if sub == 'set' else 'unset'} {names} (new release {version}), deploying…")
    if args.no_wait:
        return 0
    return wait_for_deploy(client, app_of(args), release["id"], args.timeout)


SLUG_CHUNK = 1 << 20
# An upload is acknowledged once a second node holds a copy: a big slug takes a while.
UPLOAD_TIMEOUT = httpx.Timeout(10.0, read=600.0, write=600.0)


def _slug_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(SLUG_CHUNK):
            yield chunk


def slug_digest(path: Path) -> tuple[str, int]:
    """(``sha256:<hex>``, size) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    for chunk in _slug_chunks(path):
        h.update(chunk)
        size += len(chunk)
    return f"sha256:{h.hexdigest()}", size


def upload_slug(client: ApiClient, path: Path) -> str:
    """Put the file in the cluster's blobstore; its digest."""
    try:
        digest, size = slug_digest(path)
        client.request(
            "PUT", f"/v1/blobs/{digest}", content=_slug_chunks(path), timeout=UPLOAD_TIMEOUT,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )  # fmt: skip
    except OSError as exc:
        raise UserError(f"cannot read slug {str(path)!r}: {exc.strerror or exc}") from None
    return digest


def release_summary(resp: Mapping[str, Any]) -> str:
    """``release ID: types web, worker (deployed: web=1)`` for a release made from a slug."""
    release, formation = resp["release"], resp.get("formation") or {}
    types = ", ".join(sorted(release["processes"])) or "none"
    counts = ", ".join(f"{t}={n}" for t, n in sorted((formation.get("processes") or {}).items()))
    return f"release {release['id']}: types {types} (deployed: {counts or 'no process scaled yet'})"


def _release_add(args: argparse.Namespace, client: ApiClient) -> int:
    env = env_pairs(args.env)
    digest = upload_slug(client, Path(args.slug))
    body: dict[str, Any] = {"slug": digest, **({"env": env} if env else {})}
    resp = client.request("POST", app_path(args, "releases"), json=body)
    if args.json:
        print_json(resp)
    else:
        print(release_summary(resp))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    client = client_for(args)
    if getattr(args, "release_cmd", None) == "add":
        return _release_add(args, client)
    if getattr(args, "release_cmd", None) == "show":
        resp = client.get(app_path(args, "releases", args.id))
        if args.json:
            print_json(resp)
            return 0
        r = resp["release"]
        version = f"v{r['version']}" if r.get("version") else "-"
        print(f"id:        {r['id']}\nversion:   {version}\ncreated:   {when(r['created_at'])}")
        print(f"artifacts: {', '.join(r['artifacts']) or 'none'}")
        for ptype, spec in sorted(r["processes"].items()):
            print(f"process:   {ptype}: {spec['command']}")
        for key, value in sorted(r["env"].items()):
            print(f"env:       {key}={value}")
        return 0
    resp = client.get(app_path(args, "releases"))
    if args.json:
        print_json(resp)
        return 0
    current = client.get(app_path(args))["release"]
    current_id = current["id"] if current else None
    rows = [
        (
            ("* " if r["id"] == current_id else "  ") + (f"v{r['version']}" if r.get("version") else "-"),
            r["id"],
            when(r["created_at"]),
            ",".join(sorted(r["processes"])) or "-",
            str(len(r["env"])),
        )
        for r in resp["releases"]
    ]
    print(table(rows, ("  VERSION", "ID", "CREATED", "TYPES", "ENV")))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    client = client_for(args)
    sub = getattr(args, "route_cmd", None)
    if sub is None:
        resp = client.get(app_path(args, "routes"))
        if args.json:
            print_json(resp)
            return 0
        rows = [
            (r["id"], r["type"], route_address(r), r["process_type"],
             "yes" if r.get("sticky") else "-", "yes" if r.get("https_only") else "-",
             "own" if r.get("certificate_id") else ("cluster" if r["type"] == "http" else "-"))
            for r in resp["routes"]
        ]  # fmt: skip
        print(table(rows, ("ID", "TYPE", "ADDRESS", "PROCESS", "STICKY", "HTTPS_ONLY", "CERT")))
        return 0
    if sub == "remove":
        resp = client.request("DELETE", app_path(args, "routes", args.id))
        if args.json:
            print_json(resp)
        else:
            print(f"removed route {args.id}")
        return 0
    if sub == "update":
        return _route_update(client, args)
    if args.route_type == "http":
        domain, slash, path = args.address.partition("/")
        body: dict[str, Any] = {"type": "http", "domain": domain, "path": slash + path or "/"}
        if args.sticky:
            body["sticky"] = True
        if args.https_only:
            body["https_only"] = True
        if (args.cert is None) != (args.key is None):
            raise UserError("--cert and --key come together (a PEM certificate chain and its key)")
        if args.cert is not None:
            body["cert_pem"], body["key_pem"] = read_text(args.cert, "--cert"), read_text(args.key, "--key")
    else:
        body = {"type": "tcp"}
        if args.port is not None:
            body["port"] = args.port  # else the cluster picks a free one of its range
    resp = client.create(app_path(args, "routes"), json=body)
    if args.json:
        print_json(resp)
        return 0
    route = resp["route"]
    print(f"added route {route['id']}: {route['type']} {route_address(route)}")
    return 0


def _route_update(client: ApiClient, args: argparse.Namespace) -> int:
    """``route update ID``: only the options given change (the API refuses the rest)."""
    body: dict[str, Any] = {}
    for flag in ("sticky", "https_only", "path", "process_type"):
        value = getattr(args, flag)
        if value is not None:
            body[flag] = value
    if (args.cert is None) != (args.key is None):
        raise UserError("--cert and --key come together (a PEM certificate chain and its key)")
    if args.cert is not None:
        body["cert_pem"], body["key_pem"] = read_text(args.cert, "--cert"), read_text(args.key, "--key")
    if not body:
        raise UserError("nothing to change: give --sticky/--no-sticky, --https-only/--no-https-only, "
                        "-t TYPE, --path P or --cert C --key K")  # fmt: skip
    # A new path is a new claim: the key lets a retry find the first attempt's.
    resp = client.request("PATCH", app_path(args, "routes", args.id), json=body,
                          headers={IDEMPOTENCY_KEY: str(uuid.uuid4())})  # fmt: skip
    if args.json:
        print_json(resp)
        return 0
    r = resp["route"]
    print(f"updated route {r['id']}: {r['type']} {route_address(r)} -> {r['process_type']}"
          f"{' sticky' if r.get('sticky') else ''}{' https_only' if r.get('https_only') else ''}"
          f"{' own certificate' if r.get('certificate_id') else ''}")  # fmt: skip
    return 0


def read_text(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(70_000)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{option} {path}: cannot read it ({exc.__class__.__name__}: {exc})") from None


def process_counts(items: Sequence[str]) -> dict[str, int]:
    return {ptype: count for ptype, (count, _) in scale_items(items).items()}


def scale_items(items: Sequence[str]) -> dict[str, tuple[int, dict[str, str] | None]]:
    """``TYPE=N`` or ``TYPE=N,KEY=VALUE,...`` (the host tags the type needs; ``TYPE=N,``
    with nothing after the comma drops them): {type: (count, tags or None)}."""
    out: dict[str, tuple[int, dict[str, str] | None]] = {}
    for item in items:
        head, comma, rest = item.partition(",")
        ptype, sep, count = head.partition("=")
        if not sep or not vocab.PROCESS_TYPE.ok(ptype) or not count.isdigit():
            raise UserError(
                f"expected TYPE=COUNT[,TAG=VALUE...] with COUNT a whole number >= 0, got {item!r}"
            )
        tags: dict[str, str] | None = None
        if comma:
            tags = {}
            for pair in filter(None, rest.split(",")):
                key, eq, value = pair.partition("=")
                if not eq or not vocab.TAG_KEY.ok(key):
                    raise UserError(
                        f"expected TAG=VALUE after TYPE=COUNT, with TAG of lowercase letters, "
                        f"digits and _.-, got {pair!r} in {item!r}"
                    )
                tags[key] = value
        out[ptype] = (int(count), tags)
    return out


def cmd_scale(args: argparse.Namespace) -> int:
    client = client_for(args)
    items = scale_items(args.counts)
    wanted = {ptype: count for ptype, (count, _) in items.items()}
    constraints = {ptype: tags for ptype, (_, tags) in items.items() if tags is not None}
    wait = bool(wanted) and not args.no_wait
    if wait and not args.timeout > 0:
        raise UserError(f"--timeout: expected a number of seconds above 0, got {args.timeout:g}")
    formation = client.get(app_path(args, "formation"))["formation"]
    if wanted:
        processes = {**(formation or {}).get("processes", {}), **wanted}
        started = time.monotonic()
        body: dict[str, Any] = {"processes": processes}
        if constraints:
            body["constraints"] = constraints
        resp = client.request("PUT", app_path(args, "formation"), json=body)
        formation = resp["formation"]
        if wait:
            return wait_for_formation(
                client, app_path(args, "jobs"), formation,
                started=started, timeout_s=args.timeout, as_json=args.json,
            )  # fmt: skip
    if args.json:
        print_json({"formation": formation})
        return 0
    if not formation:
        print("no formation yet (scale a process type, e.g. 'flynnp2p scale web=1')")
        return 0
    tags_of = formation.get("constraints") or {}
    rows = [
        (t, str(n), ",".join(f"{k}={v}" for k, v in sorted(tags_of.get(t, {}).items())) or "-")
        for t, n in sorted(formation["processes"].items())
    ]
    print(table(rows, ("TYPE", "COUNT", "TAGS")))
    print(f"\nrelease: {formation['release_id']}")
    return 0


# -- the parser -------------------------------------------------------------


def add_app_commands(sub: Any) -> None:
    top, nested = [app_options(nested=False)], [app_options(nested=True)]
    json_only = argparse.ArgumentParser(add_help=False)
    json_only.add_argument("--json", action="store_true", help="print the API's JSON")

    p = sub.add_parser("create", parents=[json_only], help="create an app")
    p.add_argument("name", nargs="?", help="lowercase letters, digits and dashes (default: generated)")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("apps", parents=[json_only], help="list apps")
    p.set_defaults(func=cmd_apps)

    p = sub.add_parser("info", parents=top, help="an app, its release, formation and routes")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("delete", parents=top, help="delete an app with its routes and formation")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("env", parents=top, help="list, get, set or unset environment variables")
    p.set_defaults(func=cmd_env)
    env = p.add_subparsers(dest="env_cmd", metavar="SUBCOMMAND")
    e = env.add_parser("get", parents=nested, help="print one variable")
    e.add_argument("name", metavar="NAME")
    e = env.add_parser("set", parents=nested, help="set variables (a new release, deployed)")
    e.add_argument("pairs", nargs="+", metavar="NAME=VALUE")
    deploy_wait_options(e)
    e = env.add_parser("unset", parents=nested, help="remove variables (a new release, deployed)")
    e.add_argument("names", nargs="+", metavar="NAME")
    deploy_wait_options(e)

    p = sub.add_parser("release", parents=top, help="list releases, show one, or add one from a slug")
    p.set_defaults(func=cmd_release)
    rel = p.add_subparsers(dest="release_cmd", metavar="SUBCOMMAND")
    r = rel.add_parser("show", parents=nested, help="one release in detail")
    r.add_argument("id", metavar="ID")
    r = rel.add_parser("add", parents=nested, help="upload a slug and deploy a release of it")
    r.add_argument("--slug", required=True, metavar="FILE",
                   help="a gzipped tar with ./app and ./app/Procfile")  # fmt: skip
    r.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set a variable in the release (repeatable)")  # fmt: skip

    p = sub.add_parser("route", parents=top, help="list, add, update or remove routes")
    p.set_defaults(func=cmd_route)
    routes = p.add_subparsers(dest="route_cmd", metavar="SUBCOMMAND")
    add = routes.add_parser("add", parents=nested, help="add an http or tcp route")
    kinds = add.add_subparsers(dest="route_type", metavar="TYPE", required=True)
    h = kinds.add_parser("http", parents=nested, help="http DOMAIN[/PATH]")
    h.add_argument("address", metavar="DOMAIN[/PATH]")
    h.add_argument("--cert", metavar="FILE", help="the route's own certificate chain (PEM); "
                   "else the cluster's *.DOMAIN certificate serves HTTPS")  # fmt: skip
    h.add_argument("--key", metavar="FILE", help="the certificate's private key (PEM)")
    h.add_argument("--https-only", action="store_true", help="answer plain HTTP with a 308 to HTTPS")
    h.add_argument("--sticky", action="store_true", help="a cookie keeps a client on one job")
    t = kinds.add_parser("tcp", parents=nested, help="tcp [PORT] (default: a free port of the cluster's range)")
    t.add_argument("port", type=int, nargs="?", metavar="PORT")
    up = routes.add_parser(
        "update", parents=nested,
        help="change a route's sticky, https_only, path, process type or certificate "
        "(its type, domain and port stay: remove it and add another)",
    )  # fmt: skip
    up.add_argument("id", metavar="ID")
    up.add_argument("--sticky", action=argparse.BooleanOptionalAction, default=None,
                    help="a cookie keeps a client on one job (or not)")  # fmt: skip
    up.add_argument("--https-only", action=argparse.BooleanOptionalAction, default=None,
                    help="answer plain HTTP with a 308 to HTTPS (or not)")  # fmt: skip
    up.add_argument("-t", "--type", dest="process_type", metavar="TYPE", help="the process type it targets")
    up.add_argument("--path", metavar="P", help="the path prefix (an http route's)")
    up.add_argument("--cert", metavar="FILE", help="a new certificate chain (PEM), with --key")
    up.add_argument("--key", metavar="FILE", help="the new certificate's private key (PEM)")
    rm = routes.add_parser("remove", parents=nested, help="remove a route")
    rm.add_argument("id", metavar="ID")

    p = sub.add_parser(
        "scale", parents=top,
        help="set process counts and wait until they run (bare: show the formation)",
    )  # fmt: skip
    p.add_argument("counts", nargs="*", metavar="TYPE=N[,TAG=V...]")
    p.add_argument("-n", "--no-wait", action="store_true", help="do not wait for the jobs")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="how long to wait, in seconds (default 60)")  # fmt: skip
    p.set_defaults(func=cmd_scale)

