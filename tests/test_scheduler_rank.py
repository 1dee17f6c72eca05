"""Rank: spread by app/type, then load, then free memory, then a seeded tie-break."""

from __future__ import annotations

import pytest

from flynnp2p.scheduler.rank import Spread, rank_hosts, score, tiebreaks

HOSTS = ["a", "b", "c"]
EVEN = {"a": 0.5, "b": 0.5, "c": 0.5}  # ties broken by name in these tables


@pytest.mark.parametrize(
    ("group", "load", "free", "best_first"),
    [
        ({"a": 1, "b": 0, "c": 2}, {}, {"a": 9, "b": 1, "c": 9}, ["b", "a", "c"]),
        ({}, {"a": 3, "b": 1, "c": 2}, {"a": 9, "b": 1, "c": 9}, ["b", "c", "a"]),
        ({}, {}, {"a": 100, "b": 300, "c": 200}, ["b", "c", "a"]),
        ({"a": 1}, {"b": 5}, {"a": 999, "b": 1, "c": 1}, ["c", "b", "a"]),
        ({}, {}, {"a": 1, "b": 1, "c": 1}, ["a", "b", "c"]),
    ],
    ids=["app/type spread first", "then load", "then free memory", "in that order", "ties"],
)
def test_rank_order(group: dict, load: dict, free: dict, best_first: list) -> None:
    assert rank_hosts(HOSTS, group, load, free, EVEN) == best_first


def test_tiebreak_is_replayable_and_depends_on_the_seed() -> None:
    names = [f"n{i}" for i in range(20)]
    assert tiebreaks(names, 7) == tiebreaks(reversed(names), 7)
    assert tiebreaks(names, 7) != tiebreaks(names, 8)


def test_tiebreak_decides_between_equal_hosts() -> None:
    free = dict.fromkeys(HOSTS, 1)
    picks = {rank_hosts(HOSTS, {}, {}, free, tiebreaks(HOSTS, seed))[0] for seed in range(30)}
    assert picks == set(HOSTS)


def test_spread_pops_best_and_takes_updates() -> None:
    tb = dict.fromkeys(HOSTS, 0.0)
    spread = Spread(score(h, 0, 0, 100, tb[h]) for h in HOSTS)
    first = spread.pop_best()
    assert first == "a"
    spread.push(score("a", 1, 1, 50, 0.0))  # a now holds one of the group
    assert [spread.pop_best() for _ in range(3)] == ["b", "c", "a"]
    assert spread.pop_best() is None and len(spread) == 0


def test_a_host_holding_the_slug_comes_first_once_the_group_is_spread() -> None:
    free = dict.fromkeys(HOSTS, 9)
    # Before load: c runs more jobs, but it has the slug.
    assert rank_hosts(HOSTS, {}, {"c": 4}, free, EVEN, has_slug={"c"}) == ["c", "a", "b"]
    # Never before spreading: c runs one of the group already, a and b none.
    assert rank_hosts(HOSTS, {"c": 1}, {}, free, EVEN, has_slug={"c"}) == ["a", "b", "c"]
    # Between holders, load and memory decide as before.
    assert rank_hosts(HOSTS, {}, {"b": 1}, free, EVEN, has_slug={"b", "c"}) == ["c", "b", "a"]


def test_the_host_that_built_the_slug_comes_before_one_that_only_stores_it() -> None:
    free = dict.fromkeys(HOSTS, 9)
    # b built it (and unpacked it), c stores the second copy: b first, whatever c's load.
    assert rank_hosts(HOSTS, {}, {"b": 3}, free, EVEN, has_slug={"b", "c"}, built_on="b") == [
        "b", "c", "a",
    ]  # fmt: skip
    # Never before spreading: b runs one of the group already.
    assert rank_hosts(HOSTS, {"b": 1}, {}, free, EVEN, has_slug={"b", "c"}, built_on="b") == [
        "c", "a", "b",
    ]  # fmt: skip
