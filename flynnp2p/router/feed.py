"""Keeps the router's table in step with the replicated state.

One task subscribes to the records a table is made of (apps, routes, jobs,
placements, the cluster's config and the routes' certificates), rebuilds the table (`table_from_state`, pure) after each burst of
changes, and swaps it into the `Watched` the router reads: subscribe before
snapshot, so no change is missed, and the router never waits on a lock.

The table also depends on which hosts this node's heartbeats find unresponsive
(``silent``, `flynnp2p.gossip.heartbeat.Heartbeats.silent`): a second task
rebuilds it when that set changes, at once (it changes at most once a
heartbeat round, and a host that stopped answering should lose its traffic
now). Either task rebuilds from the state and the set as they are then, so the
last rebuild is always from the latest of both. Router workers get the table
as the in-process router does (`flynnp2p.router.workers` pushes every new one).
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
    silent: Watched[frozenset[str]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`api_address`, `domain`: see `table_from_state`; `certs` gets the state's
    certificates and the cluster domain after every change; `silent`: the names
    of the hosts this node's heartbeats find unresponsive (none when not given)."""

    def rebuild_table(snapshot: State) -> None:
        silent_hosts = silent.value if silent is not None else frozenset()
        routes.set(
            table_from_state(snapshot, api_address=api_address, domain=domain, silent_hosts=silent_hosts)
        )

    def rebuild(snapshot: State) -> None:
        rebuild_table(snapshot)
        if certs is not None:
            certs.update(
                (StoredCert(c.id, c.domains, c.cert_pem, c.key_pem) for c in snapshot.records(Certificate)),
                domain=cluster_domain(snapshot, domain),
            )

    async def follow_silent(watched: Watched[frozenset[str]], version: int) -> None:
        while True:
            version, _ = await watched.wait_change(version)
            rebuild_table(state.state)  # (certificates do not depend on it)

    async with state.subscribe(KINDS) as (snapshot, changes), trio.open_nursery() as nursery:
        if silent is not None:
            nursery.start_soon(follow_silent, silent, silent.version)
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
        nursery.cancel_scope.cancel()  # (the state dropped us: end as before, not on `silent`)
