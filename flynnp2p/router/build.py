"""Build a `RouteTable` from a snapshot of the replicated state (pure).

A job takes traffic when the job lifecycle says so (`flynnp2p.state.jobs.takes_traffic`:
the host reports it up and its placement is not a stop): a job whose placement says "stop" is
``stopping`` and leaves the table at once, before its host acts (that is the
routers' half of draining). One-off jobs and jobs without an address never take
traffic. A job the leader stopped because its host is not alive is named in the
table's `lost` (`flynnp2p.state.jobs.stopped_for_lost_host`): what is in flight
to it is given up at once (`flynnp2p.router.lost`).

The cluster's API is routed too, as Flynn routed its controller: with
``api_address`` (this node's API), ``api.<cluster domain>`` goes to it, so
``https://api.<domain>:8443`` with the cluster CA's certificate reaches the API
through any node's router, and so does the node's own address
(``https://NODE:8443``, whose default certificate names that address too). The names ``api`` and ``git`` are reserved for apps
(`flynnp2p.api.ops.RESERVED_NAMES`); the API route sorts first all the same.
"""

from __future__ import annotations

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


def table_from_state(
    state: State, *, api_address: str | None = None, domain: str = "flynnp2p.localhost"
) -> RouteTable:
    apps = {a.id: a for a in state.records(App)}
    routes = []
    backends: dict[tuple[str, str], list[Backend]] = {}
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
                backends.setdefault(service, []).append(backend)
        elif stopped_for_lost_host(placement, j):
            lost.append(j.address)
    return RouteTable.build(routes, backends, lost)
