"""The host's converge step (`flynnp2p.host.converge`): every transition, as a table.

Each row is one job "j" on node "n1": its placement, its report, what runs here,
and the actions the step must return. The newest epoch seen is 5 throughout.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flynnp2p.host.converge import (
    NOT_PLACED,
    PLACEMENT_REMOVED,
    STOPPED_BY_SCHEDULER,
    Action,
    Forget,
    HostView,
    Local,
    LocalRun,
    Report,
    Restart,
    Start,
    Stop,
    converge,
    job_report,
    view_of,
)
from flynnp2p.state.jobs import REPORTED, drains, is_fenced, may_follow
from flynnp2p.state.merge import Delete, State
from flynnp2p.state.records import Job, Placement
from tests import states

NOW = 1_000_000
NEWEST = 5


def P(action: str = "start", gen: int = 0, epoch: int = NEWEST, reason: str | None = None,
      one_off: bool = False, id: str = "j", host: str = "n1") -> Placement:  # fmt: skip
    return Placement(id=id, app_id="a", release_id="r", process_type="web", host=host,
                     action=action, epoch=epoch, created_at=0, generation=gen, reason=reason,
                     one_off=one_off)  # fmt: skip


def J(state: str, gen: int = 0, one_off: bool = False, id: str = "j", host: str = "n1",
      address: str | None = None) -> Job:  # fmt: skip
    return Job(id=id, app_id="a", release_id="r", process_type="web", host=host, state=state,
               created_at=0, updated_at=1, generation=gen, one_off=one_off, up_since=None,
               address=address)  # fmt: skip


ADDR = "127.0.0.1:20000"


def WEB(state: str = "up", **kw: object) -> Job:
    """A web job's report: it has an address, so routers may choose it when up."""
    return J(state, address=ADDR, **kw)  # type: ignore[arg-type]


def run(gen: int = 0, stopping: bool = False) -> dict[str, LocalRun]:
    return {"j": LocalRun(gen, stopping)}


def short(a: Action) -> tuple[object, ...]:
    """An action as the table writes it."""
    if isinstance(a, Start):
        return ("start", a.placement.generation)
    if isinstance(a, Stop):
        return ("stop", a.reason, "drain") if a.drain else ("stop", a.reason)
    if isinstance(a, Restart):
        return ("restart", a.generation, "drain") if a.drain else ("restart", a.generation)
    if isinstance(a, Report):
        return ("report", a.job.state, "fenced" if is_fenced(a.job) else a.job.reason)
    return ("forget",)


