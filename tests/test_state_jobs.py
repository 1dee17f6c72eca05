"""The job lifecycle (`flynnp2p.state.jobs`): every report state by every placement."""

from __future__ import annotations

import dataclasses

import pytest

from flynnp2p.state import jobs as lifecycle
from flynnp2p.state.jobs import (
    ACTIVE,
    IN_FLIGHT,
    LIVE,
    LOST,
    NEXT,
    REPORTED,
    effective_state,
    fenced_reason,
    is_fenced,
    is_finished,
    may_follow,
    takes_traffic,
)
from flynnp2p.state.records import JOB_STATES, Job, Placement


def placement(action: str = "start", generation: int = 0) -> Placement:
    return Placement(id="j", app_id="a", release_id="r", process_type="web", host="h",
                     action=action, epoch=1, created_at=0, generation=generation)  # fmt: skip


def report(state: str, generation: int = 0, **kw: object) -> Job:
    return Job(id="j", app_id="a", release_id="r", process_type="web", host="h",
               state=state, created_at=0, updated_at=1, generation=generation, **kw)  # type: ignore[arg-type]  # fmt: skip


PLACEMENTS = {
    "none": None,
    "start": placement(),
    "restart": placement(generation=1),  # a restart ordered, not acted on yet
    "stop": placement("stop"),
}

# report state (None: no report) → effective state per placement (none, start, restart, stop)
EFFECTIVE = {
    None: (None, "pending", "pending", "down"),
    "pending": ("pending", "pending", "pending", "stopping"),
    "starting": ("starting", "starting", "starting", "stopping"),
    "up": ("up", "up", "up", "stopping"),
    "crashed": ("crashed", "crashed", "pending", "down"),  # stopped: it runs nothing
    "stopping": ("stopping", "stopping", "stopping", "stopping"),
    "down": ("down", "down", "down", "down"),
}
TRAFFIC = {("up", "none"), ("up", "start"), ("up", "restart")}  # all else takes none


def test_the_table_covers_every_reported_state() -> None:
    assert set(EFFECTIVE) == {None, *JOB_STATES}
    assert REPORTED == JOB_STATES  # the record schema accepts exactly these


@pytest.mark.parametrize("state", list(EFFECTIVE))
@pytest.mark.parametrize("action", list(PLACEMENTS))
def test_effective_state_and_takes_traffic(state: str | None, action: str) -> None:
    p = PLACEMENTS[action]
    j = None if state is None else report(state)
    want = EFFECTIVE[state][list(PLACEMENTS).index(action)]
    assert effective_state(p, j) == want
    assert takes_traffic(p, j) is ((state, action) in TRAFFIC)


# state → (finished: service job, finished: one-off, live, active, in flight)
RULES = {
    "pending": (False, False, True, True, True),
    "starting": (False, False, True, True, True),
    "up": (False, False, True, True, False),
    "crashed": (False, True, True, False, False),  # a service job waits for its restart
    "stopping": (False, False, False, False, True),
    "down": (True, True, False, False, False),
    LOST: (False, False, False, False, True),
}


@pytest.mark.parametrize("state", list(RULES))
def test_what_each_state_means(state: str) -> None:
    finished, finished_one_off, live, active, in_flight = RULES[state]
    assert is_finished(state, one_off=False) is finished
    assert is_finished(state, one_off=True) is finished_one_off
    assert (state in LIVE) is live
    assert (state in ACTIVE) is active
    assert (state in IN_FLIGHT) is in_flight


def test_rules_cover_every_state_the_api_shows() -> None:
    shown = {s for row in EFFECTIVE.values() for s in row if s is not None} | {LOST}
    assert set(RULES) == shown


def test_reports_follow_the_lifecycle() -> None:
    assert set(NEXT) == {None, *REPORTED}
    assert NEXT[lifecycle.DOWN] == frozenset()  # a generation ends down
    reachable, todo = set(), [None]
    while todo:
        for s in NEXT[todo.pop()]:
            if s not in reachable:
                reachable.add(s)
                todo.append(s)
    assert reachable == set(REPORTED)
    assert may_follow(None, report("pending"))
    assert may_follow(None, report("down"))  # refused as fenced
    assert not may_follow(None, report("up"))
    assert may_follow(report("up"), report("stopping"))
    assert may_follow(report("up"), report("pending"))  # this agent restarted: it starts again
    assert may_follow(report("up"), report("starting"))  # it re-adopted the container
    assert not may_follow(report("down"), report("up"))
    assert not may_follow(report("crashed"), report("pending"))  # only a restart restarts it
    assert may_follow(report("crashed"), report("pending", generation=1))
    assert may_follow(report("down"), report("pending", generation=1))  # a fenced one-off placed again
    assert not may_follow(report("crashed"), report("up", generation=1))  # a new run starts pending
    assert not may_follow(report("up", generation=1), report("down"))  # never back a generation


def test_fenced() -> None:
    reason = fenced_reason(3, 5)
    assert reason.startswith(lifecycle.FENCED) and "epoch 3" in reason and "5" in reason
    assert is_fenced(report("down", reason=reason))
    assert not is_fenced(report("crashed", reason=reason))
    assert not is_fenced(report("down", reason="scaled down to 0"))
    assert not is_fenced(dataclasses.replace(report("down"), reason=None))
