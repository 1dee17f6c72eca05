"""Reconcile, table-driven: desired groups vs existing jobs -> stops, restarts, needs."""

from __future__ import annotations

import dataclasses

import pytest

from flynnp2p.scheduler.model import Inputs, OneOff
from flynnp2p.scheduler.reconcile import Reconciled, backoff_ms, reconcile, restart_of
from tests.test_scheduler_helpers import host, job, want

N1, N2, N3 = host("n1"), host("n2"), host("n3")
MIN = 60_000


def run(hosts: list, desired: list, jobs: list, now: int = 0) -> Reconciled:
    return reconcile(Inputs(tuple(hosts), tuple(desired), tuple(jobs)), now)


def stopped(r: Reconciled) -> list[str]:
    return [s.job_id for s in r.stops]


def needs(r: Reconciled) -> dict[tuple[str, str], int]:
    return {n.desired.group: n.count for n in r.needs}


# (name, hosts, desired, jobs, expected stops, expected needs)
CASES = [
    ("scale up from nothing", [N1], [want(count=3)], [], [], {("a", "web"): 3}),
    ("at count: nothing", [N1], [want(count=1)], [job("j1")], [], {}),
    (
        "scale down stops the newest first",
        [N1, N2],
        [want(count=1)],
        [job("old", created=1), job("new", created=3), job("mid", "n2", created=2)],
        ["mid", "new"],
        {},
    ),
    (
        "scale down stops crashed jobs before newer running ones",
        [N1],
        [want(count=2)],
        [job("j1", created=1, state="crashed"), job("j2", created=2), job("j3", created=3)],
        ["j1"],
        {},
    ),
    (
        "scale to zero",
        [N1],
        [want(count=0)],
        [job("j1"), job("j2", state="starting")],
        ["j1", "j2"],
        {},
    ),
    (
        "release change stops the whole old release and starts the new one",
        [N1],
        [want(count=2, release="r2")],
        [job("j1"), job("j2")],
        ["j1", "j2"],
        {("a", "web"): 2},
    ),
    (
        "jobs on a dead host are replaced at once",
        [N1, host("n2", alive=False)],
        [want(count=2)],
        [job("j1"), job("j2", "n2")],
        ["j2"],
        {("a", "web"): 1},
    ),
    (
        "jobs on an unknown host are replaced",
        [N1],
        [want(count=1)],
        [job("j1", "gone")],
        ["j1"],
        {("a", "web"): 1},
    ),
    (
        "a host that lost a required tag gives its job up",
        [host("n1", disk="hdd"), host("n2", disk="ssd")],
        [want(count=1, disk="ssd")],
        [job("j1")],
        ["j1"],
        {("a", "web"): 1},
    ),
    (
        "a type removed from the formation stops",
        [N1],
        [want(type="web")],
        [job("j1"), job("w1", type="worker")],
        ["w1"],
        {},
    ),
    ("an app without formation stops", [N1], [], [job("j1", app="b")], ["j1"], {}),
    (
        "stopping and down jobs count for nothing",
        [N1],
        [want(count=2)],
        [job("j1", state="stopping"), job("j2", state="down"), job("j3")],
        [],
        {("a", "web"): 1},
    ),
    (
        "one-off jobs are not counted and not restarted",
        [N1],
        [want(count=1)],
        [job("o1", one_off=True), job("o2", state="crashed", one_off=True)],
        [],
        {("a", "web"): 1},
    ),
    (
        "a one-off on a dead host is stopped, not replaced",
        [host("n1", alive=False)],
        [],
        [job("o1", one_off=True)],
        ["o1"],
        {},
    ),
    (
        "omni: one per alive eligible host (join)",
        [N1, N2, N3],
        [want(count=1, omni=True)],
        [job("j1")],
        [],
        {("a", "web"): 2},
    ),
    (
        "omni: a failed host's job stops and is not moved",
        [N1, host("n2", alive=False)],
        [want(count=1, omni=True)],
        [job("j1"), job("j2", "n2")],
        ["j2"],
        {},
    ),
    (
        "omni: extras on one host stop, the oldest up one stays",
        [N1],
        [want(count=1, omni=True)],
        [job("j1", state="starting", created=0), job("j2", created=5), job("j3", created=1)],
        ["j1", "j2"],
        {},
    ),
    (
        "omni: only hosts with the tags",
        [host("n1", disk="ssd"), N2],
        [want(count=1, omni=True, disk="ssd")],
        [],
        [],
        {("a", "web"): 1},
    ),
    (
        "omni: scaled to zero",
        [N1],
        [want(count=0, omni=True)],
        [job("j1")],
        ["j1"],
        {},
    ),
]