ADOPTED, BUSY, REMOVED = frozenset({"j"}), frozenset({"j"}), frozenset({"j"})
LEFT = "node n1 left the cluster"
# (why, placement, report, local, removed, expected actions)
ROWS: list[tuple[str, Placement | None, Job | None, Local, frozenset[str], list[tuple[object, ...]]]] = [
    # -- a stop placement
    ("stop: the run stops", P("stop", reason="scaled down to 0"), J("up"), Local(run()), frozenset(),
     [("stop", "scaled down to 0")]),
    ("stop: a run already stopping is not asked again", P("stop", reason="x"), J("stopping"),
     Local(run(stopping=True)), frozenset(), []),
    ("stop: no reason given", P("stop"), J("up"), Local(run()), frozenset(), [("stop", STOPPED_BY_SCHEDULER)]),
    ("stop: a re-adopted job stops", P("stop", reason="x"), J("up"), Local(adopted=ADOPTED), frozenset(),
     [("stop", "x")]),
    ("stop: a re-adopted job with its stop under way", P("stop", reason="x"), J("up"),
     Local(adopted=ADOPTED, busy=BUSY), frozenset(), []),
    ("stop: nothing runs it (lost with a previous agent run): reported down", P("stop", reason="x"),
     J("up"), Local(), frozenset(), [("report", "down", "x")]),
    ("stop: a crashed service job is reported down", P("stop", reason="x"), J("crashed"), Local(),
     frozenset(), [("report", "down", "x")]),
    ("stop: a crashed one-off is finished already", P("stop", reason="x", one_off=True),
     J("crashed", one_off=True), Local(), frozenset(), []),
    ("stop: down already", P("stop", reason="x"), J("down"), Local(), frozenset(), []),
    ("stop: never reported", P("stop", reason="x"), None, Local(), frozenset(), []),
    ("stop: its report under way", P("stop", reason="x"), J("up"), Local(busy=BUSY), frozenset(), []),
    # -- a start placement with a run here
    ("restart ordered: the older generation stops", P(gen=1), J("crashed"), Local(run(0)), frozenset(),
     [("restart", 1)]),
    ("restart ordered, the old run stopping already", P(gen=1), J("stopping"),
     Local(run(0, stopping=True)), frozenset(), []),
    ("running as placed", P(), J("up"), Local(run()), frozenset(), []),
    # -- a start placement, nothing running here
    ("placed: start", P(), None, Local(), frozenset(), [("start", 0)]),
    ("placed by a deposed leader: fenced, reported down", P(epoch=NEWEST - 1), None, Local(),
     frozenset(), [("report", "down", "fenced")]),
    ("a re-adopted job is not fenced", P(epoch=NEWEST - 1), None, Local(adopted=ADOPTED), frozenset(),
     [("start", 0)]),
    ("fenced, its report under way", P(epoch=NEWEST - 1), None, Local(busy=BUSY), frozenset(), []),
    ("placed, a task for it under way", P(), None, Local(busy=BUSY), frozenset(), []),
    ("only an unreported placement is fenced", P(epoch=NEWEST - 1), J("up"), Local(), frozenset(),
     [("start", 0)]),
    *[(f"reported {s}, nothing runs it (this agent restarted): start", P(), J(s), Local(), frozenset(),
       [("start", 0)]) for s in ("pending", "starting", "up", "stopping")],
    ("crashed: the leader decides", P(), J("crashed"), Local(), frozenset(), []),
    ("down: the leader decides", P(), J("down"), Local(), frozenset(), []),
    ("crashed, restart ordered: start the new generation", P(gen=1), J("crashed"), Local(), frozenset(),
     [("start", 1)]),
    ("a fenced one-off placed again: start", P(gen=1, one_off=True), J("down", one_off=True), Local(),
     frozenset(), [("start", 1)]),
    ("a placement older than the report", P(gen=1), J("up", gen=2), Local(), frozenset(), []),
    ("re-adopted but down: nothing claims it, it stops", P(), J("down"), Local(adopted=ADOPTED),
     frozenset(), [("stop", NOT_PLACED)]),
    ("re-adopted and placed: taken over by a run", P(), J("up"), Local(adopted=ADOPTED), frozenset(),
     [("start", 0)]),
    # -- no placement: missing (a replica refilling) or deleted (a tombstone)
    ("missing placement (refilling): the run goes on", None, J("up"), Local(run()), frozenset(), []),
    ("deleted placement: the run stops", None, J("up"), Local(run()), REMOVED, [("stop", PLACEMENT_REMOVED)]),
    ("deleted placement, the run stopping already", None, J("stopping"), Local(run(stopping=True)),
     REMOVED, []),
    ("missing placement (refilling): the record stays", None, J("down"), Local(), frozenset(), []),
    ("deleted placement, nothing runs: the record is forgotten", None, J("down"), Local(), REMOVED,
     [("forget",)]),
    ("deleted placement, the run first", None, J("up"), Local(run()), REMOVED,
     [("stop", PLACEMENT_REMOVED)]),
    ("deleted placement, its forget under way", None, J("down"), Local(busy=BUSY), REMOVED, []),
    ("another node's record is its own", None, J("down", host="n2"), Local(), REMOVED, []),
    # A re-adopted job is handed over once, at boot: unclaimed, it stops even when
    # its placement is merely missing (as the runner always did).
    ("re-adopted, placement missing: it stops", None, None, Local(adopted=ADOPTED), frozenset(),
     [("stop", NOT_PLACED)]),
    ("re-adopted, placement deleted: one action at a time", None, J("up"), Local(adopted=ADOPTED),
     REMOVED, [("stop", NOT_PLACED)]),
    # -- draining: a stop of a job routers may be choosing drains first
    ("stop of an up web job: it drains", P("stop", reason="scaled down"), WEB(), Local(run()),
     frozenset(), [("stop", "scaled down", "drain")]),
    ("stop of an up one-off (with an address): no drain, routers never choose it",
     P("stop", reason="x", one_off=True), WEB(one_off=True), Local(run()), frozenset(), [("stop", "x")]),
    ("stop of an up worker (no address): no drain", P("stop", reason="x"), J("up"), Local(run()),
     frozenset(), [("stop", "x")]),
    ("stop of a web job still starting: no drain, no router chose it yet", P("stop", reason="x"),
     WEB("starting"), Local(run()), frozenset(), [("stop", "x")]),
    ("a second stop during a drain (the stop placement seen again): nothing, the delay goes on",
     P("stop", reason="x"), WEB("stopping"), Local(run(stopping=True)), frozenset(), []),
    ("a second stop during a drain (its placement deleted): nothing, the delay goes on", None,
     WEB("stopping"), Local(run(stopping=True)), REMOVED, []),
    ("restart of an up web job: the old generation drains", P(gen=1), WEB(), Local(run(0)),
     frozenset(), [("restart", 1, "drain")]),
    ("deleted placement of an up web job: it drains", None, WEB(), Local(run()), REMOVED,
     [("stop", PLACEMENT_REMOVED, "drain")]),
    ("stop of a re-adopted up web job: it drains", P("stop", reason="x"), WEB(),
     Local(adopted=ADOPTED), frozenset(), [("stop", "x", "drain")]),
    # -- the agent leaves (SIGTERM/SIGINT): everything stops, web jobs drain
    ("leaving: an up web job drains", P(), WEB(), Local(run(), leaving=LEFT), frozenset(),
     [("stop", LEFT, "drain")]),
    ("leaving: a job draining already is not asked again (the delay is not restarted)",
     P("stop", reason="x"), WEB("stopping"), Local(run(stopping=True), leaving=LEFT), frozenset(), []),
    ("leaving: an up one-off stops without a drain", P(one_off=True), WEB(one_off=True),
     Local(run(), leaving=LEFT), frozenset(), [("stop", LEFT)]),
    ("leaving: a re-adopted web job drains", P(), WEB(), Local(adopted=ADOPTED, leaving=LEFT),
     frozenset(), [("stop", LEFT, "drain")]),
    ("leaving: a placement is not started", P(), None, Local(leaving=LEFT), frozenset(), []),
    ("leaving: nothing else either (no report of a stop placement)", P("stop", reason="x"), J("up"),
     Local(leaving=LEFT), frozenset(), []),
]


