"""The gossip ring's leadership hints (the decision itself is etcd's)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flynnp2p.gossip.election import TagView, leader_hint, max_epoch, parse_tags


def test_tags_parse_and_malformed_ones_count_as_zero() -> None:
    assert parse_tags("a", "alive", {"ep": "7", "ld": "7"}) == TagView("a", "alive", 7, 7)
    assert parse_tags("a", "alive", {"ep": "x", "ld": "-3"}) == TagView("a", "alive", 0, 0)
    assert parse_tags("a", "failed", {}) == TagView("a", "failed", 0, 0)


def test_the_hint_is_the_alive_member_announcing_the_newest_term() -> None:
    views = [TagView("a", "alive", 9, 5), TagView("b", "alive", 9, 9), TagView("c", "alive", 9, 0)]
    hint = leader_hint(views)
    assert hint is not None and hint.name == "b"


def test_a_failed_member_is_never_the_hint() -> None:
    views = [TagView("a", "failed", 9, 9), TagView("b", "alive", 9, 0)]
    assert leader_hint(views) is None


def test_max_epoch_counts_failed_members_too() -> None:
    assert max_epoch([TagView("a", "failed", 12, 0), TagView("b", "alive", 3, 4)]) == 12
    assert max_epoch([]) == 0


@given(st.lists(st.tuples(st.sampled_from(["alive", "failed", "left"]), st.integers(0, 50), st.integers(0, 50))))
def test_max_epoch_bounds_every_announced_epoch(rows: list[tuple[str, int, int]]) -> None:
    views = [TagView(f"n{i}", s, e, ld) for i, (s, e, ld) in enumerate(rows)]
    top = max_epoch(views)
    assert all(v.epoch <= top and v.leading <= top for v in views)
    hint = leader_hint(views)
    assert hint is None or (hint.status == "alive" and hint.leading > 0)
