"""Build a `RouteTable` from a snapshot of the replicated state (pure).

A job takes traffic when the job lifecycle says so (`flynnp2p.state.jobs.takes_traffic`:
the host reports it up and its placement is not a stop): a job whose placement says "stop" is
``stopping`` and leaves the table at once, before its host acts (that is the
routers' half of draining). One-off jobs and jobs without an address never take
traffic.

`https_only` is not in the `Route` record yet; it is read when it exists so the
table picks it up the day the field lands.
"""

from __future__ import annotations

from flynnp2p.router.table import Backend, RouteSpec, RouteTable
from flynnp2p.state.jobs import takes_traffic
from flynnp2p.state.merge import State
from flynnp2p.state.records import App, Job, Placement, Route


def _backend(job: Job, placement: Placement | None) -> bool:
    return not job.one_off and job.address is not None and takes_traffic(placement, job)


def table_from_state(state: State) -> RouteTable:
    apps = {a.id: a for a in state.records(App)}
    routes = []
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
                https_only=bool(getattr(r, "https_only", False)),
                app_name=app.name,
            )
        )
    wanted = {r.service for r in routes}
    placements = {p.id: p for p in state.records(Placement)}
    backends: dict[tuple[str, str], list[Backend]] = {}
    for j in state.records(Job):
        service = (j.app_id, j.process_type)
        if service in wanted and _backend(j, placements.get(j.id)):
            assert j.address is not None
            backend = Backend(j.id, j.address)
            if backend.valid:  # the record schema admits hostnames; the data path does not
                backends.setdefault(service, []).append(backend)
    return RouteTable.build(routes, backends)