@pytest.mark.parametrize(("placement", "report", "local", "removed", "want"),
                         [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])  # fmt: skip
def test_converge(
    placement: Placement | None, report: Job | None, local: Local, removed: frozenset[str],
    want: list[tuple[object, ...]],
) -> None:
    view = HostView(
        "n1", (placement,) if placement else (), {"j": report} if report else {}, removed, NEWEST
    )
    actions = converge(view, local, NOW)
    assert [short(a) for a in actions] == want
    for a in actions:
        if isinstance(a, Report):
            assert may_follow(report, a.job), (report, a.job)
            assert a.job.updated_at == NOW and a.job.host == "n1"


def test_the_fenced_report_names_the_epochs() -> None:
    [a] = converge(HostView("n1", (P(epoch=3),), {}, frozenset(), NEWEST), Local(), NOW)
    assert isinstance(a, Report) and "epoch 3" in (a.job.reason or "") and str(NEWEST) in (a.job.reason or "")


def test_jobs_are_taken_in_id_order() -> None:
    view = HostView("n1", (P(id="b"), P(id="a"), P(id="c", epoch=1)), {}, frozenset(), NEWEST)
    assert [type(a).__name__ for a in converge(view, Local(), NOW)] == ["Start", "Start", "Report"]
    assert [a.placement.id for a in converge(view, Local(), NOW)[:2]] == ["a", "b"]  # type: ignore[union-attr]


def test_a_leaving_agent_drains_every_web_job_at_once() -> None:
    """One step asks every run to stop: each drains in its own task (the delay once)."""
    ps = (P(id="w1"), P(id="w2"), P(id="wk"), P(id="d", action="stop", reason="scaled down"))
    reports = {"w1": WEB(id="w1"), "w2": WEB(id="w2"), "wk": J("up", id="wk"), "d": WEB("stopping", id="d")}
    runs = {"w1": LocalRun(0), "w2": LocalRun(0), "wk": LocalRun(0), "d": LocalRun(0, stopping=True)}
    view = HostView("n1", ps, reports, frozenset(), NEWEST)
    actions = converge(view, Local(runs, leaving=LEFT), NOW)
    assert actions == [Stop("w1", LEFT, True), Stop("w2", LEFT, True), Stop("wk", LEFT, False)]