@pytest.mark.parametrize(
    ("hosts", "desired", "jobs", "stops", "need"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_reconcile(hosts: list, desired: list, jobs: list, stops: list, need: dict) -> None:
    r = run(hosts, desired, jobs)
    assert sorted(stopped(r)) == sorted(stops)
    assert needs(r) == need


def test_omni_need_names_the_hosts_missing_a_job() -> None:
    r = run([N1, N2, N3], [want(omni=True)], [job("j1", "n2")])
    assert r.needs[0].hosts == ("n1", "n3")


def test_omni_groups_come_first_then_sorted() -> None:
    r = run([N1], [want("b"), want("a", "web"), want("z", "agent", omni=True)], [])
    assert [n.desired.group for n in r.needs] == [("z", "agent"), ("a", "web"), ("b", "web")]


def test_stop_reasons_say_why() -> None:
    r = run(
        [N1, host("n2", alive=False), host("n3", disk="hdd")],
        [want(count=1, release="r2", zone="x")],
        [
            job("dead", "n2", release="r2"),
            job("old", "n1", release="r1"),
            job("tag", "n3", release="r2"),
        ],
    )
    assert {s.job_id: s.reason for s in r.stops} == {
        "dead": "host n2 is not alive",
        "old": "release r1 replaced by r2",
        "tag": "host n3: lacks tag zone=x",
    }


def test_held_group_is_left_alone() -> None:
    held = dataclasses.replace(want(count=3, release="r9"), hold="not here yet")
    r = run([N1], [held], [job("j1", release="r1", state="crashed", exited_at=0)])
    assert r.held == (held,) and not r.stops and not r.needs and not r.restarts


def test_one_off_requests_are_placed_once() -> None:
    reqs = (OneOff("run-1", "a", "r1", "web"), OneOff("run-2", "a", "r1", "web"))
    r = reconcile(Inputs((N1,), (), (job("run-1", state="down", one_off=True),), reqs), 0)
    assert [o.id for o in r.one_offs] == ["run-2"]


# ------------------------------------------------------------------ crash backoff


@pytest.mark.parametrize(("restarts", "delay"), [(0, 0), (1, 10_000), (2, 30_000), (7, 30_000)])
def test_backoff_by_restart_count(restarts: int, delay: int) -> None:
    assert backoff_ms(restarts) == delay
    crashed = job("j1", state="crashed", restarts=restarts, exited_at=100_000)
    r = run([N1], [want()], [crashed], now=100_000)
    assert [(x.job_id, x.host, x.at_ms, x.restarts) for x in r.restarts] == [
        ("j1", "n1", 100_000 + delay, restarts + 1)
    ]


@pytest.mark.parametrize(
    ("up_for", "at", "restarts_after"),
    [(5 * MIN, 0, 1), (6 * MIN, 0, 1), (5 * MIN - 1, 30_000, 4)],
    ids=["5 min up resets", "longer resets", "just under 5 min keeps counting"],
)
def test_backoff_resets_after_five_minutes_up(up_for: int, at: int, restarts_after: int) -> None:
    crashed = job("j1", state="crashed", restarts=3, exited_at=10 * MIN, up_since=10 * MIN - up_for)
    assert restart_of(crashed, 10 * MIN).at_ms == 10 * MIN + at
    assert restart_of(crashed, 10 * MIN).restarts == restarts_after


def test_restart_time_is_in_the_plan_not_slept_on() -> None:
    crashed = job("j1", state="crashed", restarts=1, exited_at=5_000)
    r = run([N1], [want()], [crashed], now=6_000)
    assert r.restarts[0].at_ms == 15_000  # still reported before it is due


def test_crashed_job_without_exit_time_counts_from_now() -> None:
    assert restart_of(job("j1", state="crashed", restarts=1), 7_000).at_ms == 17_000


def test_crashed_one_off_is_never_restarted() -> None:
    r = run([N1], [], [job("o1", state="crashed", one_off=True, exited_at=0)], now=MIN)
    assert not r.restarts and not r.stops


def test_crashed_job_on_dead_host_is_replaced_not_restarted() -> None:
    r = run([host("n1", alive=False), N2], [want()], [job("j1", state="crashed", exited_at=0)])
    assert not r.restarts and stopped(r) == ["j1"] and needs(r) == {("a", "web"): 1}


def test_duplicate_desired_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="two desired entries for app a type web"):
        run([N1], [want(), want()], [])
