"""Configuration: the only module that reads ``os.environ``.

A node's identity lives in its data dir:

    node.json   name, address, ports, roles, cluster id (0600)
    token       the cluster token (0600)
    serf.*      serf's config, snapshot, pid and log

Starting an agent with a data dir that already holds a node needs neither a
token nor a peer: the node rejoins through its serf snapshot.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flynnp2p import vocab
from flynnp2p.errors import ConfigError, UserError
from flynnp2p.token import ClusterToken

DEFAULT_API_PORT = 7100
DEFAULT_GOSSIP_PORT = 7946
DEFAULT_HTTP_PORT = 8080
DEFAULT_HTTPS_PORT = 8443
DEFAULT_ROLES = ("scheduler", "host")
DEFAULT_DOMAIN = "flynnp2p.localhost"
DEFAULT_JOB_PORTS = "20000-29999"
DEFAULT_TCP_ROUTE_PORTS = "3000-3500"
DEFAULT_COORD_PEER_PORT = 2380
DEFAULT_COORD_CLIENT_PORT = 2379
DEFAULT_COORD_VOTERS = 5
DEFAULT_DRAIN_DELAY_S = 2.0  # a job being stopped first leaves every router's table
# One worker process: a saturated in-process router pushed API p99 to 400-500 ms,
# one worker kept it under 20 ms (scripts/bench/router_api.py; see router.workers).
DEFAULT_ROUTER_WORKERS = 1
MAX_ROUTER_WORKERS = 64
MAX_DRAIN_DELAY_S = 300.0  # a node that leaves waits this long at most before its jobs stop
BACKENDS = ("auto", "process", "docker")


def absolute_path(raw: str | Path) -> Path:
    """`raw` (``~`` expanded) made absolute against the current directory, once, at
    the edge. The agent hands its paths to processes that run in other directories
    (a job's ``/app`` mount, serf's and etcd's files), where a relative path names
    another place: every path option and variable goes through here."""
    return Path(os.path.abspath(os.path.expanduser(raw)))


def default_data_dir() -> Path:
    env = os.environ.get("FLYNNP2P_DATA_DIR")
    if env:
        return absolute_path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/flynnp2p")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return absolute_path(base) / "flynnp2p"


def default_addr() -> str:
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return addr


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "node"


def serf_binary() -> str:
    return _binary(os.environ.get("FLYNNP2P_SERF", "serf"))


def etcd_binary() -> str:
    return _binary(os.environ.get("FLYNNP2P_ETCD", "etcd"))


def _binary(value: str) -> str:
    """A bare name is looked up on PATH; a path (``./bin/serf``) is made absolute."""
    return str(absolute_path(value)) if os.sep in value else value


def coord_dead_after_s() -> float:
    """How long an etcd voter's node may be failed before the autopilot replaces it."""
    try:
        return max(1.0, float(os.environ.get("FLYNNP2P_COORD_DEAD_AFTER_S", "30")))
    except ValueError:
        return 30.0


def state_gc_interval_s() -> float:
    """How often a node tries to collect tombstones (tests shorten it)."""
    try:
        return max(0.1, float(os.environ.get("FLYNNP2P_STATE_GC_S", "60")))
    except ValueError:
        return 60.0


def build_wait_s() -> float:
    """How long a push waits for its release's web jobs to be up (tests shorten it)."""
    try:
        return max(0.0, float(os.environ.get("FLYNNP2P_BUILD_WAIT_S", "60")))
    except ValueError:
        return 60.0


def slug_max_mb() -> int:
    """The biggest slug a push may make, MiB compressed (`flynnp2p.build.slugsize`)."""
    try:
        return max(1, int(os.environ.get("FLYNNP2P_SLUG_MAX_MB", "512")))
    except ValueError:
        return 512


def job_stop_grace_s() -> float:
    """Grace between SIGTERM and SIGKILL when a job is stopped (tests shorten it)."""
    try:
        return max(0.0, float(os.environ.get("FLYNNP2P_STOP_GRACE_S", "10")))
    except ValueError:
        return 10.0


def drain_seconds(flag: str, text: str) -> float:
    """A number of seconds given on the command line (range checked by `NodeConfig.validate`)."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"invalid {flag} {text!r}: give a number of seconds, e.g. 2") from None


def job_drain_delay_s(configured: float) -> float:
    """The deregistration delay before a job that takes traffic is stopped: the
    node's ``--drain-delay``, unless FLYNNP2P_DRAIN_DELAY_S overrides it (tests)."""
    try:
        value = float(os.environ.get("FLYNNP2P_DRAIN_DELAY_S", configured))
    except ValueError:
        return configured
    return value if 0.0 <= value <= MAX_DRAIN_DELAY_S else configured


def log_level() -> str:
    return os.environ.get("FLYNNP2P_LOG", "info").upper()


@dataclass
class NodeConfig:
    name: str
    addr: str
    data_dir: Path
    api_port: int = DEFAULT_API_PORT
    gossip_port: int = DEFAULT_GOSSIP_PORT
    http_port: int = DEFAULT_HTTP_PORT
    https_port: int = DEFAULT_HTTPS_PORT
    roles: tuple[str, ...] = DEFAULT_ROLES
    tags: dict[str, str] = field(default_factory=dict)
    cluster_id: str = ""
    domain: str = DEFAULT_DOMAIN
    backend: str = "auto"
    job_ports: str = DEFAULT_JOB_PORTS
    tcp_route_ports: str = DEFAULT_TCP_ROUTE_PORTS
    coord_peer_port: int = DEFAULT_COORD_PEER_PORT
    coord_client_port: int = DEFAULT_COORD_CLIENT_PORT
    coord_voters: int = DEFAULT_COORD_VOTERS
    drain_delay_s: float = DEFAULT_DRAIN_DELAY_S
    router_workers: int = DEFAULT_ROUTER_WORKERS

    def validate(self) -> None:
        if not self.data_dir.is_absolute():  # resolve it at the edge: `absolute_path`
            raise ConfigError(f"data dir {self.data_dir} must be an absolute path")
        if not vocab.NODE_NAME.ok(self.name):
            raise ConfigError(f"invalid node name {self.name!r}: use {vocab.NODE_NAME.accepted}")
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in self.addr else socket.AF_INET, self.addr)
        except OSError:
            raise ConfigError(f"invalid --addr {self.addr!r}: give an IPv4 or IPv6 address") from None
        for label, port in (
            ("--api-port", self.api_port),
            ("--gossip-port", self.gossip_port),
            ("--http-port", self.http_port),
            ("--https-port", self.https_port),
            ("--coord-peer-port", self.coord_peer_port),
            ("--coord-client-port", self.coord_client_port),
        ):
            if not 1 <= port <= 65535:
                raise ConfigError(f"invalid {label} {port}: use 1-65535")
        # 200, not 253: the domain leaves room for an app name in front of it.
        if len(self.domain) > 200 or not vocab.HOSTNAME.ok(self.domain):
            raise ConfigError(f"invalid --domain {self.domain!r}: give {vocab.HOSTNAME.accepted}")
        for key, value in self.tags.items():
            if not vocab.TAG_KEY.ok(key):
                raise ConfigError(f"invalid tag key {key!r}: use {vocab.TAG_KEY.accepted}")
            if not vocab.TAG_VALUE.ok(value):
                raise ConfigError(f"invalid tag value {value!r} of {key}: use {vocab.TAG_VALUE.accepted}")
        if self.coord_voters not in (1, 3, 5):
            raise ConfigError(f"invalid --coord-voters {self.coord_voters}: use 1, 3 or 5")
        if not (math.isfinite(self.drain_delay_s) and 0 <= self.drain_delay_s <= MAX_DRAIN_DELAY_S):
            raise ConfigError(
                f"invalid --drain-delay {self.drain_delay_s}: give seconds from 0 to {MAX_DRAIN_DELAY_S:g}"
            )
        if not 0 <= self.router_workers <= MAX_ROUTER_WORKERS:
            raise ConfigError(
                f"invalid --router-workers {self.router_workers}: use 0 (the router in the agent's "
                f"process) to {MAX_ROUTER_WORKERS}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"invalid --backend {self.backend!r}: use {', '.join(BACKENDS)}")
        self.port_range()
        job_lo, job_hi = self.port_range()
        tcp_lo, tcp_hi = self.tcp_route_range()
        if tcp_lo <= job_hi and job_lo <= tcp_hi:
            raise ConfigError(
                f"--tcp-route-ports {self.tcp_route_ports} overlaps --job-ports {self.job_ports}: "
                "the router and the jobs would take the same ports"
            )

    def port_range(self) -> tuple[int, int]:
        return _port_range("--job-ports", self.job_ports, 1024, DEFAULT_JOB_PORTS)

    def tcp_route_range(self) -> tuple[int, int]:
        """The ports `route add tcp` picks from (the first leader records them for
        the cluster; a later node's setting is ignored)."""
        return _port_range("--tcp-route-ports", self.tcp_route_ports, 1, DEFAULT_TCP_ROUTE_PORTS)

    @property
    def node_file(self) -> Path:
        return self.data_dir / "node.json"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "token"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["data_dir"] = str(self.data_dir)
        d["roles"] = list(self.roles)
        return d


def write_secret(path: Path, text: str) -> None:
    """Write atomically, 0600 from the first byte."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = data_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"data dir {data_dir} is not writable: {exc.strerror}") from None


def load_node(data_dir: Path) -> tuple[NodeConfig, ClusterToken] | None:
    """The node stored in ``data_dir``, or None for a fresh data dir."""
    node_file = data_dir / "node.json"
    if not node_file.exists():
        return None
    try:
        raw = json.loads(node_file.read_text())
        token = ClusterToken.parse((data_dir / "token").read_text())
        cfg = NodeConfig(
            name=raw["name"],
            addr=raw["addr"],
            data_dir=data_dir,
            api_port=int(raw["api_port"]),
            gossip_port=int(raw["gossip_port"]),
            http_port=int(raw["http_port"]),
            https_port=int(raw["https_port"]),
            roles=tuple(raw["roles"]),
            tags=dict(raw.get("tags", {})),
            cluster_id=raw["cluster_id"],
            domain=raw.get("domain", DEFAULT_DOMAIN),
            backend=raw.get("backend", "auto"),
            job_ports=raw.get("job_ports", DEFAULT_JOB_PORTS),
            tcp_route_ports=raw.get("tcp_route_ports", DEFAULT_TCP_ROUTE_PORTS),
            coord_peer_port=int(raw.get("coord_peer_port", DEFAULT_COORD_PEER_PORT)),
            coord_client_port=int(raw.get("coord_client_port", DEFAULT_COORD_CLIENT_PORT)),
            coord_voters=int(raw.get("coord_voters", DEFAULT_COORD_VOTERS)),
            drain_delay_s=float(raw.get("drain_delay_s", DEFAULT_DRAIN_DELAY_S)),
            router_workers=int(raw.get("router_workers", DEFAULT_ROUTER_WORKERS)),
        )
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise ConfigError(f"data dir {data_dir} holds a damaged node: {exc}") from None
    return cfg, token


def _port_range(option: str, text: str, lowest: int, example: str) -> tuple[int, int]:
    lo_text, _, hi_text = text.partition("-")
    try:
        lo, hi = int(lo_text), int(hi_text)
    except ValueError:
        lo = hi = 0
    if not lowest <= lo <= hi <= 65535:
        raise ConfigError(f"invalid {option} {text!r}: use LO-HI within {lowest}-65535, e.g. {example}")
    return lo, hi


def save_node(cfg: NodeConfig, token: ClusterToken) -> None:
    write_secret(cfg.token_file, token.encode() + "\n")
    write_secret(cfg.node_file, json.dumps(cfg.to_json(), indent=2) + "\n")


# -- client side (the CLI) -----------------------------------------------------


def client_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "flynnp2p" / "config.json"


def client_env_override() -> tuple[str | None, str | None]:
    return os.environ.get("FLYNNP2P_URL"), os.environ.get("FLYNNP2P_TOKEN")