def state_of(*records: Placement | Job, deleted: tuple[Delete, ...] = ()) -> State:
    return states.state_of(*records, deleted=deleted, now=NOW)


def test_view_of_reads_this_nodes_placements_reports_and_tombstones() -> None:
    state = state_of(
        P(id="mine", epoch=3), P(id="theirs", host="n2", epoch=7), P(id="gone"),
        J("up", id="mine", host="n1"), J("down", id="old", host="n1"), J("up", id="theirs", host="n2"),
        deleted=(Delete(Placement.KIND, "gone"),),
    )
    view = view_of(state, "n1", epoch_floor=4)
    assert [p.id for p in view.placements] == ["mine"]
    assert set(view.reports) == {"mine", "old"}
    assert view.removed == {"gone"}  # "old" has no placement at all: missing, not deleted
    assert view.newest_epoch == 7  # another host's placement counts
    assert view_of(state, "n1", epoch_floor=9).newest_epoch == 9


def test_job_report_keeps_up_since_within_a_generation() -> None:
    previous = dataclasses.replace(J("up"), up_since=500)
    assert job_report(P(), "n1", "crashed", NOW, previous, exit_code=3).up_since == 500
    assert job_report(P(gen=1), "n1", "crashed", NOW, previous).up_since is None
    assert job_report(P(), "n1", "pending", NOW, previous).up_since is None
    report = job_report(P(), "n1", "down", NOW, None, exit_code=-300, reason="x" * 5000)
    assert report.exit_code == -255 and len(report.reason or "") == 4096


# -- properties over arbitrary views ----------------------------------------------

IDS = ("j1", "j2", "j3")
placements = st.builds(
    P, action=st.sampled_from(["start", "stop"]), gen=st.integers(0, 2), epoch=st.integers(3, 6),
    one_off=st.booleans(), id=st.sampled_from(IDS), host=st.sampled_from(["n1", "n2"]),
)  # fmt: skip
reports = st.builds(
    J, state=st.sampled_from(REPORTED), gen=st.integers(0, 2), one_off=st.booleans(),
    id=st.sampled_from(IDS), host=st.sampled_from(["n1", "n2"]), address=st.none() | st.just(ADDR),
)  # fmt: skip
locals_ = st.builds(
    Local,
    runs=st.dictionaries(st.sampled_from(IDS), st.builds(LocalRun, st.integers(0, 2), st.booleans())),
    adopted=st.frozensets(st.sampled_from(IDS)),
    busy=st.frozensets(st.sampled_from(IDS)),
    leaving=st.none() | st.just(LEFT),
)


@given(st.lists(placements, unique_by=lambda p: p.id), st.lists(reports, unique_by=lambda j: j.id),
       locals_, st.frozensets(st.sampled_from(IDS)))  # fmt: skip
def test_converge_properties(
    ps: list[Placement], js: list[Job], local: Local, removed: frozenset[str]
) -> None:
    mine = tuple(p for p in ps if p.host == "n1")
    removed -= {p.id for p in ps}  # a key is a placement or a tombstone, not both
    view = HostView("n1", mine, {j.id: j for j in js}, removed, NEWEST)
    actions = converge(view, local, NOW)
    assert actions == converge(view, local, NOW)  # the same inputs, the same actions
    ids = [a.placement.id if isinstance(a, Start) else a.job.id if isinstance(a, Report) else a.job_id
           for a in actions]  # fmt: skip
    assert len(ids) == len(set(ids))  # at most one action per job
    placed = {p.id for p in mine}
    for job_id, a in zip(ids, actions, strict=True):
        run = local.runs.get(job_id)
        if local.leaving is not None:  # a node that leaves only stops
            assert isinstance(a, Stop) and a.reason == local.leaving
        if isinstance(a, Stop | Restart):  # drains exactly what routers may be choosing
            assert a.drain == drains(view.reports.get(job_id))
        if isinstance(a, Stop | Restart) and run is not None:
            assert not run.stopping  # never asked twice
            if local.leaving is None:
                assert job_id in placed or job_id in removed  # a missing placement stops nothing
        else:
            assert job_id not in local.busy  # nothing while its bookkeeping is under way
        if isinstance(a, Start):
            assert run is None and a.placement.action == "start"
        if isinstance(a, Report):
            assert may_follow(view.reports.get(job_id), a.job)
        if isinstance(a, Forget):
            assert job_id in removed and run is None
