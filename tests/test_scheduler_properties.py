"""Hypothesis properties of plan() over small random clusters.

* it never overcommits a host's memory;
* it converges: after hosts obey a plan, the next plan (any seed) has nothing to do;
* it accounts for every job: per group, jobs running after the plan plus jobs it
  reports blocked equal what the formation asks for, all of the current release on
  fit hosts, crashed ones restarted, and every blocked entry has reasons; with room
  everywhere and a host for every group, nothing is blocked;
* it is a function of its inputs and seed: the order of the inputs does not matter.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flynnp2p.scheduler import Desired, Host, Inputs, JobInfo, OneOff, Plan, plan
from flynnp2p.scheduler.feasible import check_host
from flynnp2p.state.jobs import LIVE as LIVE_STATES
from flynnp2p.state.records import JOB_STATES
from tests.test_scheduler_helpers import apply_plan, used_mb

NAMES = ["n0", "n1", "n2", "n3", "n4"]
NOW = 1_000_000
ROOMY = 1_000_000
tags = st.sampled_from([{}, {"disk": "x"}, {"disk": "y"}, {"disk": "x", "zone": "y"}])


@st.composite
def clusters(draw: st.DrawFn, roomy: bool = False) -> Inputs:
    memory = st.just(ROOMY) if roomy else st.sampled_from([0, 256, 512, 1024, 2048])
    hosts = draw(
        st.lists(
            st.builds(
                Host,
                st.sampled_from(NAMES),
                st.sampled_from([True, True, True, False]),
                tags,
                memory,
            ),
            unique_by=lambda h: h.name,
            min_size=2,
            max_size=5,
        )
    )
    desired = draw(
        st.lists(
            st.builds(
                Desired,
                app=st.sampled_from(["a", "a", "b"]),
                release=st.sampled_from(["r1", "r1", "r2"]),
                type=st.sampled_from(["web", "web", "worker"]),
                count=st.sampled_from([0, 1, 1, 2, 3]),
                memory_mb=st.sampled_from([128, 256, 512]),
                omni=st.sampled_from([False, False, False, True]),
                constraints=st.sampled_from(
                    [{}, {}, {}, {"disk": "x"}, {"disk": "x", "zone": "y"}]
                ),
                hold=st.sampled_from([None] * 7 + ["release not here yet"]),
            ),
            unique_by=lambda d: d.group,
            min_size=1,
            max_size=3,
        )
    )
    # jobs mostly of the desired groups (up to two more than wanted), on the
    # cluster's hosts: that is where surplus, crashes, dead hosts and old releases meet
    on = [h.name for h in hosts] * 3 + ["gone"]
    job = st.tuples(
        st.sampled_from(on),
        st.sampled_from([*JOB_STATES, "up", "up", "crashed"]),
        st.integers(0, NOW),
        st.sampled_from([128, 256, 512]),
        st.integers(0, 3),
        st.none() | st.integers(0, NOW),
        st.none() | st.integers(0, NOW),
        st.sampled_from([False, False, False, True]),
    )
    groups = [(d.app, d.release, d.type) for d in desired]
    groups += [(d.app, "r0", d.type) for d in desired] + [("z", "r1", "web")]
    specs = [
        (g, *rest)
        for g in groups
        for rest in draw(st.lists(job, max_size=(len(hosts) + 2 if g[1] != "r0" else 2)))
    ]
    jobs = tuple(JobInfo(f"j{i}", *g, *rest) for i, (g, *rest) in enumerate(specs))
    one_offs = draw(
        st.lists(
            st.builds(
                OneOff,
                id=st.sampled_from(["run-0", "run-1", "j0"]),
                app=st.just("a"),
                release=st.just("r1"),
                type=st.just("web"),
                memory_mb=st.sampled_from([128, 4096]),
            ),
            unique_by=lambda o: o.id,
            max_size=2,
        )
    )
    return Inputs(tuple(hosts), tuple(desired), jobs, tuple(one_offs))


seeds = st.integers(0, 2**32)


@given(clusters(), seeds)
def test_never_overcommits_a_host(inputs: Inputs, seed: int) -> None:
    p = plan(inputs, NOW, seed)
    used = used_mb(apply_plan(inputs, p, NOW))
    capacity = {h.name: h.memory_mb for h in inputs.hosts}
    for host in {s.host for s in p.starts}:
        assert used[host] <= capacity[host]


@given(clusters(), seeds, seeds)
def test_converges_after_hosts_obey(inputs: Inputs, seed: int, seed2: int) -> None:
    after = apply_plan(inputs, plan(inputs, NOW, seed), NOW)
    again = plan(after, NOW, seed2)
    assert again.empty, again


def check_accounted(inputs: Inputs, p: Plan) -> None:
    """Per group: running after the plan + blocked == wanted, on hosts fit for it."""
    after = apply_plan(inputs, p, NOW)
    hosts = {h.name: h for h in inputs.hosts}
    blocked: dict[tuple[str, str], int] = {}
    for b in p.blocked:
        assert b.reasons
        if b.job_id is None:
            blocked[(b.app, b.type)] = blocked.get((b.app, b.type), 0) + b.count
    desired = {d.group: d for d in inputs.desired}
    for group in {j.group for j in after.jobs} | desired.keys():
        d = desired.get(group)
        if d is not None and d.hold is not None:
            continue
        live = [
            j for j in after.jobs if j.group == group and j.state in LIVE_STATES and not j.one_off
        ]
        if d is None:
            assert not live
            continue
        for j in live:
            assert j.release == d.release and check_host(hosts[j.host], d.constraints) is None
            assert j.state != "crashed"  # restarted (at its backoff time)
        if d.omni:
            on = [j.host for j in live]
            assert len(on) == len(set(on))  # at most one per host
            targets = [h for h in hosts.values() if check_host(h, d.constraints) is None]
            wanted = len(targets) if d.count else 0
        else:
            wanted = d.count
        assert len(live) + blocked.get(group, 0) == wanted, (group, live, p.blocked)
    requested = {o.id for o in inputs.one_offs} - {j.id for j in inputs.jobs}
    started = {s.job_id for s in p.starts if s.one_off}
    assert requested == started | {b.job_id for b in p.blocked if b.job_id}


@given(clusters(), seeds)
def test_every_job_is_running_or_explained(inputs: Inputs, seed: int) -> None:
    check_accounted(inputs, plan(inputs, NOW, seed))


@given(clusters(roomy=True), seeds)
def test_desired_counts_are_met_when_everything_fits(inputs: Inputs, seed: int) -> None:
    p = plan(inputs, NOW, seed)
    check_accounted(inputs, p)
    for d in inputs.desired:
        fits = any(check_host(h, d.constraints) is None for h in inputs.hosts)
        if fits and d.hold is None:
            assert not [b for b in p.blocked if (b.app, b.type) == d.group]


@settings(max_examples=50)
@given(clusters(), seeds, st.data())
def test_same_inputs_and_seed_give_the_same_plan(
    inputs: Inputs, seed: int, data: st.DataObject
) -> None:
    shuffled = Inputs(
        tuple(data.draw(st.permutations(inputs.hosts))),
        tuple(data.draw(st.permutations(inputs.desired))),
        tuple(data.draw(st.permutations(inputs.jobs))),
        tuple(data.draw(st.permutations(inputs.one_offs))),
    )
    assert plan(inputs, NOW, seed) == plan(shuffled, NOW, seed)
