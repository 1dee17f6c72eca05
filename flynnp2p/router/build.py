"""Build a `RouteTable` from a snapshot of the replicated state (pure).

A job takes traffic when the job lifecycle says so (`flynnp2p.state.jobs.takes_traffic`:
the host reports it up and its placement is not a stop): a job whose placement says "stop" is
``stopping`` and leaves the table at once, before its host acts (that is the
routers' half of draining). One-off jobs and jobs without an address never take
traffic. A job the leader stopped because its host is not alive is named in the
table's `lost` (`flynnp2p.state.jobs.stopped_for_lost_host`): what is in flight
to it is given up at once (`flynnp2p.router.lost`).

Hosts this node's heartbeats call unresponsive (``silent_hosts``,
`flynnp2p.gossip.heartbeat`) lose their traffic about 2 s after they stop
answering, instead of the 6-9 s the leader takes to stop their jobs as lost
(serf must call the host failed first): a pooled connection to a host that was
cut off shows no FIN, so a request written on it would hang, and a new connect
would wait out the connect timeout. A service's backends on silent hosts are
left out of the table (into its `skipped`) while the service has one on a host
that answers; when all of them are on silent hosts all stay listed, since a try
beats a 503. When a host answers again the next table lists its backends again.
Every backend address on a silent host is also in the table's `silent`, so that
the router stops pooling connections to it.

Silence only steers new requests: what is in flight to a silent host is left to
finish (`lost` alone gives it up). The heartbeats are one node's view, not the
cluster's, and a host that is slow (a loaded machine, a long GC, a burst of
packet loss) misses a few of them while it still answers what it was sent; to
504 those requests would fail work that was going to succeed.

The cluster's API is routed too, as Flynn routed its controller: with
``api_address`` (this node's API), ``api.<cluster domain>`` goes to it, so
``https://api.<domain>:8443`` with the cluster CA's certificate reaches the API
through any node's router, and so does the node's own address
(``https://NODE:8443``, whose default certificate names that address too). The names ``api`` and ``git`` are reserved for apps
(`flynnp2p.api.ops.RESERVED_NAMES`); the API route sorts first all the same.
"""

from __future__ import annotations

from collections.abc import Sequence, Set

from flynnp2p.netaddr import ip_port, url_host
from flynnp2p.router.table import Backend, RouteSpec, RouteTable
from flynnp2p.state.jobs import stopped_for_lost_host, takes_traffic
from flynnp2p.state.merge import State
from flynnp2p.state.records import App, ClusterConfig, Job, Placement, Route

API_ROUTE_ID = "!api"  # sorts before every record id: it wins a (forbidden) tie
API_APP = "flynnp2p-api"


def cluster_domain(state: State, fallback: str) -> str:
    config = state.record(ClusterConfig, "config")
    return config.domain if config is not None else fallback


def prefer_answering(
    backends: Sequence[tuple[Backend, str]], silent_hosts: Set[str]
) -> tuple[list[Backend], list[Backend]]:
    """`backends` (each with its host) → (listed, skipped): those on hosts not in
    `silent_hosts` when there is one, else all of them (see the module)."""
    answering = [b for b, host in backends if host not in silent_hosts]
    if not answering or len(answering) == len(backends):
        return [b for b, _ in backends], []
    return answering, [b for b, host in backends if host in silent_hosts]


def table_from_state(
    state: State,
    *,
    api_address: str | None = None,
    domain: str = "flynnp2p.localhost",
    silent_hosts: Set[str] = frozenset(),
) -> RouteTable:
    apps = {a.id: a for a in state.records(App)}
    routes = []
    backends: dict[tuple[str, str], list[Backend]] = {}
    hosted: dict[tuple[str, str], list[tuple[Backend, str]]] = {}
    parsed = None if api_address is None else ip_port(api_address)
    if api_address is not None and parsed is not None:
        # api.<domain>, and this node's own address (https://NODE:8443 with no DNS).
        cluster = cluster_domain(state, domain)
        names = (f"api.{cluster}", f"git.{cluster}", url_host(parsed[0]))
        for i, name in enumerate(names):
            api = RouteSpec(
                id=f"{API_ROUTE_ID}{i}", app_id=API_APP, type="http", domain=name,
                process_type="api", app_name=API_APP,
            )  # fmt: skip
            routes.append(api)
        backends[(API_APP, "api")] = [Backend("api", api_address)]
    for r in state.records(Route):
        app = apps.get(r.app_id)
        if app is None:  # the app was deleted; its routes go with it
            continue
        routes.append(
            RouteSpec(
                id=r.id,
                app_id=r.app_id,
                type=r.type,
                domain=r.domain,
                path=r.path,
                port=r.port,
                process_type=r.process_type,
                sticky=r.sticky,
                https_only=r.https_only,
                app_name=app.name,
            )
        )
    wanted = {r.service for r in routes}
    placements = {p.id: p for p in state.records(Placement)}
    lost: list[str] = []
    for j in state.records(Job):
        service = (j.app_id, j.process_type)
        if service not in wanted or j.one_off or j.address is None:
            continue
        placement = placements.get(j.id)
        if takes_traffic(placement, j):
            backend = Backend(j.id, j.address)
            if backend.valid:  # the record schema admits hostnames; the data path does not
                hosted.setdefault(service, []).append((backend, j.host))
        elif stopped_for_lost_host(placement, j):
            lost.append(j.address)
    skipped: dict[tuple[str, str], list[Backend]] = {}
    silent: list[str] = []
    for service, found in hosted.items():
        listed, skipped[service] = prefer_answering(found, silent_hosts)
        backends.setdefault(service, []).extend(listed)
        silent.extend(b.address for b, host in found if host in silent_hosts)
    return RouteTable.build(routes, backends, lost, skipped, silent)
