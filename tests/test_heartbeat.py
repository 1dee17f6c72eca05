"""The heartbeat tracker (flynnp2p/gossip/heartbeat.py), and `lost` jobs in the API.

Unit tests of the pure `LastHeard`, component tests of `Heartbeats` with trio's
`MockClock(autojump_threshold=0)` and a fake prober whose members answer at once,
refuse, or hang (virtual times are exact), and a unit test of `jobs_of`.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
import trio.testing

from flynnp2p.api.jobs import jobs_of
from flynnp2p.gossip.heartbeat import Heartbeats, HeartbeatSettings, LastHeard
from flynnp2p.state.records import App, Job, Placement
from tests.test_scheduler_model import state_of


def test_last_heard_tracks_members_with_a_grace_period() -> None:
    heard = LastHeard(unresponsive_after_s=2.0)
    heard.track(["a", "b"], now=10.0)
    assert heard.unresponsive(12.0) == {}  # exactly the limit is not over it
    heard.heard_from("a", 11.0)
    assert heard.unresponsive(12.5) == {"b": 2.5}
    heard.heard_from("a", 10.5)  # a late answer does not move time back
    assert heard.unresponsive(13.5) == {"a": 2.5, "b": 3.5}
    heard.track(["a", "c"], now=14.0)  # b dropped (serf gave up on it); c is new
    assert heard.unresponsive(14.0) == {"a": 3.0}
    heard.heard_from("b", 14.0)  # not tracked: ignored
    assert set(heard.heard) == {"a", "c"}
    heard.track(["a", "b", "c"], now=20.0)  # b back: a fresh grace period
    assert heard.unresponsive(21.0) == {"a": 10.0, "c": 7.0}


@dataclass(frozen=True)
class Member:
    name: str
    api: str


class FakeNodes:
    """Probes of `name:7100`: answered at once, refused, or never answered."""

    def __init__(self, *names: str) -> None:
        self.members = [Member(n, f"{n}:7100") for n in names]
        self.refusing: set[str] = set()
        self.hanging: set[str] = set()
        self.probes: dict[str, int] = {}

    def alive(self) -> list[Member]:
        return list(self.members)

    async def probe(self, api: str) -> bool:
        name = api.split(":")[0]
        self.probes[name] = self.probes.get(name, 0) + 1
        if name in self.hanging:
            await trio.sleep_forever()
        return name not in self.refusing


SETTINGS = HeartbeatSettings(interval_s=0.5, timeout_s=0.4, unresponsive_after_s=2.0)


async def start(nursery: trio.Nursery, nodes: FakeNodes) -> Heartbeats:
    beats = Heartbeats(nodes.alive, nodes.probe, SETTINGS)
    await nursery.start(beats.run)
    return beats


async def test_a_node_that_stops_answering_is_unresponsive_after_the_limit(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = FakeNodes("a", "b")
    t0 = trio.current_time()
    beats = await start(nursery, nodes)
    await trio.sleep_until(t0 + 10.0)
    assert beats.unresponsive() == {}

    await trio.sleep_until(t0 + 10.1)
    nodes.refusing.add("b")  # last answered in the round of t0 + 10.0
    await trio.sleep_until(t0 + 12.0)
    assert beats.unresponsive() == {}
    await trio.sleep_until(t0 + 12.01)
    assert set(beats.unresponsive()) == {"b"}
    assert abs(beats.unresponsive()["b"] - 2.01) < 1e-6

    nodes.refusing.clear()  # answers again in the round of t0 + 12.5
    await trio.sleep_until(t0 + 12.5001)
    assert beats.unresponsive() == {}


async def test_a_hanging_node_does_not_slow_the_beat_for_the_others(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = FakeNodes("a", "b")
    nodes.hanging.add("b")
    t0 = trio.current_time()
    beats = await start(nursery, nodes)
    await trio.sleep_until(t0 + 2.0)
    assert beats.unresponsive() == {}  # the grace period: tracked at t0
    await trio.sleep_until(t0 + 2.01)
    assert set(beats.unresponsive()) == {"b"}
    await trio.sleep_until(t0 + 10.01)
    assert set(beats.unresponsive()) == {"b"}
    # Rounds at t0, t0+0.5, …, t0+10.0, although every probe of b hit its deadline.
    assert nodes.probes == {"a": 21, "b": 21}


async def test_members_come_and_go_with_serfs_view(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = FakeNodes("a")
    t0 = trio.current_time()
    beats = await start(nursery, nodes)
    await trio.sleep_until(t0 + 5.25)
    nodes.members.append(Member("late", "late:7100"))
    nodes.refusing.add("late")  # joins (tracked at t0 + 5.5) but never answers
    await trio.sleep_until(t0 + 7.5)
    assert beats.unresponsive() == {}
    await trio.sleep_until(t0 + 7.51)
    assert set(beats.unresponsive()) == {"late"}

    nodes.members.pop()  # serf marks it failed: serf's verdict takes over
    await trio.sleep_until(t0 + 8.0001)
    assert beats.unresponsive() == {}


# -- what the jobs API makes of it (flynnp2p.api.jobs.jobs_of) -----------------------------


def test_jobs_of_a_lost_host_show_lost_unless_they_are_stopping_or_finished() -> None:
    app = App(id="app1", name="shop", created_at=1)

    def report(id: str, host: str, state: str) -> Job:
        return Job(id, "app1", "r1", "web", host, state, 1, 5)

    state = state_of(
        app,
        report("j-up", "n1", "up"), report("j-starting", "n1", "starting"),
        report("j-crashed", "n1", "crashed"), report("j-other", "n2", "up"),
        Placement("j-pending", "app1", "r1", "web", "n1", "start", 1, 7),
        report("j-stop", "n1", "up"), Placement("j-stop", "app1", "r1", "web", "n1", "stop", 1, 7),
    )  # fmt: skip
    lost = {"n1": "host n1 has not answered for 2.5s"}
    rows = {r["id"]: r for r in jobs_of(state, app, True, {"n1", "n2"}, lost)}
    assert {i: r["state"] for i, r in rows.items()} == {
        "j-up": "lost", "j-starting": "lost", "j-pending": "lost", "j-crashed": "crashed",
        "j-other": "up", "j-stop": "stopping",
    }  # fmt: skip
    assert rows["j-up"]["reason"] == lost["n1"] and rows["j-other"]["reason"] is None
    unchanged = {r["id"]: r["state"] for r in jobs_of(state, app, True, {"n1", "n2"})}
    assert unchanged["j-up"] == "up" and unchanged["j-pending"] == "pending"
