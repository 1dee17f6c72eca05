"""Giving up at once on requests in flight to a backend that is lost.

Theory of operation
-------------------
A job leaves the route table in one of two ways: it drains (``stopping``: its
host still runs it and answers what it was sent, within the grace period), or
its host is gone (the leader stopped it because the host is not alive: the
table's `RouteTable.lost`). Nothing will ever answer a request in flight to a
lost job; without this module it would wait ``response_header_timeout`` (60 s).

Every request in flight to a backend is registered under the backend's address
(`InFlight.add` where the balancer counts it, `InFlight.discard` where it stops
counting; a backend's set stays while the table lists it, so the hot path does
not allocate one per request), as an object with a ``backend_lost(address)`` method: the task path's
`ClientConnection`, or the fast lane's per-connection handle. When a new table
is swapped in, `InFlight.abort_lost` looks up only the addresses the table names
lost (a handful, not every connection) that it no longer lists, and calls each
registered request's ``backend_lost``. What that does is the path's own:
nothing if a response byte has already come back (then it finishes or fails as
it would have); otherwise an idempotent bodiless request is tried on another
backend (an H13 retry line, counted among the tries), anything else is answered
504 with an H12 line, "Backend lost".
"""

from __future__ import annotations

from typing import Protocol

from flynnp2p.router.table import RouteTable


class Abortable(Protocol):
    def backend_lost(self, address: str) -> None: ...


class InFlight:
    """The requests in flight, by backend address."""

    def __init__(self) -> None:
        self.by_address: dict[str, set[Abortable]] = {}

    def add(self, address: str, request: Abortable) -> None:
        waiting = self.by_address.get(address)
        if waiting is None:
            waiting = self.by_address[address] = set()
        waiting.add(request)

    def discard(self, address: str, request: Abortable) -> None:
        waiting = self.by_address.get(address)
        if waiting is not None:
            waiting.discard(request)  # (an empty set stays for the next request: see `prune`)

    def prune(self, keep: set[str]) -> None:
        """Forget the empty sets of addresses not in `keep` (those of a new table)."""
        for address in [a for a, w in self.by_address.items() if not w and a not in keep]:
            del self.by_address[address]

    @property
    def count(self) -> int:
        """Requests in flight now."""
        return sum(map(len, self.by_address.values()))

    def abort_lost(self, table: RouteTable) -> int:
        """Tell what is in flight to the addresses `table` names lost, and does not
        list (an address taken again by a job that takes traffic is not lost), that
        its backend is lost; how many were told."""
        if not table.lost:
            return 0
        listed = {b.address for bs in table.backends.values() for b in bs}
        told = 0
        for address in sorted(table.lost - listed):
            for request in list(self.by_address.get(address, ())):
                request.backend_lost(address)
                told += 1
        return told
