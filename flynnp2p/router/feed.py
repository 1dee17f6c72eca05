"""Keeps the router's table in step with the replicated state.

One task subscribes to the records a table is made of (apps, routes, jobs,
placements), rebuilds the table (`table_from_state`, pure) after each burst of
changes, and swaps it into the `Watched` the router reads: subscribe before
snapshot, so no change is missed, and the router never waits on a lock.
"""

from __future__ import annotations

import trio

from flynnp2p.router.build import table_from_state
from flynnp2p.router.table import RouteTable
from flynnp2p.state.records import App, Job, Placement, Route
from flynnp2p.state.replica import Subscribable
from flynnp2p.watch import Watched

KINDS = frozenset({App.KIND, Route.KIND, Job.KIND, Placement.KIND})
DEBOUNCE_S = 0.02


async def feed_routes(
    state: Subscribable,
    routes: Watched[RouteTable],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with state.subscribe(KINDS) as (snapshot, changes):
        routes.set(table_from_state(snapshot))
        task_status.started()
        async for _batch in changes:
            await trio.sleep(DEBOUNCE_S)  # a deploy changes many records at once
            while True:
                try:
                    changes.receive_nowait()
                except trio.WouldBlock:
                    break
            routes.set(table_from_state(state.state))
