"""Keeps the router's table in step with the replicated state.

One task subscribes to the records a table is made of (apps, routes, jobs,
placements, the cluster's config and the routes' certificates), rebuilds the table (`table_from_state`, pure) after each burst of
changes, and swaps it into the `Watched` the router reads: subscribe before
snapshot, so no change is missed, and the router never waits on a lock.
"""

from __future__ import annotations

import trio

from flynnp2p.router.build import cluster_domain, table_from_state
from flynnp2p.router.table import RouteTable
from flynnp2p.router.tls import CertStore, StoredCert
from flynnp2p.state.merge import State
from flynnp2p.state.records import App, Certificate, ClusterConfig, Job, Placement, Route
from flynnp2p.state.replica import Subscribable
from flynnp2p.watch import Watched

KINDS = frozenset(
    {App.KIND, Route.KIND, Job.KIND, Placement.KIND, ClusterConfig.KIND, Certificate.KIND}
)
DEBOUNCE_S = 0.02


async def feed_routes(
    state: Subscribable,
    routes: Watched[RouteTable],
    *,
    api_address: str | None = None,
    domain: str = "flynnp2p.localhost",
    certs: CertStore | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`api_address`, `domain`: see `table_from_state`; `certs` gets the state's
    certificates and the cluster domain after every change."""

    def rebuild(snapshot: State) -> None:
        routes.set(table_from_state(snapshot, api_address=api_address, domain=domain))
        if certs is not None:
            certs.update(
                (StoredCert(c.id, c.domains, c.cert_pem, c.key_pem) for c in snapshot.records(Certificate)),
                domain=cluster_domain(snapshot, domain),
            )

    async with state.subscribe(KINDS) as (snapshot, changes):
        rebuild(snapshot)
        task_status.started()
        async for _batch in changes:
            await trio.sleep(DEBOUNCE_S)  # a deploy changes many records at once
            while True:
                try:
                    changes.receive_nowait()
                except trio.WouldBlock:
                    break
            rebuild(state.state)
