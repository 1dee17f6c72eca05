"""The SQLite replica store: persistence, atomicity, crashes, locking, load speed."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flynnp2p.state.errors import StaleReplicaError, StoreError
from flynnp2p.state.hlc import Hlc
from flynnp2p.state.merge import Delete, Delta, Entry, State, delta_since
from flynnp2p.state.records import App, Job
from flynnp2p.state.store import MemoryStore, SqliteStore, StateStore


def app(i: int, name: str = "app") -> App:
    return App(id=f"app-{i}", name=f"{name}-{i}", created_at=i, meta={"i": str(i)})


def job(i: int, host: str = "node-2") -> Job:
    return Job(
        id=f"job-{i}", app_id="app-1", release_id="rel-1", process_type="web", host=host,
        state="up", created_at=i, updated_at=i, address=f"10.0.0.2:{10000 + i % 50000}",
    )  # fmt: skip


@pytest.fixture
def new_incarnation() -> Callable[[], str]:
    """Predictable incarnations: inc1, inc2, ..."""
    counter = itertools.count(1)
    return lambda: f"inc{next(counter)}"


def peer_delta(count: int, origin: str = "node-2/peer", start: int = 0) -> Delta:
    entries = tuple(
        Entry("job", f"job-{i}", job(i), Hlc(1_000 + i, 0), origin, i + 1)
        for i in range(start, start + count)
    )
    return Delta(entries, {origin: start + count}, {}, complete=True)


def test_memory_store_satisfies_the_protocol() -> None:
    stores: list[StateStore] = [MemoryStore("node-1")]
    assert stores[0].origin.startswith("node-1/")


def test_write_apply_reopen_gives_the_same_state(
    tmp_path: Path, new_incarnation: Callable[[], str]
) -> None:
    with SqliteStore(tmp_path, "node-1", new_incarnation=new_incarnation) as store:
        assert store.origin == "node-1/inc1"
        written = store.write([app(1), app(2), app(3)], physical_ms=100)
        assert [e.seq for e in written] == [1, 2, 3]
        store.write([Delete("app", "app-2"), app(3, "renamed")], physical_ms=100)
        applied = store.apply(peer_delta(5))
        assert len(applied) == 5
        before, hlc = store.state, store.hlc
    assert before.vv == {"node-1/inc1": 5, "node-2/peer": 5}
    assert hlc >= Hlc(1_004, 0)  # observed the peer's clock
    with SqliteStore(tmp_path, "node-1") as again:
        assert again.state == before
        assert again.origin == "node-1/inc1" and again.hlc == hlc
        assert again.state.record(App, "app-2") is None
        assert again.state.record(App, "app-3") == app(3, "renamed")
        assert [e.seq for e in again.write([app(4)], physical_ms=1)] == [6]
        assert again.write([app(5)], physical_ms=1)[0].hlc > hlc  # clock survives restarts


def test_apply_is_atomic_when_the_transaction_fails(tmp_path: Path) -> None:
    class Failing(SqliteStore):
        fail = False

        def _save_meta(self) -> None:  # runs inside the transaction, after the entry rows
            if self.fail:
                raise OSError("disk on fire")
            super()._save_meta()

    with Failing(tmp_path, "node-1") as store:
        store.apply(peer_delta(10))
        before = store.state
        store.fail = True
        with pytest.raises(OSError):
            store.apply(peer_delta(10, start=10))
        with pytest.raises(OSError):
            store.write([app(1)], physical_ms=1)
        assert store.state is before  # memory never saw the failed batches
        store.fail = False
        assert [e.seq for e in store.write([app(1)], physical_ms=1)] == [1]  # seq not burnt
        after = store.state
    with SqliteStore(tmp_path, "node-1") as again:
        assert again.state == after
        assert len(again.state.records(Job)) == 10


CRASHER = textwrap.dedent(
    """
    import os, sys
    from flynnp2p.state.hlc import Hlc
    from flynnp2p.state.merge import Delta, Entry
    from flynnp2p.state.records import Job
    from flynnp2p.state.store import SqliteStore

    def job(i):
        return Job(id=f"job-{i}", app_id="a", release_id="r", process_type="web",
                   host="node-2", state="up", created_at=i, updated_at=i)

    store = SqliteStore(sys.argv[1], "node-1")
    batch = lambda lo, hi: Delta(
        tuple(Entry("job", f"job-{i}", job(i), Hlc(i, 0), "node-2/x", i + 1) for i in range(lo, hi)),
        {"node-2/x": hi}, {}, complete=True)
    store.apply(batch(0, 100))
    # die like a power cut: after the batch's rows are written, before COMMIT runs
    store._db.set_trace_callback(lambda sql: os._exit(7) if sql == "COMMIT" else None)
    store.apply(batch(100, 1000))
    """
)


def test_crash_before_commit_loses_the_whole_batch_and_nothing_else(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path)], env=env, check=False)
    assert proc.returncode == 7
    with SqliteStore(tmp_path, "node-1") as store:
        assert len(store.state) == 100
        assert store.state.vv == {"node-2/x": 100}
        store.apply(peer_delta(0))  # still writable


def test_one_directory_one_process(tmp_path: Path) -> None:
    with SqliteStore(tmp_path, "node-1"), pytest.raises(StoreError, match="in use"):
        SqliteStore(tmp_path, "node-1")
    SqliteStore(tmp_path, "node-1").close()  # the lock went with the first store


def test_unreadable_rows_and_newer_schemas_are_store_errors(tmp_path: Path) -> None:
    with SqliteStore(tmp_path, "node-1") as store:
        store.write([app(1)], physical_ms=1)
        store._db.execute("UPDATE entries SET value = '{\"v\": 99}'")
    with pytest.raises(StoreError, match="unreadable entry app/app-1.*schema version 99"):
        SqliteStore(tmp_path, "node-1")
    with SqliteStore(tmp_path / "other", "node-1") as store:
        store._db.execute("UPDATE meta SET value = '2' WHERE name = 'schema'")
    with pytest.raises(StoreError, match="schema 2"):
        SqliteStore(tmp_path / "other", "node-1")


@pytest.mark.parametrize("persistent", [False, True])
def test_peer_ahead_of_our_own_origin_rotates_the_incarnation(
    tmp_path: Path, persistent: bool, new_incarnation: Callable[[], str]
) -> None:
    store: StateStore = (
        SqliteStore(tmp_path, "node-1", new_incarnation=new_incarnation)
        if persistent
        else MemoryStore("node-1", new_incarnation=new_incarnation)
    )
    store.write([app(1)], physical_ms=1)
    # a peer has seen writes 2..3 of this origin that our disk no longer has (restored backup)
    lost = Entry("app", "app-9", app(9), Hlc(5, 0), "node-1/inc1", 3)
    store.apply(Delta((lost,), {"node-1/inc1": 3}, {}, complete=True))
    assert store.origin == "node-1/inc2"
    assert store.write([app(2)], physical_ms=9)[0].seq == 1  # no sequence number reused
    assert store.state.record(App, "app-9") == app(9)
    store.close()


def test_gc_and_reset_persist(tmp_path: Path, new_incarnation: Callable[[], str]) -> None:
    with SqliteStore(tmp_path, "node-1", new_incarnation=new_incarnation) as store:
        store.write([app(1), app(2)], physical_ms=1)
        store.write([Delete("app", "app-1")], physical_ms=2)
        dropped = store.collect_tombstones([store.state.vv])
        assert [e.key for e in dropped] == ["app-1"]
        state = store.state
    with SqliteStore(tmp_path, "node-1") as store:
        assert store.state == state and store.state.horizon == {"node-1/inc1": 3}
        store.reset()
    with SqliteStore(tmp_path, "node-1") as store:
        assert store.state == State() and store.origin != "node-1/inc1"


def test_stale_replica_must_reset_then_catches_up() -> None:
    source, stale = MemoryStore("node-1"), MemoryStore("node-2")
    source.write([app(1)], physical_ms=1)
    stale.apply(source.delta_since(stale.state.vv))
    source.write([Delete("app", "app-1"), app(2)], physical_ms=2)
    source.collect_tombstones([source.state.vv])  # node-2 was down and left out
    with pytest.raises(StaleReplicaError):
        stale.apply(source.delta_since(stale.state.vv))
    stale.reset()
    stale.apply(source.delta_since(stale.state.vv))
    assert stale.state.tables == source.state.tables


def test_10k_entries_apply_and_reload_speed(tmp_path: Path) -> None:
    delta = peer_delta(10_000)
    with SqliteStore(tmp_path, "node-1") as store:
        t0 = time.perf_counter()
        store.apply(delta)
        t_apply = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(100):
            store.write([job(i, host="node-1")], physical_ms=2_000 + i)
        t_write = (time.perf_counter() - t0) / 100
        t0 = time.perf_counter()
        outgoing = delta_since(store.state, {"node-2/peer": 10_000})
        t_delta = time.perf_counter() - t0
        state = store.state
    t0 = time.perf_counter()
    with SqliteStore(tmp_path, "node-1") as again:
        t_reload = time.perf_counter() - t0
        assert again.state == state
    assert len(outgoing.entries) == 100
    print(
        f"\n10,000 entries: apply in one transaction {t_apply * 1e3:.0f} ms,"
        f" reload {t_reload * 1e3:.0f} ms; single write+commit (10k-entry table)"
        f" {t_write * 1e3:.2f} ms; delta_since scan {t_delta * 1e3:.1f} ms"
    )
