"""The route table: which route, and which backends, a request or connection goes to.

Theory of operation
-------------------
A `RouteTable` is an immutable value built from plain inputs (`RouteSpec`s and
the `Backend`s of each (app id, process type)); the router swaps a whole new
table in when the state changes, so the hot path reads it without locks.

HTTP matching, in order:

1. the host: the ``Host`` header lowercased, its port and a trailing dot
   stripped. An exact domain beats any wildcard; among wildcards
   (``*.example.com`` matches ``a.example.com`` and ``a.b.example.com``, not
   ``example.com``) the most specific, i.e. the longest suffix, wins;
2. within that domain, the longest path prefix that ends on a ``/`` boundary:
   ``/api`` matches ``/api``, ``/api/`` and ``/api/x``, not ``/apix``.

The answer is the most specific matching route, ordered by (domain, then path):
a domain whose routes have no matching path falls through to the next
wildcard, and only then to no match (a 404).

Lookups are dictionary probes: one per dot in the host, one per path route of
the chosen domain (few in practice). The fast lane asks `by_host` first: for a
host whose answer cannot depend on the path (its most specific domain has only
a ``/`` route, or nothing matches) the `Target` is cached by the raw ``Host``
bytes in the table itself, so a swapped-in table starts with an empty cache
and no change can be missed. The cache is bounded (`HOST_CACHE` entries, then
emptied), so hostile Host headers cost a re-lookup, not memory.

A table also names the addresses of jobs that left it because they are *lost*
(`lost`: their host is gone, see `flynnp2p.state.jobs.stopped_for_lost_host`), as
opposed to draining (``stopping``): the router gives up at once on what it has in
flight to those (`flynnp2p.router.lost`), where a draining job finishes its own.

And it names the backends on hosts this node's heartbeats find *unresponsive*
(`flynnp2p.gossip.heartbeat`): `silent`, every such address, and `skipped`, those
of them left out of `backends` because their service has a backend on a host
that answers (`flynnp2p.router.build` decides). Nothing in flight to them is
given up; the router only stops pooling connections to `silent` addresses
(`flynnp2p.router.proxy.Pool`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from flynnp2p.netaddr import ip_port


@dataclass(frozen=True, slots=True)
class Backend:
    """A job that takes traffic: its id and where it listens (``"host:port"``)."""

    job_id: str
    address: str

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def valid(self) -> bool:
        """An IP address and a port 1-65535: anything else (a hostname would block on
        DNS in the data path) is not a backend."""
        return ip_port(self.address) is not None


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route, as the table needs it (the state's `Route` record, flattened)."""

    id: str
    app_id: str
    type: str  # "http" | "tcp"
    domain: str | None = None
    path: str = "/"
    port: int | None = None
    process_type: str = "web"
    sticky: bool = False
    https_only: bool = False
    app_name: str = ""  # for pages and counters; the app id when unknown

    @property
    def service(self) -> tuple[str, str]:
        return self.app_id, self.process_type


@dataclass(frozen=True, slots=True)
class Target:
    """A lookup's answer: the route and the backends that take its traffic now."""

    route: RouteSpec
    backends: tuple[Backend, ...]


HOST_CACHE = 4096
BY_PATH = object()  # `by_host`'s answer for a host whose route depends on the path


def normalize_host(host: str) -> str:
    """``Host`` header → the name routes are keyed by: no port, lowercase, no trailing dot."""
    if host.startswith("["):  # an IPv6 literal, maybe with a port
        end = host.find("]")
        host = host[: end + 1] if end >= 0 else host
    else:
        colon = host.rfind(":")
        if colon >= 0:
            host = host[:colon]
    return host.rstrip(".").lower()


def _path_matches(prefix: str, path: str) -> bool:
    if prefix == "/" or path == prefix:
        return True
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or path[len(prefix)] == "/"


