"""inputs_from_state: formations, releases, jobs and placements as the planner sees them."""

from __future__ import annotations

import dataclasses

from flynnp2p.scheduler import Desired, JobInfo, inputs_from_state, plan
from flynnp2p.state.hlc import HlcClock
from flynnp2p.state.merge import State, apply_entries, local_entries
from flynnp2p.state.records import (
    BUILT_ON,
    Artifact,
    BlobLocation,
    Formation,
    Job,
    Placement,
    ProcessSpec,
    Record,
    Release,
)
from tests.test_scheduler_helpers import host

NOW = 1_000_000


def state_of(*records: Record) -> State:
    entries = local_entries(State(), "node-1", HlcClock(), records, NOW)
    return apply_entries(State(), entries)[0]


RELEASE = Release(
    "r1", "app1", 0,
    processes={
        "web": ProcessSpec("web", memory_mb=256),
        "agent": ProcessSpec("agent", memory_mb=64, omni=True),
    },
)  # fmt: skip


def test_formation_becomes_desired_groups() -> None:
    f = Formation("app1", "r1", 0, processes={"web": 3, "agent": 1}, tags={"disk": "ssd"})
    inputs = inputs_from_state(state_of(RELEASE, f), [host("n1")], NOW)
    assert inputs.desired == (
        Desired("app1", "r1", "agent", 1, 64, True, {"disk": "ssd"}),
        Desired("app1", "r1", "web", 3, 256, False, {"disk": "ssd"}),
    )
    assert inputs.hosts == (host("n1"),)


def test_unknown_release_holds_the_group() -> None:
    f = Formation("app1", "r2", 0, processes={"web": 2})
    [d] = inputs_from_state(state_of(RELEASE, f), [], NOW).desired
    assert d.hold == "release r2 has not reached this node yet"
    p = plan(inputs_from_state(state_of(RELEASE, f), [host("n1")], NOW), NOW, 0)
    assert p.empty and p.blocked[0].reasons == ("release r2 has not reached this node yet",)


def test_type_missing_from_release_holds_unless_scaled_to_zero() -> None:
    f = Formation("app1", "r1", 0, processes={"worker": 1, "gone": 0})
    by_type = {d.type: d for d in inputs_from_state(state_of(RELEASE, f), [], NOW).desired}
    assert by_type["worker"].hold == "release r1 has no process type worker"
    assert by_type["gone"].hold is None and by_type["gone"].count == 0


def job(id: str, state: str, updated: int = 5, restarts: int = 0) -> Job:
    return Job(id, "app1", "r1", "web", "n1", state, 1, updated, restarts=restarts)


def placement(id: str, action: str, one_off: bool = False) -> Placement:
    return Placement(id, "app1", "r1", "web", "n2", action, 1, 7, one_off=one_off)


def test_jobs_merge_job_records_and_placements() -> None:
    s = state_of(
        RELEASE,
        job("up", "up"),
        job("crashed", "crashed", updated=900, restarts=2),
        job("ahead", "crashed", updated=NOW + 60_000),  # a host whose clock runs ahead
        job("stopped", "up"), placement("stopped", "stop"),
        job("done", "down"), placement("done", "stop"),
        placement("pending", "start", one_off=True),
        placement("never-ran", "stop"),
    )  # fmt: skip
    jobs = {j.id: j for j in inputs_from_state(s, [], NOW).jobs}
    assert set(jobs) == {"up", "crashed", "ahead", "stopped", "done", "pending"}
    assert jobs["up"] == JobInfo("up", "app1", "r1", "web", "n1", "up", 1, 256)
    assert (jobs["crashed"].exited_at, jobs["crashed"].restarts) == (900, 2)
    assert jobs["ahead"].exited_at == NOW
    assert jobs["stopped"].state == "stopping" and jobs["done"].state == "down"
    assert jobs["pending"] == JobInfo(
        "pending", "app1", "r1", "web", "n2", "starting", 7, 256, one_off=True
    )


def test_job_of_unknown_release_holds_the_default_memory() -> None:
    s = state_of(Job("j", "app1", "r9", "web", "n1", "up", 1, 1))
    assert inputs_from_state(s, [], NOW).jobs[0].memory_mb == 512


def test_a_placed_but_unreported_job_is_not_placed_again() -> None:
    f = Formation("app1", "r1", 0, processes={"web": 1})
    s = state_of(RELEASE, f, placement("pending", "start"))
    assert plan(inputs_from_state(s, [host("n1"), host("n2")], NOW), NOW, 0).empty


def test_effective_state_merges_the_placement_and_the_report() -> None:
    from flynnp2p.state.jobs import effective_state
    from flynnp2p.state.records import Job, Placement

    def p(action: str = "start", generation: int = 0) -> Placement:
        return Placement(id="j", app_id="a", release_id="r", process_type="web", host="h",
                         action=action, epoch=1, created_at=0, generation=generation)  # fmt: skip

    def j(state: str, generation: int = 0) -> Job:
        return Job(id="j", app_id="a", release_id="r", process_type="web", host="h",
                   state=state, created_at=0, updated_at=1, generation=generation)  # fmt: skip

    assert effective_state(None, None) is None
    assert effective_state(p(), None) == "pending"  # placed, not reported
    assert effective_state(p("stop"), None) == "down"  # stopped before it was reported
    assert effective_state(p(), j("up")) == "up"
    assert effective_state(p("stop"), j("up")) == "stopping"
    assert effective_state(p("stop"), j("crashed")) == "down"  # it runs nothing
    assert effective_state(p("stop"), j("down")) == "down"
    assert effective_state(p(generation=1), j("crashed")) == "pending"  # restart ordered
    assert effective_state(p(generation=1), j("crashed", 1)) == "crashed"
    assert effective_state(None, j("up")) == "up"


def test_the_hosts_holding_a_releases_slug_are_in_its_groups() -> None:
    digest = "sha256:" + "ab" * 32
    artifact = Artifact("art1", "slug", f"blob:{digest}", 0, digest=digest, size=10)
    slugged = Release("r3", "app1", 0, artifacts=("art1",), processes={"web": ProcessSpec("web")})
    f = Formation("app1", "r3", 0, processes={"web": 1})
    where = [BlobLocation(digest, n, 10, 0) for n in ("n1", "n3", "gone")]
    other = BlobLocation("sha256:" + "cd" * 32, "n2", 10, 0)
    state = state_of(artifact, slugged, f, *where, other)
    [d] = inputs_from_state(state, [host("n1"), host("n2"), host("n3")], NOW).desired
    assert d.slug_hosts == {"n1", "n3"}  # members only: "gone" is not a host
    assert d.slug_built_on is None  # its meta does not say where it was built
    built = dataclasses.replace(slugged, meta={BUILT_ON: "n3"})
    [d] = inputs_from_state(state_of(artifact, built, f, *where), [host("n1"), host("n3")], NOW).desired
    assert d.slug_built_on == "n3"
    # A builder that no longer holds it (or is not a host) is not where it is unpacked.
    gone = dataclasses.replace(slugged, meta={BUILT_ON: "gone"})
    [d] = inputs_from_state(state_of(artifact, gone, f, *where), [host("n1"), host("n3")], NOW).desired
    assert d.slug_built_on is None
    [d] = inputs_from_state(state_of(RELEASE, Formation("app1", "r1", 0, processes={"web": 1})),
                            [host("n1")], NOW).desired  # fmt: skip
    assert d.slug_hosts == frozenset()  # a release without a slug
