"""Deploys with a surge: old jobs that are up give way only to new jobs that are up.

Table-driven cases for `surge` through `reconcile`, the "auto" strategy, and a
Hypothesis property over whole plans: no stop the plan makes takes the group below
``min(N, up before)``, a second plan on the first one's result is empty, and hosts
that bring jobs up lead to exactly N new jobs.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flynnp2p.scheduler import Desired, Inputs, JobInfo, plan
from flynnp2p.scheduler.reconcile import reconcile
from flynnp2p.scheduler.surge import ALL_AT_ONCE, ONE_BY_ONE, REPLACE, effective_strategy
from tests.test_scheduler_helpers import apply_plan, host, job, want

N1, N2 = host("n1"), host("n2")


def deploy(count: int, strategy: str, release: str = "r2") -> Desired:
    return dataclasses.replace(want(count=count, release=release), strategy=strategy)


def outcome(desired: Desired, jobs: list[JobInfo]) -> tuple[list[str], int]:
    r = reconcile(Inputs((N1, N2), (desired,), tuple(jobs)), 0)
    return sorted(s.job_id for s in r.stops), sum(n.count for n in r.needs)


# (name, desired, jobs, expected stops, expected new jobs to place)
CASES = [
    (
        "all-at-once: all new jobs start, no old one stops yet",
        deploy(2, ALL_AT_ONCE),
        [job("o1"), job("o2", "n2")],
        [],
        2,
    ),
    (
        "one-by-one: one new job at a time",
        deploy(2, ONE_BY_ONE),
        [job("o1"), job("o2", "n2")],
        [],
        1,
    ),
    (
        "one-by-one: nothing more while the new job starts",
        deploy(2, ONE_BY_ONE),
        [job("o1"), job("o2", "n2"), job("n1", release="r2", state="starting")],
        [],
        0,
    ),
    (
        "one-by-one: a new job up lets one old job go and the next new one start",
        deploy(2, ONE_BY_ONE),
        [job("o1", created=1), job("o2", "n2", created=2), job("n1", release="r2")],
        ["o2"],
        1,
    ),
    (
        "old jobs that are not up stop at once",
        deploy(2, ONE_BY_ONE),
        [job("o1"), job("o2", state="starting"), job("o3", state="crashed", exited_at=0)],
        ["o2", "o3"],
        1,
    ),
    (
        "all new jobs up: the last old ones stop",
        deploy(2, ALL_AT_ONCE),
        [job("o1"), job("n1", release="r2"), job("n2", "n2", release="r2")],
        ["o1"],
        0,
    ),
    (
        "a crashed new job holds back one-by-one",
        deploy(2, ONE_BY_ONE),
        [job("o1"), job("o2"), job("n1", release="r2", state="crashed", exited_at=0)],
        [],
        0,
    ),
    (
        "rolled back: the failed release's jobs, none up, stop; the old ones stay",
        deploy(2, ONE_BY_ONE, release="r1"),
        [job("o1"), job("o2"), job("n1", release="r2", state="crashed", exited_at=0)],
        ["n1"],
        0,
    ),
    (
        "rolled back mid-way: an up job of the failed release serves until an old one is up",
        deploy(2, ONE_BY_ONE, release="r1"),
        [job("o1"), job("n1", release="r2"), job("n2", release="r2", state="starting")],
        ["n2"],
        1,
    ),
    (
        "scaled down during a deploy: old jobs beyond the count stop",
        deploy(1, ALL_AT_ONCE),
        [job("o1", created=1), job("o2", created=2), job("o3", created=3)],
        ["o2", "o3"],
        1,
    ),
    (
        "replace: every old job stops at once",
        deploy(2, REPLACE),
        [job("o1"), job("o2", "n2")],
        ["o1", "o2"],
        2,
    ),
]


@pytest.mark.parametrize(
    ("name", "desired", "jobs", "stops", "starts"), CASES, ids=[c[0] for c in CASES]
)
def test_surge(
    name: str, desired: Desired, jobs: list[JobInfo], stops: list[str], starts: int
) -> None:
    assert outcome(desired, jobs) == (stops, starts)


def test_reasons_say_which_release_replaced_which() -> None:
    r = reconcile(Inputs((N1,), (deploy(1, ONE_BY_ONE),), (job("o1"), job("n1", release="r2"))), 0)
    assert [s.reason for s in r.stops] == ["release r1 replaced by r2 (a new job is up)"]


@pytest.mark.parametrize(
    ("setting", "web", "effective"),
    [
        ("auto", 1, ALL_AT_ONCE),
        ("auto", 2, ONE_BY_ONE),
        ("auto", 0, ALL_AT_ONCE),
        ("all-at-once", 5, ALL_AT_ONCE),
        ("one-by-one", 1, ONE_BY_ONE),
    ],
)
def test_auto_is_one_by_one_from_two_web_jobs(setting: str, web: int, effective: str) -> None:
    assert effective_strategy(setting, {"web": web, "worker": 3}) == effective


# -- the property -------------------------------------------------------------

STATES = ["up", "up", "starting", "crashed"]


@st.composite
def deploys(draw: st.DrawFn) -> Inputs:
    count = draw(st.integers(0, 4))
    strategy = draw(st.sampled_from([ALL_AT_ONCE, ONE_BY_ONE]))
    desired = deploy(count, strategy)
    specs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["r0", "r1", "r1", "r2"]),
                st.sampled_from(STATES),
                st.sampled_from(["n1", "n2"]),
                st.integers(0, 100),
            ),
            max_size=7,
        )
    )
    jobs = tuple(
        JobInfo(
            f"j{i}",
            "a",
            rel,
            "web",
            h,
            state,
            created,
            256,
            exited_at=0 if state == "crashed" else None,
        )
        for i, (rel, state, h, created) in enumerate(specs)
    )
    return Inputs((N1, N2), (desired,), jobs)


def up_ids(inputs: Inputs) -> set[str]:
    return {j.id for j in inputs.jobs if j.state == "up"}


def hosts_bring_up(inputs: Inputs) -> Inputs:
    """Every job started comes up; every job stopped is gone."""
    jobs = tuple(
        dataclasses.replace(j, state="up") if j.state == "starting" else j
        for j in inputs.jobs
        if j.state != "stopping"
    )
    return dataclasses.replace(inputs, jobs=jobs)


@settings(max_examples=300)
@given(deploys(), st.integers(0, 2**32))
def test_surge_keeps_serving_is_idempotent_and_converges(inputs: Inputs, seed: int) -> None:
    [d] = inputs.desired
    now = 10**6  # every crashed job's restart is due
    for step in range(4 * (d.count + len(inputs.jobs)) + 4):
        before = up_ids(inputs)
        p = plan(inputs, now, seed + step)
        after = apply_plan(inputs, p, now)
        # a stop never takes the group below min(N, up before)
        assert len(up_ids(after)) >= min(d.count, len(before)), (inputs, p)
        if d.strategy == ONE_BY_ONE and any(
            j.release != d.release and j.state == "up" for j in after.jobs
        ):
            new_not_up = [
                j
                for j in after.jobs
                if j.release == d.release and j.state != "up" and j.state != "stopping"
            ]
            assert len(new_not_up) <= 1 or not p.starts
        again = plan(after, now, seed + step + 1)
        assert again.empty, (after, again)
        if p.empty and not any(j.state == "starting" for j in after.jobs):
            break
        inputs = hosts_bring_up(after)
    live = [j for j in inputs.jobs if j.state != "stopping"]
    assert len(live) == d.count and all(j.release == d.release and j.state == "up" for j in live)


def test_inputs_carry_the_apps_effective_strategy() -> None:
    from flynnp2p.scheduler import inputs_from_state
    from flynnp2p.state.records import App, Formation
    from tests.test_scheduler_model import NOW, RELEASE, state_of

    f = Formation("app1", "r1", 0, processes={"web": 2, "agent": 1})
    by_type = {
        d.type: d.strategy
        for d in inputs_from_state(state_of(RELEASE, f, App("app1", "one", 0)), [], NOW).desired
    }
    assert by_type == {"web": ONE_BY_ONE, "agent": REPLACE}  # omni: one per host, replaced
    pinned = App("app1", "one", 0, strategy="all-at-once")
    [_, web] = inputs_from_state(state_of(RELEASE, f, pinned), [], NOW).desired
    assert web.strategy == ALL_AT_ONCE
