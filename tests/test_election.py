from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flynnp2p.gossip.election import Candidate, elect, parse_candidate

SCHED = frozenset({"scheduler"})


def c(name: str, status: str = "alive", start: int = 0, epoch: int = 0, roles: frozenset[str] = SCHED) -> Candidate:
    return Candidate(name, status, roles, start, epoch)


def test_oldest_alive_scheduler_leads() -> None:
    e = elect([c("b", start=5), c("a", start=7), c("c", start=5)])
    assert e.leader == "b"  # (5, "b") < (5, "c") < (7, "a")
    assert e.quorum and e.alive == 3 and e.electorate == 3


def test_members_without_scheduler_role_never_lead() -> None:
    e = elect([c("a", start=1, roles=frozenset({"host"})), c("b", start=2)])
    assert e.leader == "b"
    e = elect([c("a", roles=frozenset({"host"}))])
    assert e.leader is None and e.quorum
    assert "scheduler role" in e.reason


def test_minority_side_has_no_leader() -> None:
    view = [c("a"), c("b"), c("x", "failed"), c("y", "failed"), c("z", "failed")]
    e = elect(view)
    assert e.leader is None and not e.quorum
    assert e.reason == "no quorum: 2 of 5 known members alive"


def test_exact_half_is_not_a_majority() -> None:
    assert elect([c("a"), c("b", "failed")]).leader is None


def test_left_members_leave_the_electorate() -> None:
    e = elect([c("a", start=9), c("b", "left", start=1), c("c", "left"), c("d", "leaving")])
    assert e.leader == "a" and e.electorate == 1


def test_failed_leader_is_replaced_by_next_oldest() -> None:
    e = elect([c("a", "failed", start=1, epoch=4), c("b", start=2, epoch=4), c("c", start=3, epoch=3)])
    assert e.leader == "b"
    assert e.max_epoch == 4  # a failed member's epoch still counts toward the next term


def test_parse_candidate_tolerates_bad_tags() -> None:
    cand = parse_candidate("n", "alive", {"roles": "scheduler,host", "st": "x", "ep": "12"})
    assert cand.roles == frozenset({"scheduler", "host"})
    assert cand.start_ms == 0 and cand.epoch == 12


statuses = st.sampled_from(["alive", "failed", "left"])
candidates = st.lists(
    st.builds(c, st.text("abcdef", min_size=1, max_size=3), statuses, st.integers(0, 5), st.integers(0, 9)),
    max_size=8,
    unique_by=lambda m: m.name,
)


@given(candidates, st.randoms())
def test_election_is_order_independent(members: list[Candidate], rnd: object) -> None:
    shuffled = list(members)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert elect(members) == elect(shuffled)


@given(candidates)
def test_leader_is_alive_and_has_quorum(members: list[Candidate]) -> None:
    e = elect(members)
    if e.leader is not None:
        leader = next(m for m in members if m.name == e.leader)
        assert leader.status == "alive" and "scheduler" in leader.roles
        assert 2 * e.alive > e.electorate


@given(candidates)
def test_two_disjoint_views_never_both_have_quorum(members: list[Candidate]) -> None:
    """Split the electorate in two sides; each side sees the other as failed."""
    electorate = [m for m in members if m.status != "left"]
    half = len(electorate) // 2
    side_a, side_b = electorate[:half], electorate[half:]

    def view(mine: list[Candidate]) -> list[Candidate]:
        return [c(m.name, "alive" if m in mine else "failed", m.start_ms) for m in electorate]

    assert not (elect(view(side_a)).quorum and elect(view(side_b)).quorum)
