"""A replicated-state snapshot made of given records, for tests of pure code."""

from __future__ import annotations

from flynnp2p.state.hlc import HlcClock
from flynnp2p.state.merge import Delete, State, apply_entries, local_entries
from flynnp2p.state.records import Record

NOW = 1_000


def state_of(*records: Record, deleted: tuple[Delete, ...] = (), now: int = NOW) -> State:
    """The records written on one node, then the deletions (tombstones) after them."""
    clock = HlcClock()
    state = apply_entries(State(), local_entries(State(), "node-1", clock, records, now))[0]
    if deleted:
        state = apply_entries(state, local_entries(state, "node-1", clock, deleted, now + 1))[0]
    return state
