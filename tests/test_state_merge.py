"""The CRDT core: HLC, last-writer-wins, version vectors, deltas, tombstone GC.

Unit examples first, then Hypothesis properties: `merge` is a join (commutative,
associative, idempotent), and a simulated cluster with a lossy, duplicating,
reordering network converges after a `delta_since` resync, without ever
resurrecting a deleted key, tombstone collection included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flynnp2p.state.errors import StaleReplicaError
from flynnp2p.state.hlc import Hlc, HlcClock, drift_ms
from flynnp2p.state.merge import (
    Delete,
    Delta,
    Entry,
    State,
    apply_delta,
    apply_entries,
    collect_tombstones,
    collectable,
    delta_of,
    delta_since,
    local_entries,
    merge,
)
from flynnp2p.state.records import App

# ---------------------------------------------------------------- HLC


def test_hlc_now_is_strictly_increasing_even_when_physical_time_goes_back() -> None:
    clock = HlcClock()
    stamps = [clock.now(pt) for pt in (100, 100, 90, 101, 50)]
    assert stamps == [Hlc(100, 0), Hlc(100, 1), Hlc(100, 2), Hlc(101, 0), Hlc(101, 1)]


def test_hlc_update_orders_after_remote() -> None:
    clock = HlcClock(Hlc(100, 3))
    assert clock.update(Hlc(100, 7), physical_ms=99) == Hlc(100, 8)
    assert clock.update(Hlc(200, 2), physical_ms=150) == Hlc(200, 3)
    assert clock.update(Hlc(10, 0), physical_ms=300) == Hlc(300, 0)
    clock.observe(Hlc(5, 0))
    assert clock.last == Hlc(300, 0)
    assert drift_ms(Hlc(1_500, 0), physical_ms=1_000) == 500
    assert drift_ms(Hlc(500, 0), physical_ms=1_000) == 0


def test_hlc_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="wall_ms"):
        Hlc(-1, 0)
    with pytest.raises(ValueError, match="counter"):
        Hlc(0, True)


# ---------------------------------------------------------------- examples


def app(key: str, name: str = "x") -> App:
    return App(id=key, name=name, created_at=0)


def entry(key: str, origin: str, seq: int, wall: int, name: str | None = "x") -> Entry:
    value = None if name is None else app(key, name)
    return Entry("app", key, value, Hlc(wall, 0), origin, seq)


def test_last_writer_wins_on_hlc_then_origin() -> None:
    s, applied = apply_entries(
        State(), [entry("k", "a", 1, 10, "old"), entry("k", "b", 1, 20, "new")]
    )
    assert s.record(App, "k") == app("k", "new")
    assert applied == [entry("k", "b", 1, 20, "new")]  # a/1 was beaten within the batch
    s, applied = apply_entries(s, [entry("k", "c", 1, 20, "tie")])  # same hlc: origin c > b
    assert s.record(App, "k") == app("k", "tie") and len(applied) == 1
    s, applied = apply_entries(s, [entry("k", "a", 2, 20, "lower-origin")])
    assert s.record(App, "k") == app("k", "tie") and applied == []
    s, _ = apply_entries(s, [entry("k", "a", 3, 30, None)])
    assert s.record(App, "k") is None and s.get("app", "k") is not None  # tombstone kept
    assert s.records(App) == []


def test_vector_advances_only_over_a_contiguous_prefix() -> None:
    s, _ = apply_entries(State(), [entry("k1", "a", 1, 1), entry("k2", "a", 3, 3)])
    assert s.vv == {"a": 1}  # a/2 unseen: a/3 is applied but not claimed
    assert s.record(App, "k2") is not None
    s, _ = apply_entries(s, [entry("k9", "a", 2, 2)])
    assert s.vv == {"a": 2}  # the gap is filled, but a/3 arrived out of order: not re-claimed
    # a/2 is skipped as covered when it comes again, even if it would win
    s2, applied = apply_entries(s, [entry("k9", "a", 2, 2, "changed")])
    assert applied == [] and s2 is s


def test_delta_since_lets_the_vector_pass_overwritten_writes() -> None:
    writer = HlcClock()
    a = State()
    for name in ("v1", "v2", "v3"):  # three writes to one key: only a/3 survives
        a, _ = apply_entries(a, local_entries(a, "a", writer, [app("k", name)], physical_ms=1))
    b, _ = apply_entries(State(), [entry("k", "a", 1, 0, "v1")])
    delta = delta_since(a, b.vv)
    assert [(e.origin, e.seq) for e in delta.entries] == [("a", 3)]
    b, _ = apply_delta(b, delta)
    assert b.vv == {"a": 3} and b == a


def test_incomplete_delta_does_not_claim_the_vector() -> None:
    clock = HlcClock()
    a = State()
    a, _ = apply_entries(a, local_entries(a, "a", clock, [app("k1"), app("k2")], physical_ms=1))
    push = delta_of(a, [e for e in a.entries() if e.key == "k2"])  # a/2 only
    b, _ = apply_delta(State(), push)
    assert b.vv == {} and b.record(App, "k2") is not None


def test_delta_of_drops_entries_no_longer_in_the_map() -> None:
    clock = HlcClock()
    a = State()
    first = local_entries(a, "a", clock, [app("k", "v1")], physical_ms=1)
    a, _ = apply_entries(a, first)
    a, _ = apply_entries(a, local_entries(a, "a", clock, [Delete("app", "k")], physical_ms=2))
    assert delta_of(a, first).entries == ()


def test_stale_delta_after_gc_is_ignored_and_stale_replica_detected() -> None:
    clock = HlcClock()
    a = State()
    a, _ = apply_entries(a, local_entries(a, "a", clock, [app("k")], physical_ms=1))
    old_push = delta_of(a, a.entries())  # cut before the delete
    laggard = a
    a, _ = apply_entries(a, local_entries(a, "a", clock, [Delete("app", "k")], physical_ms=2))
    assert collectable(a, [{"a": 1}]) == []  # a peer has not seen the delete yet
    a, dropped = collect_tombstones(a, [a.vv])
    assert [e.seq for e in dropped] == [2] and len(a) == 0 and a.horizon == {"a": 2}
    assert apply_delta(a, old_push) == (a, [])  # would resurrect k: ignored
    with pytest.raises(StaleReplicaError):  # the laggard was left out of the collection
        apply_delta(laggard, delta_since(a, laggard.vv))
    fresh, _ = apply_delta(State(), delta_since(a, {}))  # an empty replica just adopts
    assert fresh == a


def test_late_push_of_a_concurrent_losing_write_cannot_resurrect_a_collected_key() -> None:
    a, b, c = (Replica(n) for n in "abc")
    a.state, (w,) = apply_entries(a.state, local_entries(a.state, "a", a.clock, [app("k")], 0))
    late = delta_of(a.state, [w])  # a's push to c, delayed in the network
    a_b = local_entries(b.state, "b", b.clock, [Delete("app", "k")], 5)  # beats w, concurrent
    b.state, _ = apply_entries(b.state, a_b)
    a.receive(delta_since(b.state, a.state.vv))
    c.receive(delta_since(b.state, c.state.vv))
    assert c.state.vv == {"b": 1}  # c never saw w, and every vector covers the tombstone
    c.state, dropped = collect_tombstones(c.state, [r.state.vv for r in (a, b, c)])
    assert dropped == a_b
    c.receive(late)  # the skip rule cannot help (c does not cover w): the horizon must
    assert c.state.record(App, "k") is None


# ---------------------------------------------------------------- merge is a join

ORIGINS = ("a", "b", "c")
KEYS = ("k0", "k1", "k2")


@st.composite
def write_pools(draw: st.DrawFn) -> list[Entry]:
    """Writes with unique (origin, seq) and per-origin increasing hlc, as real origins make."""
    pool = []
    for origin in ORIGINS:
        clock = HlcClock()
        for seq in range(1, draw(st.integers(0, 6)) + 1):
            hlc = clock.now(draw(st.integers(0, 4)))
            key = draw(st.sampled_from(KEYS))
            name = draw(st.sampled_from([None, "x", "y"]))
            pool.append(
                Entry("app", key, None if name is None else app(key, name), hlc, origin, seq)
            )
    return pool


def vectors() -> st.SearchStrategy[dict[str, int]]:
    return st.dictionaries(st.sampled_from(ORIGINS), st.integers(1, 6), max_size=3)


@st.composite
def states(draw: st.DrawFn, pool: list[Entry]) -> State:
    subset = draw(st.lists(st.sampled_from(pool), max_size=len(pool))) if pool else []
    tables: dict[str, dict[str, Entry]] = {}
    for e in subset:
        current = tables.setdefault(e.kind, {}).get(e.key)
        if current is None or current.rank < e.rank:
            tables[e.kind][e.key] = e
    return State(tables, draw(vectors()), draw(vectors()))


@st.composite
def three_states(draw: st.DrawFn) -> tuple[State, State, State]:
    pool = draw(write_pools())
    return draw(states(pool)), draw(states(pool)), draw(states(pool))


@given(three_states())
def test_merge_is_commutative_associative_idempotent(abc: tuple[State, State, State]) -> None:
    a, b, c = abc
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a
    assert merge(merge(a, b), b) == merge(a, b)


# ---------------------------------------------------------------- simulated cluster


@dataclass
class Replica:
    name: str
    state: State = field(default_factory=State)
    clock: HlcClock = field(default_factory=HlcClock)

    def receive(self, delta: Delta) -> None:
        for e in delta.entries:
            self.clock.observe(e.hlc)
        self.state, _ = apply_delta(self.state, delta)


@dataclass
class Cluster:
    replicas: dict[str, Replica]
    # (destination, payload): a Delta, or a pull request carrying the requester's vector
    network: list[tuple[str, Delta | tuple[str, dict[str, int]]]] = field(default_factory=list)
    written: list[Entry] = field(default_factory=list)

    def write(self, r: str, key: str, name: str | None, physical_ms: int) -> None:
        rep = self.replicas[r]
        change = Delete("app", key) if name is None else app(key, name)
        entries = local_entries(rep.state, r, rep.clock, [change], physical_ms)
        rep.state, _ = apply_entries(rep.state, entries)
        self.written += entries

    def deliver(self, i: int, keep: bool) -> None:
        dest, payload = self.network[i] if keep else self.network.pop(i)
        if isinstance(payload, Delta):
            self.replicas[dest].receive(payload)
        else:  # a pull request: answer with a complete delta, sent back over the network
            requester, vv = payload
            self.network.append((requester, delta_since(self.replicas[dest].state, vv)))

    def resync(self) -> None:
        for _ in range(2):
            for src in self.replicas.values():
                for dst in self.replicas.values():
                    if src is not dst:
                        dst.receive(delta_since(src.state, dst.state.vv))

    def winners(self) -> dict[str, Entry]:
        """The oracle: per key, the highest-ranked write ever made."""
        out: dict[str, Entry] = {}
        for e in self.written:
            if e.key not in out or out[e.key].rank < e.rank:
                out[e.key] = e
        return out


def run_cluster(data: st.DataObject, steps: int, gc: bool) -> Cluster:
    cluster = Cluster({name: Replica(name) for name in ORIGINS})
    names = st.sampled_from(ORIGINS)
    for _ in range(steps):
        op = data.draw(st.sampled_from(["write", "push", "pull", "sync", "deliver", "gc"]))
        if op == "write":
            cluster.write(
                data.draw(names),
                data.draw(st.sampled_from(KEYS[:2])),
                data.draw(st.sampled_from([None, "x", "y"])),
                data.draw(st.integers(0, 6)),
            )
        elif op == "push":
            src, dst = data.draw(names), data.draw(names)
            state = cluster.replicas[src].state
            pool = list(state.entries())
            chosen = data.draw(st.lists(st.sampled_from(pool), max_size=3)) if pool else []
            cluster.network.append((dst, delta_of(state, chosen)))
        elif op == "sync":  # a pull whose round trip completes at once
            giver, taker = cluster.replicas[data.draw(names)], cluster.replicas[data.draw(names)]
            taker.receive(delta_since(giver.state, taker.state.vv))
        elif op == "pull":
            requester, src = data.draw(names), data.draw(names)
            cluster.network.append((src, (requester, dict(cluster.replicas[requester].state.vv))))
        elif op == "deliver" and cluster.network:
            i = data.draw(st.integers(0, len(cluster.network) - 1))
            cluster.deliver(i, keep=data.draw(st.booleans()))  # keep: delivered again later
        elif op == "gc" and gc:
            r = cluster.replicas[data.draw(names)]
            r.state, _ = collect_tombstones(
                r.state, [x.state.vv for x in cluster.replicas.values()]
            )
    # Late duplicates of everything still in flight, then a final anti-entropy round.
    for i in range(len(cluster.network)):
        cluster.deliver(i, keep=True)
    cluster.resync()
    return cluster


def live(state: State) -> dict[str, App]:
    return {a.key: a for a in state.records(App)}


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.data())
def test_any_delivery_order_converges_to_the_last_writes(data: st.DataObject) -> None:
    cluster = run_cluster(data, steps=data.draw(st.integers(0, 60)), gc=False)
    winners = cluster.winners()
    expected = {k: e.value for k, e in winners.items() if e.value is not None}
    counts = {o: sum(e.origin == o for e in cluster.written) for o in ORIGINS}
    for rep in cluster.replicas.values():
        assert rep.state == cluster.replicas["a"].state
        assert {e.key: e for e in rep.state.entries()} == winners
        assert live(rep.state) == expected
        assert dict(rep.state.vv) == {o: n for o, n in counts.items() if n}
    # a complete delta against an up-to-date vector is empty
    assert delta_since(cluster.replicas["a"].state, cluster.replicas["b"].state.vv).entries == ()


@PROPERTY
@given(st.data())
def test_tombstone_collection_never_resurrects_a_deleted_key(data: st.DataObject) -> None:
    cluster = run_cluster(data, steps=data.draw(st.integers(0, 80)), gc=True)
    expected = {k: e.value for k, e in cluster.winners().items() if e.value is not None}
    for rep in cluster.replicas.values():
        assert live(rep.state) == expected
        assert rep.state.vv == cluster.replicas["a"].state.vv
    # once every vector covers everything, every tombstone goes, and the states agree
    vecs = [r.state.vv for r in cluster.replicas.values()]
    for rep in cluster.replicas.values():
        rep.state, _ = collect_tombstones(rep.state, vecs)
        assert all(e.value is not None for e in rep.state.entries())
        assert rep.state.tables == cluster.replicas["a"].state.tables


@PROPERTY
@given(st.data())
def test_applying_a_delta_equals_merging_states(data: st.DataObject) -> None:
    cluster = run_cluster(data, steps=data.draw(st.integers(0, 40)), gc=False)
    a, b = cluster.replicas["a"], cluster.replicas["b"]
    # diverge again without syncing, then compare the two ways of combining
    for _ in range(data.draw(st.integers(0, 6))):
        cluster.write(data.draw(st.sampled_from("ab")), data.draw(st.sampled_from(KEYS)), "z", 9)
    via_delta, _ = apply_delta(a.state, delta_since(b.state, a.state.vv))
    assert via_delta == merge(a.state, b.state)