@dataclass(frozen=True)
class RouteTable:
    """Routes by domain (paths longest first) and by TCP port, with their backends."""

    routes: tuple[RouteSpec, ...] = ()
    backends: Mapping[tuple[str, str], tuple[Backend, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    lost: frozenset[str] = frozenset()  # addresses of jobs whose host is gone (see the module)
    # Backends left out because their host is unresponsive (see the module), and every
    # backend address on an unresponsive host, left out or not.
    skipped: Mapping[tuple[str, str], tuple[Backend, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    silent: frozenset[str] = frozenset()
    _exact: Mapping[str, tuple[RouteSpec, ...]] = field(init=False, repr=False, compare=False)
    _wild: Mapping[str, tuple[RouteSpec, ...]] = field(init=False, repr=False, compare=False)
    _tcp: Mapping[int, RouteSpec] = field(init=False, repr=False, compare=False)
    _by_host: dict[bytes, object] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact: dict[str, list[RouteSpec]] = {}
        wild: dict[str, list[RouteSpec]] = {}
        tcp: dict[int, RouteSpec] = {}
        for r in sorted(self.routes, key=lambda r: r.id):
            if r.type == "tcp" and r.port is not None:
                tcp.setdefault(r.port, r)  # the first id wins a (wrongly) shared port
            elif r.type == "http" and r.domain:
                domain = r.domain.rstrip(".").lower()
                if domain.startswith("*."):
                    wild.setdefault(domain[2:], []).append(r)
                else:
                    exact.setdefault(domain, []).append(r)

        def by_path(rs: list[RouteSpec]) -> tuple[RouteSpec, ...]:
            return tuple(sorted(rs, key=lambda r: (-len(r.path), r.id)))

        object.__setattr__(self, "_exact", {d: by_path(rs) for d, rs in exact.items()})
        object.__setattr__(self, "_wild", {d: by_path(rs) for d, rs in wild.items()})
        object.__setattr__(self, "_tcp", tcp)
        object.__setattr__(self, "_by_host", {})
        object.__setattr__(
            self, "backends", MappingProxyType({k: tuple(v) for k, v in self.backends.items()})
        )
        object.__setattr__(
            self, "skipped", MappingProxyType({k: tuple(v) for k, v in self.skipped.items() if v})
        )

    @classmethod
    def build(
        cls,
        routes: Iterable[RouteSpec],
        backends: Mapping[tuple[str, str], Iterable[Backend]],
        lost: Iterable[str] = (),
        skipped: Mapping[tuple[str, str], Iterable[Backend]] | None = None,
        silent: Iterable[str] = (),
    ) -> RouteTable:
        def by_service(given: Mapping[tuple[str, str], Iterable[Backend]]) -> dict[tuple[str, str], tuple[Backend, ...]]:
            return {k: tuple(sorted(v, key=lambda b: b.job_id)) for k, v in sorted(given.items())}

        return cls(
            routes=tuple(sorted(routes, key=lambda r: r.id)),
            backends=by_service(backends),
            lost=frozenset(lost),
            skipped=by_service(skipped or {}),
            silent=frozenset(silent),
        )

    def route_http(self, host: str, path: str) -> RouteSpec | None:
        """The route for a request to `host` (a raw ``Host`` header) and `path`."""
        name = normalize_host(host)
        candidates = self._exact.get(name)
        if candidates is not None:
            for r in candidates:
                if _path_matches(r.path, path):
                    return r
        dot = name.find(".")
        while dot >= 0:
            candidates = self._wild.get(name[dot + 1 :])
            if candidates is not None:
                for r in candidates:
                    if _path_matches(r.path, path):
                        return r
            dot = name.find(".", dot + 1)
        return None

    def by_host(self, host: bytes) -> Target | object | None:
        """`lookup_http` for a raw ``Host`` header when the answer does not depend on
        the path, else `BY_PATH` (then ask `lookup_http`). Cached (see the module)."""
        cache = self._by_host
        found = cache.get(host, cache)
        if found is not cache:
            return found
        name = normalize_host(host.decode("latin-1"))
        candidates = self._exact.get(name)
        dot = name.find(".")
        while candidates is None and dot >= 0:
            candidates = self._wild.get(name[dot + 1 :])
            dot = name.find(".", dot + 1)
        answer: Target | object | None = None
        if candidates is not None:  # the most specific domain decides (its "/" always matches)
            route = candidates[0]  # (longest path first)
            answer = Target(route, self.backends.get(route.service, ())) if route.path == "/" else BY_PATH
        if len(cache) >= HOST_CACHE:
            cache.clear()
        cache[host] = answer
        return answer

    def lookup_http(self, host: str, path: str) -> Target | None:
        route = self.route_http(host, path)
        if route is None:
            return None
        return Target(route, self.backends.get(route.service, ()))

    def lookup_tcp(self, port: int) -> Target | None:
        route = self._tcp.get(port)
        if route is None:
            return None
        return Target(route, self.backends.get(route.service, ()))

    @property
    def tcp_ports(self) -> frozenset[int]:
        return frozenset(self._tcp)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteTable):
            return NotImplemented
        return (
            self.routes == other.routes and dict(self.backends) == dict(other.backends)
            and self.lost == other.lost and dict(self.skipped) == dict(other.skipped)
            and self.silent == other.silent
        )  # fmt: skip

    def __hash__(self) -> int:
        return hash(self.routes)


def backends_status(table: RouteTable) -> dict[str, object]:
    """The backends part of ``/v1/router/status``: what each service's requests go to,
    and what is skipped because its host stopped answering this node's heartbeats."""
    return {
        "backends": {f"{a}/{t}": [b.address for b in bs] for (a, t), bs in sorted(table.backends.items())},
        "unresponsive": {
            "skipped": {f"{a}/{t}": [b.address for b in bs] for (a, t), bs in sorted(table.skipped.items())},
            "addresses": sorted(table.silent),
        },
    }
