"""plan(): examples end to end. The general laws are in test_scheduler_properties."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from flynnp2p.scheduler import (
    Blocked,
    Desired,
    Host,
    Inputs,
    JobInfo,
    OneOff,
    Plan,
    Restart,
    new_job_id,
    plan,
)
from tests.test_scheduler_helpers import apply_plan, host, job, used_mb, want


def run(
    hosts: Sequence[Host],
    desired: Sequence[Desired],
    jobs: Sequence[JobInfo] = (),
    now: int = 0,
    seed: int = 1,
) -> Plan:
    return plan(Inputs(tuple(hosts), tuple(desired), tuple(jobs)), now, seed)


def placed(p: Plan) -> list[tuple[str, str]]:
    return sorted((s.app, s.host) for s in p.starts)


def test_tag_constraint_blocked_with_reasons() -> None:
    p = run(
        [host("n1"), host("n2", disk="hdd"), host("n3", alive=False, disk="ssd")],
        [want(count=2, disk="ssd")],
    )
    assert not p.starts
    [b] = p.blocked
    assert (b.app, b.type, b.count) == ("a", "web", 2)
    assert b.reasons[0] == "no host with tag disk=ssd"
    assert "host n1: lacks tag disk=ssd" in b.reasons
    assert "host n2: lacks tag disk=ssd" in b.reasons
    assert "host n3: not alive" in b.reasons
    assert str(b).startswith("blocked: app a: 2 x web: no host with tag disk=ssd")


def test_memory_exhaustion_blocked_with_reasons() -> None:
    p = run([host("n1", mem=1024)], [want(count=1, mem=512)], [job("big", app="b", mem=824)])
    assert not p.starts
    assert p.blocked == (
        Blocked(
            "a",
            "web",
            1,
            (
                "no host with 512 MB free",
                "1 host filtered: 1 short of memory",
                "host n1: 200 MB free, needs 512 MB",
            ),
        ),
    )


def test_partial_placement_blocks_only_the_rest() -> None:
    p = run([host("n1", mem=1024), host("n2", mem=256)], [want(count=3, mem=512)])
    assert placed(p) == [("a", "n1"), ("a", "n1")]
    assert [(b.count, b.reasons[0]) for b in p.blocked] == [(1, "no host with 512 MB free")]
    assert "host n2: 256 MB free, needs 512 MB" in p.blocked[0].reasons


def test_placements_earlier_in_the_plan_use_up_memory() -> None:
    p = run([host("n1", mem=1024)], [want("a", count=2, mem=512), want("b", count=1, mem=512)])
    assert placed(p) == [("a", "n1"), ("a", "n1")]
    assert [(b.app, b.count) for b in p.blocked] == [("b", 1)]


def test_omni_groups_get_their_memory_first() -> None:
    p = run([host("n1", mem=512)], [want("a", count=1, mem=512), want("z", omni=True, mem=512)])
    assert placed(p) == [("z", "n1")]
    assert [b.app for b in p.blocked] == ["a"]


def test_spread_over_hosts_then_double_up() -> None:
    hosts = [host("n1"), host("n2"), host("n3")]
    assert placed(run(hosts, [want(count=3)])) == [("a", "n1"), ("a", "n2"), ("a", "n3")]
    assert len({s.host for s in run(hosts, [want(count=6)]).starts}) == 3
    p = run(hosts, [want(count=3)], [job("j1", "n1")])
    assert placed(p) == [("a", "n2"), ("a", "n3")]


def test_spread_prefers_less_loaded_hosts() -> None:
    p = run([host("n1"), host("n2")], [want("a"), want("b")], [job("j1", "n1", app="b")])
    assert placed(p) == [("a", "n2")]


def test_failed_host_is_replaced_elsewhere_at_once() -> None:
    hosts = [host("n1", alive=False), host("n2"), host("n3")]
    p = run(hosts, [want(count=2)], [job("j1", "n1"), job("j2", "n2")])
    assert [(s.job_id, s.reason) for s in p.stops] == [("j1", "host n1 is not alive")]
    assert placed(p) == [("a", "n3")]


def test_omni_follows_joins_and_failures() -> None:
    omni = [want(omni=True)]
    first = run([host("n1"), host("n2")], omni)
    assert placed(first) == [("a", "n1"), ("a", "n2")]
    inputs = apply_plan(Inputs((host("n1"), host("n2")), tuple(omni)), first)
    joined = plan(dataclasses.replace(inputs, hosts=(host("n1"), host("n2"), host("n3"))), 0, 2)
    assert placed(joined) == [("a", "n3")] and not joined.stops
    failed = plan(dataclasses.replace(inputs, hosts=(host("n1"), host("n2", alive=False))), 0, 3)
    assert not failed.starts and [s.host for s in failed.stops] == ["n2"]


def test_omni_blocked_on_a_full_host_names_it() -> None:
    p = run([host("n1"), host("n2", mem=100)], [want(omni=True, mem=256)])
    assert placed(p) == [("a", "n1")]
    [b] = p.blocked
    assert b.count == 1 and b.reasons[0] == "1 host without 256 MB free"
    assert "host n2: 100 MB free, needs 256 MB" in b.reasons


def test_omni_that_fits_no_host_says_why() -> None:
    [b] = run([host("n1")], [want(omni=True, disk="ssd")]).blocked
    assert (b.count, b.reasons[0]) == (0, "no host with tag disk=ssd")


def test_release_change_deploys_all_at_once() -> None:
    p = run([host("n1"), host("n2")], [want(count=2, release="r2")], [job("j1"), job("j2", "n2")])
    assert sorted(s.job_id for s in p.stops) == ["j1", "j2"]
    assert [s.release for s in p.starts] == ["r2", "r2"]


def test_memory_of_stopping_jobs_is_not_reused_until_they_are_down() -> None:
    full = [host("n1", mem=512)]
    p = run(full, [want(release="r2", mem=512)], [job("old", mem=512)])
    assert [s.job_id for s in p.stops] == ["old"] and not p.starts
    assert p.blocked[0].reasons[0] == "no host with 512 MB free"
    down = run(full, [want(release="r2", mem=512)], [job("old", mem=512, state="down")])
    assert placed(down) == [("a", "n1")]


def test_job_ids_are_replayable_unique_and_never_reused() -> None:
    hosts, desired = [host("n1"), host("n2")], [want(count=3), want("b", count=2)]
    p = run(hosts, desired, seed=42)
    assert p == run(hosts, desired, seed=42)
    ids = [s.job_id for s in p.starts]
    assert len(set(ids)) == 5 and all(i.startswith("web-") for i in ids)
    assert new_job_id(42, "a", "web", 0) in ids
    assert not set(ids) & {s.job_id for s in run(hosts, desired, seed=43).starts}
    taken = new_job_id(42, "a", "web", 0)
    again = run(hosts, [want(count=2)], [job(taken, state="down")], seed=42)
    assert taken not in {s.job_id for s in again.starts} and len(again.starts) == 2


def test_held_group_is_reported_not_touched() -> None:
    held = dataclasses.replace(
        want(count=2, release="r9"), hold="release r9 has not reached this node yet"
    )
    p = run([host("n1")], [held], [job("j1")])
    assert p.empty
    assert p.blocked == (Blocked("a", "web", 2, ("release r9 has not reached this node yet",)),)


def test_one_off_is_placed_once_under_its_id_and_explained_when_blocked() -> None:
    reqs = (OneOff("run-1", "a", "r1", "web", 256), OneOff("run-2", "a", "r1", "web", 9999))
    inputs = Inputs((host("n1"),), (), (), reqs)
    p = plan(inputs, 0, 1)
    assert [(s.job_id, s.host, s.one_off) for s in p.starts] == [("run-1", "n1", True)]
    [b] = p.blocked
    assert (b.job_id, b.count, b.reasons[0]) == ("run-2", 1, "no host with 9999 MB free")
    after = apply_plan(inputs, p)
    assert plan(after, 0, 2).empty
    crashed = dataclasses.replace(after, jobs=(job("run-1", state="crashed", one_off=True),))
    assert plan(crashed, 0, 3).empty  # never restarted


def test_restarts_are_timed_and_tell_the_leader_when_to_wake() -> None:
    jobs = [
        job("j1", state="crashed", restarts=0, exited_at=1_000),
        job("j2", "n1", state="crashed", restarts=2, exited_at=1_000),
    ]
    p = run([host("n1")], [want(count=2)], jobs, now=2_000)
    assert [(r.job_id, r.at_ms) for r in p.restarts_at] == [("j1", 1_000), ("j2", 31_000)]
    assert p.restarts_due(2_000) == (p.restarts_at[0],)
    assert p.next_restart_ms(2_000) == 31_000
    assert p.next_restart_ms(31_000) is None
    assert isinstance(p.restarts_at[0], Restart)


def test_plan_never_overcommits_a_busy_host() -> None:
    inputs = Inputs(
        (host("n1", mem=1000),), (want(count=10, mem=300),), (job("x", app="b", mem=150),)
    )
    p = plan(inputs, 0, 1)
    assert len(p.starts) == 2
    assert used_mb(apply_plan(inputs, p))["n1"] <= 1000


def test_the_first_job_of_a_release_goes_where_its_slug_is_and_web_still_spreads() -> None:
    hosts = [host("n1"), host("n2"), host("n3")]
    others = [job("o1", host="n2", app="b"), job("o2", host="n2", app="b")]
    for seed in range(20):  # whatever the tie-break draws
        slugged = dataclasses.replace(want(count=1), slug_hosts=frozenset({"n2"}))
        assert [s.host for s in run(hosts, [slugged], others, seed=seed).starts] == ["n2"]
        # web=3: one per host, the slug's host among them (spreading wins over the slug).
        three = dataclasses.replace(want(count=3), slug_hosts=frozenset({"n2"}))
        assert sorted(s.host for s in run(hosts, [three], others, seed=seed).starts) == [
            "n1", "n2", "n3",
        ]  # fmt: skip
        # Of two holders, the one that built (and unpacked) it, whatever the draw.
        built = dataclasses.replace(
            want(count=1), slug_hosts=frozenset({"n1", "n3"}), slug_built_on="n3"
        )
        assert [s.host for s in run(hosts, [built], others, seed=seed).starts] == ["n3"]
    # Without a slug anywhere, the least loaded hosts first, as before.
    assert [s.host for s in run(hosts, [want(count=1)], others, seed=3).starts] != ["n2"]
