"""Feasibility: every filtered host says why; blocked groups get a readable explanation."""

from __future__ import annotations

import pytest

from flynnp2p.scheduler.feasible import (
    MAX_HOST_REASONS,
    Filtered,
    check_host,
    check_memory,
    eligible,
    explain,
)
from tests.test_scheduler_helpers import host


@pytest.mark.parametrize(
    ("h", "constraints", "reason"),
    [
        (host("n1"), {}, None),
        (host("n3", alive=False), {}, "host n3: not alive"),
        (host("n3", alive=False, disk="hdd"), {"disk": "ssd"}, "host n3: not alive"),
        (host("n2"), {"disk": "ssd"}, "host n2: lacks tag disk=ssd"),
        (host("n2", disk="hdd"), {"disk": "ssd"}, "host n2: lacks tag disk=ssd"),
        (
            host("n2", disk="ssd", zone="a"),
            {"disk": "ssd", "zone": "b"},
            "host n2: lacks tag zone=b",
        ),
        (host("n2", disk="ssd", zone="b"), {"disk": "ssd", "zone": "b"}, None),
        (host("n2", extra="x"), {}, None),
    ],
)
def test_check_host(h: object, constraints: dict, reason: str | None) -> None:
    why = check_host(h, constraints)  # type: ignore[arg-type]
    assert (None if why is None else str(why)) == reason


@pytest.mark.parametrize(
    ("free", "need", "reason"),
    [
        (512, 512, None),
        (4096, 512, None),
        (200, 512, "host n1: 200 MB free, needs 512 MB"),
        (-100, 512, "host n1: 0 MB free, needs 512 MB"),
    ],
)
def test_check_memory(free: int, need: int, reason: str | None) -> None:
    why = check_memory("n1", free, need)
    assert (None if why is None else str(why)) == reason


def test_eligible_splits_in_host_order() -> None:
    el = eligible([host("a", disk="ssd"), host("b"), host("c", alive=False)], {"disk": "ssd"})
    assert el.hosts == ("a",)
    assert [str(f) for f in el.filtered] == ["host b: lacks tag disk=ssd", "host c: not alive"]


DEAD = Filtered("n3", "alive", "not alive")
NOTAG = Filtered("n2", "tag", "lacks tag disk=ssd")
SHORT = Filtered("n1", "memory", "200 MB free, needs 512 MB")


@pytest.mark.parametrize(
    ("filtered", "constraints", "expected"),
    [
        ([], {}, ("no hosts in the cluster",)),
        ([DEAD], {}, ("no alive host", "1 host filtered: 1 not alive", "host n3: not alive")),
        (
            [DEAD, NOTAG],
            {"disk": "ssd"},
            (
                "no host with tag disk=ssd",
                "2 hosts filtered: 1 not alive, 1 lacking a required tag",
                "host n2: lacks tag disk=ssd",
                "host n3: not alive",
            ),
        ),
        (
            [NOTAG, SHORT],
            {"disk": "ssd", "zone": "a"},
            (
                "no host with 512 MB free",
                "2 hosts filtered: 1 lacking a required tag, 1 short of memory",
                "host n1: 200 MB free, needs 512 MB",
                "host n2: lacks tag disk=ssd",
            ),
        ),
    ],
)
def test_explain(filtered: list, constraints: dict, expected: tuple) -> None:
    assert explain(constraints, 512, filtered) == expected


def test_explain_names_every_required_tag() -> None:
    reasons = explain({"zone": "a", "disk": "ssd"}, 512, [NOTAG])
    assert reasons[0] == "no host with tags disk=ssd, zone=a"


def test_explain_takes_a_headline() -> None:
    assert (
        explain({}, 512, [SHORT], "1 host without 512 MB free")[0] == "1 host without 512 MB free"
    )


def test_explain_caps_per_host_lines_but_counts_every_host() -> None:
    many = [Filtered(f"n{i:02d}", "alive", "not alive") for i in range(25)]
    reasons = explain({}, 512, many)
    assert reasons[1] == "25 hosts filtered: 25 not alive"
    assert len(reasons) == 2 + MAX_HOST_REASONS + 1
    assert reasons[-1] == f"... and {25 - MAX_HOST_REASONS} more hosts"
