"""What a user (or a peer) sends cannot crash the state or fork it: unit tests of
the schema's string checks, the store on a full disk and with values stored by
older versions, and component tests of the state service (MemoryStore, fakes)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
import trio.testing

from flynnp2p.errors import ClusterError, InsufficientStorage
from flynnp2p.peering import Peer
from flynnp2p.state.errors import RecordError, StoreFullError
from flynnp2p.state.merge import Change, Entry
from flynnp2p.state.records import App, RunRequest
from flynnp2p.state.schema import FrozenMap
from flynnp2p.state.service import PROBE_INTERVAL_S, StateService
from flynnp2p.state.store import MemoryStore, SqliteStore
from flynnp2p.state.wire import open_envelope, pack, unencodable
from tests.harness import wait_for
from tests.test_api_apps import Peers as NoPeers

T0 = 1_700_000_000_000


class Peers(NoPeers):
    def electorate(self) -> list[str]:
        return [p.name for p in self.alive]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps once every task has been idle 10 ms of real time
    (the store's worker threads would race a zero threshold)."""
    return trio.testing.MockClock(autojump_threshold=0.01)


def app(name: str = "web", **meta: str) -> App:
    return App(id=f"id-{name}", name=name, created_at=T0, meta=meta)


def poisoned(record: App) -> App:
    """An App holding a lone surrogate, as the schema no longer lets one be built."""
    object.__setattr__(record, "meta", FrozenMap({"k": "\udfff"}))
    return record


# -- the schema --------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "field", "what"),
    [
        ({"k": "\udfff"}, "app.meta.k", "U+DFFF"),
        ({"k": "ok\ud800x"}, "app.meta.k", "U+D800 at index 2"),
        ({"k\udc00": "v"}, "app.meta key", "U+DC00"),
        ({"k": "a\x00b"}, "app.meta.k", "NUL at index 1"),
    ],
)
def test_strings_with_lone_surrogates_or_nul_are_refused_naming_the_field(
    meta: dict[str, str], field: str, what: str
) -> None:
    with pytest.raises(RecordError) as info:
        App(id="a1", name="web", created_at=T0, meta=meta)
    assert info.value.field == field
    assert what in str(info.value) and "valid Unicode" in str(info.value)


def test_run_args_with_a_surrogate_are_refused() -> None:
    with pytest.raises(RecordError) as info:
        RunRequest.from_wire(
            {"v": 1, "id": "r1", "app_id": "a1", "release_id": "x",
             "args": ["ok", "\udfff"], "created_at": T0}
        )  # fmt: skip
    assert "U+DFFF" in str(info.value)


def test_any_valid_unicode_is_still_accepted() -> None:
    record = app(k="héllo wörld ✓ 𝄞")
    assert record.meta["k"] == "héllo wörld ✓ 𝄞"
    assert unencodable([record]) is None


def test_a_record_peers_cannot_decode_is_found_before_it_commits() -> None:
    error = unencodable([app("ok"), poisoned(app("bad"))])
    assert error is not None and error.field == "app" and "sent to peers" in str(error)


def test_garbage_envelopes_are_record_errors_not_crashes() -> None:
    for wire in (
        {"v": 1, "delta": {"entries": [{"kind": ["x"], "key": "k", "value": None,
                                       "hlc": [1, 0], "origin": "n/1", "seq": 1}],
                           "vv": {}, "horizon": {}, "complete": False}},
        {"v": 1, "delta": None},
        {"v": 1},
        [],
    ):  # fmt: skip
        with pytest.raises(RecordError):
            open_envelope(wire)


# -- the store ---------------------------------------------------------------


def test_a_surrogate_stored_by_an_older_version_loads_repaired(tmp_path: Path) -> None:
    with SqliteStore(tmp_path, "n1") as store:
        store.write([app(k="v")], physical_ms=T0)
    db = sqlite3.connect(tmp_path / SqliteStore.FILENAME)
    (value,) = db.execute("SELECT value FROM entries WHERE kind = 'app'").fetchone()
    wire = json.loads(value)
    wire["meta"]["k"] = "bad\udfff"
    db.execute("UPDATE entries SET value = ?", (json.dumps(wire),))  # "\udfff" escaped
    db.commit()
    db.close()
    with SqliteStore(tmp_path, "n1") as store:
        (entry,) = store.state.entries()
        assert entry.value is not None and entry.value.meta["k"] == "bad\ufffd"  # type: ignore[attr-defined]
        pack(entry.to_wire())  # peers can be sent it again


