"""``flynnp2p join``: resolve the node's identity, then run the agent until a signal."""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from flynnp2p import config as conf
from flynnp2p.agent import Agent
from flynnp2p.errors import FULL_ERRNOS, ConfigError, UserError, first_in
from flynnp2p.token import ClusterToken


def _parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid --tag {item!r}: use KEY=VALUE")
        tags[key] = value
    return tags


def resolve_node(args: argparse.Namespace) -> tuple[conf.NodeConfig, ClusterToken, bool]:
    """(config, token, fresh): from the data dir if it holds a node, else from flags."""
    data_dir = conf.absolute_path(args.data_dir) if args.data_dir else conf.default_data_dir()
    conf.prepare_data_dir(data_dir)
    try:
        given = ClusterToken.parse(args.token) if args.token else None
    except UserError as exc:
        raise ConfigError(f"--token: {exc.message}") from None
    stored = conf.load_node(data_dir)
    if stored is not None:
        cfg, token = stored
        if given is not None and given.cluster_id != token.cluster_id:
            raise ConfigError(
                f"data dir {data_dir} belongs to cluster {token.cluster_id_hex}, not to the "
                f"token's cluster {given.cluster_id_hex}: use another --data-dir"
            )
        if args.name and args.name != cfg.name:
            raise ConfigError(f"data dir {data_dir} holds node {cfg.name!r}; a node cannot be renamed")
        fresh = False
    else:
        if args.peers and given is None:
            raise ConfigError("joining a cluster needs its token: --token TOKEN")
        token = given or ClusterToken.generate()
        cfg = conf.NodeConfig(
            name=args.name or conf.default_name(),
            addr=args.addr or conf.default_addr(),
            data_dir=data_dir,
            cluster_id=token.cluster_id_hex,
        )
        fresh = True
    # Explicit flags override what the data dir holds (ports may move).
    for attr in (
        "addr", "api_port", "gossip_port", "http_port", "https_port",
        "coord_peer_port", "coord_client_port", "coord_voters", "router_workers",
    ):  # fmt: skip
        value = getattr(args, attr, None)
        if value is not None:
            setattr(cfg, attr, value)
    if args.roles is not None:
        cfg.roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    if args.tag:
        cfg.tags = _parse_tags(args.tag)
    if args.domain is not None:
        cfg.domain = args.domain
    if args.backend is not None:
        cfg.backend = args.backend
    if args.job_ports is not None:
        cfg.job_ports = args.job_ports
    if getattr(args, "tcp_route_ports", None) is not None:
        cfg.tcp_route_ports = args.tcp_route_ports
    if args.drain_delay is not None:
        cfg.drain_delay_s = conf.drain_seconds("--drain-delay", args.drain_delay)
    cfg.validate()
    return cfg, token, fresh


def run_join(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=conf.log_level(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "hypercorn.error", "flynnp2p.api.server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg, token, fresh = resolve_node(args)
    created = fresh and not args.peers and not args.token

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            if created:
                _print_banner(agent)

    try:
        agent = Agent(cfg, token, list(args.peers), fresh=fresh)
        trio.run(main)
    except (OSError, BaseExceptionGroup) as exc:
        full = first_in(exc, OSError, lambda e: e.errno in FULL_ERRNOS)
        if full is None:
            raise
        # A full data dir is the operator's to fix, like any other ConfigError.
        raise ConfigError(
            f"the data dir {cfg.data_dir} is full ({full.strerror or full}): free space and restart"
        ) from None
    return 0


def _print_banner(agent: Agent) -> None:
    cfg, token = agent.cfg, agent.token
    t = token.encode()
    print(
        f"\nflynnp2p: created cluster {token.cluster_id_hex}\n"
        f"  cluster token (a secret): {t}\n"
        f"  other hosts join with:    flynnp2p join --token {t} {cfg.addr}:{cfg.gossip_port}\n"
        f"  the CLI talks to it with: flynnp2p cluster add --url {agent.api_url} --token {t}\n",
        file=sys.stderr,
        flush=True,
    )
