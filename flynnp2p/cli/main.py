"""The ``flynnp2p`` command.

``join`` runs the node agent in the foreground; every other command talks to
any node's HTTP API.  Exit codes: 0 success, 1 the operation failed, 2 usage
or configuration errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

from flynnp2p import __version__
from flynnp2p.cli.apps import add_app_commands
from flynnp2p.cli.client import ApiClient, ClientConfig, pin_ca
from flynnp2p.cli.common import client_for, table
from flynnp2p.cli.deploys import add_deploy_commands
from flynnp2p.cli.git import add_git_commands
from flynnp2p.cli.images import add_image_commands
from flynnp2p.cli.jobs import add_job_commands
from flynnp2p.errors import ConfigError, FlynnError, UserError, first_in
from flynnp2p.token import ClusterToken


def _add_join(sub: Any) -> None:
    p = sub.add_parser(
        "join",
        help="run this host's agent: create a cluster, or join one through PEER",
        description="Run the node agent in the foreground. Without PEER (and with a fresh data "
        "dir) it creates a cluster and prints its token; with PEER it joins through it. A node "
        "restarted with the same data dir needs neither token nor peer.",
    )
    p.add_argument("peers", nargs="*", metavar="PEER", help="gossip address HOST[:PORT] of any member")
    p.add_argument("--token", help="the cluster token (from 'flynnp2p token generate' or the first join)")
    p.add_argument("--name", help="unique node name (default: hostname)")
    p.add_argument("--addr", help="IP address to bind and advertise (default: this host's)")
    p.add_argument("--data-dir", help="where the node keeps its state")
    p.add_argument("--api-port", type=int, help="HTTP API port (default 7100)")
    p.add_argument("--gossip-port", type=int, help="serf gossip port (default 7946)")
    p.add_argument("--http-port", type=int, help="router HTTP port (default 8080)")
    p.add_argument("--https-port", type=int, help="router HTTPS port (default 8443)")
    p.add_argument("--roles", help="comma-separated roles (default scheduler,host)")
    p.add_argument("--tag", action="append", default=[], metavar="K=V", help="host tag (repeatable)")
    p.add_argument("--domain", help="cluster domain: apps get <app>.<domain> (default flynnp2p.localhost)")
    p.add_argument(
        "--backend", choices=("auto", "process", "docker"),
        help="how jobs run: plain processes, Docker containers, or auto (Docker if an "
        "engine answers, else processes; the default)",
    )  # fmt: skip
    p.add_argument("--job-ports", metavar="LO-HI", help="host ports for jobs (default 20000-29999)")
    p.add_argument("--tcp-route-ports", metavar="LO-HI",
                   help="the cluster's TCP route ports, set by its first node (default 3000-3500)")  # fmt: skip
    p.add_argument("--drain-delay", metavar="SECONDS",
                   help="before a job that takes traffic stops, how long routers get to stop choosing it (default 2)")
    p.add_argument("--router-workers", type=int, metavar="N",
                   help="run the router's data plane in N worker processes (default 1; 0: in the agent's process)")
    p.add_argument("--coord-peer-port", type=int, help="etcd peer port, TLS (default 2380)")
    p.add_argument("--coord-client-port", type=int, help="etcd client port, loopback only (default 2379)")
    p.add_argument("--coord-voters", type=int, choices=(1, 3, 5),
                   help="how many etcd voters the cluster keeps (default 5; fewer nodes: all of them)")
    p.set_defaults(func=cmd_join)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flynnp2p", description="flynnp2p: a peer-to-peer platform-as-a-service."
    )
    parser.add_argument("--version", action="version", version=f"flynnp2p {__version__}")
    parser.add_argument("-c", "--cluster", help="cluster name from 'flynnp2p cluster list'")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_join(sub)

    tok = sub.add_parser("token", help="cluster tokens").add_subparsers(
        dest="token_cmd", metavar="SUBCOMMAND", required=True
    )
    tok.add_parser("generate", help="print a fresh cluster token").set_defaults(func=cmd_token_generate)

    cl = sub.add_parser("cluster", help="clusters this CLI talks to, and their status")
    cls = cl.add_subparsers(dest="cluster_cmd", metavar="SUBCOMMAND", required=True)
    add = cls.add_parser("add", help="remember a cluster")
    add.add_argument("name", nargs="?", default="default")
    add.add_argument("--url", required=True, help="any node's API, e.g. http://host1:7100, or its "
                     "router's HTTPS: https://api.DOMAIN:8443 or https://NODE:8443")  # fmt: skip
    add.add_argument("--ca-fingerprint", metavar="sha256:HEX", help="for https:// with only the API "
                     "key: the cluster CA's fingerprint (else derived from the full token)")  # fmt: skip
    add.add_argument("--token", required=True, help="the cluster token or its API key")
    add.add_argument("--no-default", action="store_true", help="do not make it the default")
    add.set_defaults(func=cmd_cluster_add)
    rm = cls.add_parser("remove", help="forget a cluster")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_cluster_remove)
    de = cls.add_parser("default", help="make a cluster the default")
    de.add_argument("name")
    de.set_defaults(func=cmd_cluster_default)
    ls = cls.add_parser("list", help="list known clusters")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_cluster_list)
    st = cls.add_parser("status", help="members, their state and the leader")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_cluster_status)
    rc = cls.add_parser(
        "recover",
        help="rebuild etcd from this node when its quorum is lost for good",
        description="Restart the etcd member of the node the CLI talks to as a one-member "
        "cluster that keeps its data (etcd's --force-new-cluster). Use it only when most etcd "
        "voters are gone for good: the other nodes then join it again as learners, and the "
        "leader re-creates every claim from the replicated state.",
    )
    rc.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rc.set_defaults(func=cmd_cluster_recover)

    # App commands (create, apps, info, delete, env, release, route, scale).
    add_app_commands(sub)
    # Jobs and hosts (ps, log, run, kill, explain, host).
    add_job_commands(sub)
    # git remote add, git-credentials (git's credential helper).
    add_git_commands(sub)
    add_deploy_commands(sub)  # deployment, rollback, app set/show
    # deploy --image / --image-tar.
    add_image_commands(sub)
    return parser


def cmd_token_generate(args: argparse.Namespace) -> int:
    print(ClusterToken.generate().encode())
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from flynnp2p.cli.join import run_join

    return run_join(args)


def cmd_cluster_add(args: argparse.Namespace) -> int:
    if not args.url.startswith(("http://", "https://")):
        raise UserError(f"--url {args.url!r} must start with http:// or https://")
    conf = ClientConfig.load()
    ca = pin_ca(args.url, args.token, args.ca_fingerprint)
    ApiClient(args.url, args.token, ca=ca).get("/v1/status")  # fail now, not at first use
    conf.clusters[args.name] = {"url": args.url, "token": args.token, **({"ca": ca} if ca else {})}
    if not args.no_default or conf.default is None:
        conf.default = args.name
    conf.save()
    print(f"cluster {args.name!r} added ({args.url})" + (" as default" if conf.default == args.name else ""))
    return 0


def cmd_cluster_remove(args: argparse.Namespace) -> int:
    conf = ClientConfig.load()
    if args.name not in conf.clusters:
        raise UserError(f"no cluster named {args.name!r} (see 'flynnp2p cluster list')")
    del conf.clusters[args.name]
    if conf.default == args.name:
        conf.default = next(iter(conf.clusters), None)
    conf.save()
    print(f"cluster {args.name!r} removed")
    return 0


def cmd_cluster_default(args: argparse.Namespace) -> int:
    conf = ClientConfig.load()
    if args.name not in conf.clusters:
        raise UserError(f"no cluster named {args.name!r} (see 'flynnp2p cluster list')")
    conf.default = args.name
    conf.save()
    print(f"default cluster: {args.name}")
    return 0


def cmd_cluster_list(args: argparse.Namespace) -> int:
    conf = ClientConfig.load()
    if args.json:
        print(json.dumps([{"name": n, "url": c["url"], "default": n == conf.default}
                          for n, c in sorted(conf.clusters.items())], indent=2))
        return 0
    rows = [(("* " if n == conf.default else "  ") + n, c["url"]) for n, c in sorted(conf.clusters.items())]
    print(table(rows, ("  NAME", "URL")))
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    status = client_for(args).get("/v1/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    leader = status["leader"]
    rows = [
        (m["name"], m["addr"], m["status"], ",".join(m["roles"]), "*" if m["leader"] else "")
        for m in status["members"]
    ]
    print(table(rows, ("NAME", "ADDRESS", "STATUS", "ROLES", "LEADER")))
    coord = status.get("components", {}).get("coord", {})
    if leader["name"]:
        print(f"\nleader: {leader['name']} (epoch {leader['epoch']}); "
              f"{leader['alive']} of {leader['electorate']} members alive; "
              f"this node's etcd member: {coord.get('role', '?')}")
    else:
        print(f"\nno leader: {leader['reason']}")
    if status.get("ca_fingerprint"):
        print(f"cluster CA: {status['ca_fingerprint']} (for 'cluster add --url https://… --ca-fingerprint')")
    return 0


def cmd_cluster_recover(args: argparse.Namespace) -> int:
    client = client_for(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("cluster recover needs -y when not run at a terminal")
        answer = input(f"rebuild etcd from the node at {client.url}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not recovered")
            return 1
    print(client.request("POST", "/v1/cluster/recover", json={})["message"])
    return 0


_SECRET = re.compile(r"-[A-Za-z0-9_-]{39,}")  # an API key may begin with "-" (base64url)


def joined_secrets(argv: Sequence[str]) -> list[str]:
    """``--token KEY`` as ``--token=KEY`` when KEY begins with "-" (argparse would
    take it for an option: one API key in 64 does)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--token" and i + 1 < len(argv) and _SECRET.fullmatch(argv[i + 1]):
            out.append(f"--token={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(joined_secrets(sys.argv[1:] if argv is None else argv))
    try:
        code: int = args.func(args)
        return code
    except (FlynnError, BaseExceptionGroup) as exc:
        err = first_in(exc, FlynnError)
        if err is None:
            raise
        print(f"flynnp2p: error: {err.message}", file=sys.stderr)
        usage = isinstance(err, ConfigError) or (isinstance(err, UserError) and err.status < 401)
        return 2 if usage else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(main())