def fill(store: SqliteStore) -> None:
    """Cap the database at its current size: the next growing write is SQLITE_FULL."""
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_disk_rolls_back_keeps_the_state_and_the_next_write_succeeds(tmp_path: Path) -> None:
    with SqliteStore(tmp_path, "n1") as store:
        store.write([app("a")], physical_ms=T0)
        before = store.state
        fill(store)
        big = [app(f"x{i}", k="v" * 4000) for i in range(50)]
        with pytest.raises(StoreFullError):
            store.write(big, physical_ms=T0 + 1)
        assert store.state is before
        store._db.execute("PRAGMA max_page_count = 1000000")
        store.probe()
        entries = store.write(big, physical_ms=T0 + 2)
        assert [e.seq for e in entries] == list(range(2, 52))  # no sequence number lost
    with SqliteStore(tmp_path, "n1") as store:
        assert len(store.state) == 51


# -- the service -------------------------------------------------------------


class FullableStore(MemoryStore):
    """A MemoryStore whose disk can be made full."""

    full = False

    def write(self, changes: Sequence[Change], *, physical_ms: int) -> list[Entry]:
        if self.full:
            raise StoreFullError("state.sqlite3: the disk is full (database or disk is full)")
        return super().write(changes, physical_ms=physical_ms)

    def probe(self) -> None:
        if self.full:
            raise StoreFullError("state.sqlite3: the disk is full (database or disk is full)")


def no_network() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))


class WallMs:
    ms = T0

    def __call__(self) -> int:
        self.ms += 1
        return self.ms


async def test_a_full_disk_is_507_and_degraded_and_clears_once_space_frees(
    clock: trio.testing.MockClock,
) -> None:
    store = FullableStore("n1")
    service = StateService(store, Peers(), no_network(), WallMs())
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await service.write([app("a")])
        store.full = True
        with pytest.raises(InsufficientStorage) as info:
            await service.write([app("b")])
        assert info.value.status == 507 and "disk is full" in info.value.message
        assert service.degraded is not None and "disk is full" in service.degraded
        assert {e.key for e in service.state.entries()} == {"id-a"}  # reads go on
        store.full = False
        # the probe clears it, no write needed
        await wait_for(lambda: service.degraded is None, 3 * PROBE_INTERVAL_S, "degraded to clear")
        assert service.degraded is None
        await service.write([app("b")])
        nursery.cancel_scope.cancel()


async def test_an_unencodable_write_fails_alone_and_the_others_commit(
    clock: trio.testing.MockClock,
) -> None:
    service = StateService(MemoryStore("n1"), Peers(), no_network(), WallMs())
    results: dict[str, object] = {}

    async def write(record: App) -> None:
        try:
            results[record.name] = await service.write([record])
        except RecordError as exc:
            results[record.name] = exc

    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        async with trio.open_nursery() as writers:  # one group commit
            writers.start_soon(write, app("good"))
            writers.start_soon(write, poisoned(app("bad")))
            writers.start_soon(write, app("also"))
        nursery.cancel_scope.cancel()
    assert isinstance(results["bad"], RecordError)
    assert {e.key for e in service.state.entries()} == {"id-good", "id-also"}


async def test_a_push_failing_in_any_way_is_a_503_not_the_end_of_the_agent(
    clock: trio.testing.MockClock,
) -> None:
    def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("not an httpx error")

    http = httpx.AsyncClient(transport=httpx.MockTransport(explode))
    peers = Peers([Peer("n2", "127.0.0.1:1"), Peer("n3", "not a host:port")])
    service = StateService(MemoryStore("n1"), peers, http, WallMs())
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        for name in ("a", "b"):
            with pytest.raises(ClusterError):
                await service.write([app(name)])
        assert service.stats["push_failures"] >= 4
        nursery.cancel_scope.cancel()
    assert len(service.state) == 2


async def test_a_pull_skips_entries_that_cannot_be_encoded(
    clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore("n1")
    store.write([app("good"), app("bad")], physical_ms=T0)
    poisoned(store.state.record(App, "id-bad"))  # type: ignore[arg-type]
    service = StateService(store, Peers(), no_network(), WallMs())
    chunks = [c async for c in service.replication.sync_chunks({})]
    (wire,) = [msgpack.unpackb(c, raw=False) for c in chunks]
    delta = open_envelope(wire)
    assert [e.key for e in delta.entries] == ["id-good"] and delta.complete
    assert delta.vv == store.state.vv
    assert service.stats["skipped_unencodable"] == 1
