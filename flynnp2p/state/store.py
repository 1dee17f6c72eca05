"""A replica of the cluster state: the pure CRDT plus the node's clock, origin and disk.

Theory of operation
-------------------
A store owns one replica: the current `State` (an immutable value, swapped as a
whole after each change), the node's `HlcClock` and its *origin*, the name its
writes carry: ``"<node>/<incarnation>"``, where the incarnation is random and made
when the database is created. A node whose disk is wiped thus comes back as a new
origin and can never reuse sequence numbers its peers have already seen.

Every change, local (`write`) or remote (`apply`), is computed purely from the
current state, made durable in **one SQLite transaction** (the entries it changed,
the vector and horizon rows that moved, the clock and the origin), and only then
published by swapping the in-memory state. Readers use `state` and never touch
SQLite or take a lock; they always see a committed, consistent snapshot.

`SqliteStore` is synchronous: the trio service calls it through
``trio.to_thread.run_sync``, one mutation at a time (a lock enforces that).
`MemoryStore` is the same replica without a disk, the fake for other components'
tests.

Durability: WAL with ``synchronous=FULL``. With NORMAL, a power cut can roll back
the last commits; the rows are safe on the peers that acknowledged them, but this
node's own sequence counter would go back and its next writes would reuse numbers
that peers skip as already seen, losing them silently. FULL costs an fsync per
commit, and writes are batched per transaction, so it is cheap where it matters.
If a peer ever shows this origin further ahead than the disk (a restored backup),
the store switches to a fresh incarnation rather than reuse numbers.

A full disk is a `StoreFullError`: the transaction is rolled back and the
in-memory state is not swapped, so the replica stays exactly as it was, readable,
and the next change (or a `probe`) succeeds once space frees.

Strings that older versions accepted but peers cannot decode (a lone surrogate
from a JSON ``"\\udfff"`` escape) are loaded with U+FFFD in their place, so such a
record can be served to peers again instead of failing every pull of it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from flynnp2p.state.errors import RecordError, StoreError, StoreFullError
from flynnp2p.state.hlc import ZERO, Hlc, HlcClock
from flynnp2p.state.merge import (
    Change,
    Delta,
    Entry,
    State,
    VersionVector,
    apply_delta,
    apply_entries,
    collect_tombstones,
    delta_since,
    local_entries,
)
from flynnp2p.state.records import NODE, Record, decode_record

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class StateStore(Protocol):
    """The seam the state service uses; `SqliteStore` and `MemoryStore` implement it."""

    @property
    def origin(self) -> str: ...
    @property
    def state(self) -> State: ...
    @property
    def hlc(self) -> Hlc: ...
    def write(self, changes: Sequence[Change], *, physical_ms: int) -> list[Entry]: ...
    def apply(self, delta: Delta) -> list[Entry]: ...
    def delta_since(self, vv: VersionVector) -> Delta: ...
    def collect_tombstones(self, vectors: Iterable[VersionVector]) -> list[Entry]: ...
    def reset(self) -> None: ...
    def probe(self) -> None: ...
    def close(self) -> None: ...


def random_incarnation() -> str:
    return secrets.token_hex(6)


class MemoryStore:
    """A replica kept in memory only (and the logic `SqliteStore` persists)."""

    def __init__(
        self,
        node: str,
        *,
        new_incarnation: Callable[[], str] = random_incarnation,
        origin: str | None = None,
        state: State | None = None,
        hlc: Hlc = ZERO,
    ) -> None:
        self._node = NODE.decode("node", node)
        self._new_incarnation = new_incarnation
        self._origin = origin or self._fresh_origin()
        self._state = state or State()
        # Never issue a timestamp below one already in the map (a write made after
        # reading an entry must win over it), even if `hlc` was not saved.
        self._clock = HlcClock(max([hlc, *(e.hlc for e in self._state.entries())]))
        self._lock = threading.Lock()

    @property
    def origin(self) -> str:
        """The name this replica's writes carry."""
        return self._origin

    @property
    def state(self) -> State:
        """The latest committed state (an immutable snapshot)."""
        return self._state

    @property
    def hlc(self) -> Hlc:
        return self._clock.last

    def write(self, changes: Sequence[Change], *, physical_ms: int) -> list[Entry]:
        """Commit local changes atomically; returns their entries (push them to peers)."""
        if not changes:
            return []
        with self._lock:
            entries = local_entries(self._state, self._origin, self._clock, changes, physical_ms)
            new, _ = apply_entries(self._state, entries)
            self._commit(new, entries, ())
            return entries

    def apply(self, delta: Delta) -> list[Entry]:
        """Commit a peer's delta atomically; returns the entries that changed the state.

        Raises `StaleReplicaError` if this replica must be `reset` first.
        """
        with self._lock:
            old = self._state
            new, applied = apply_delta(old, delta)
            for e in delta.entries:
                self._clock.observe(e.hlc)
            rolled_back = delta.vv.get(self._origin, 0) > old.vv.get(self._origin, 0)
            if rolled_back:
                self._origin = self._fresh_origin()  # our disk lost writes peers have
            if new is not old or rolled_back:
                self._commit(new, applied, ())
            return applied

    def delta_since(self, vv: VersionVector) -> Delta:
        """What the holder of `vv` lacks (a complete delta)."""
        return delta_since(self._state, vv)

    def collect_tombstones(self, vectors: Iterable[VersionVector]) -> list[Entry]:
        """Drop tombstones every vector covers (see `merge.collectable`)."""
        with self._lock:
            new, dropped = collect_tombstones(self._state, vectors)
            if dropped:
                self._commit(new, (), dropped)
            return dropped

    def reset(self) -> None:
        """Forget everything and start again as a new incarnation (after StaleReplicaError)."""
        with self._lock:
            self._origin = self._fresh_origin()
            self._wipe()
            self._state = State()

    def probe(self) -> None:
        """Commit an empty change: StoreFullError while the disk is still full."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _fresh_origin(self) -> str:
        return f"{self._node}/{self._new_incarnation()}"

    def _commit(self, new: State, changed: Iterable[Entry], dropped: Iterable[Entry]) -> None:
        """Make `new` durable, then publish it. Runs under the lock."""
        self._state = new

    def _wipe(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    kind TEXT NOT NULL, key TEXT NOT NULL, origin TEXT NOT NULL, seq INTEGER NOT NULL,
    wall_ms INTEGER NOT NULL, counter INTEGER NOT NULL, value TEXT,  -- NULL: tombstone
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vectors (
    name TEXT NOT NULL, origin TEXT NOT NULL, seq INTEGER NOT NULL,  -- name: vv | horizon
    PRIMARY KEY (name, origin)
) WITHOUT ROWID;
"""


class SqliteStore(MemoryStore):
    """A replica persisted in ``<directory>/state.sqlite3`` (WAL, synchronous=FULL)."""

    FILENAME = "state.sqlite3"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        node: str,
        *,
        new_incarnation: Callable[[], str] = random_incarnation,
    ) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._lockfile: int | None = _lock_directory(path / "state.lock")
        try:
            with _sqlite_errors(f"{path / self.FILENAME}: cannot open", path):
                self._db = sqlite3.connect(
                    path / self.FILENAME, isolation_level=None, check_same_thread=False
                )
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
            version = int(meta.get("schema", SCHEMA_VERSION))
            if version != SCHEMA_VERSION:
                raise StoreError(f"{path}: database schema {version}, this node reads 1")
            super().__init__(
                node,
                new_incarnation=new_incarnation,
                origin=meta.get("origin"),
                state=self._load(),
                hlc=Hlc(*json.loads(meta["hlc"])) if "hlc" in meta else ZERO,
            )
            if not meta:
                with _sqlite_errors(f"{path / self.FILENAME}: cannot initialise", path), self._transaction():
                    self._save_meta()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            del self._db
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None

    def _load(self) -> State:
        tables: dict[str, dict[str, Entry]] = {}
        rows = self._db.execute(
            "SELECT kind, key, origin, seq, wall_ms, counter, value FROM entries"
        )
        for kind, key, origin, seq, wall_ms, counter, value in rows:
            try:
                record = None if value is None else _decode_stored(kind, key, json.loads(value))
                entry = Entry(kind, key, record, Hlc(wall_ms, counter), origin, seq)
            except (RecordError, ValueError) as e:
                raise StoreError(f"unreadable entry {kind}/{key} in the state database: {e}") from e
            tables.setdefault(kind, {})[key] = entry
        vectors: dict[str, dict[str, int]] = {"vv": {}, "horizon": {}}
        for name, origin, seq in self._db.execute("SELECT name, origin, seq FROM vectors"):
            vectors[name][origin] = seq
        return State(tables, vectors["vv"], vectors["horizon"])

    def _commit(self, new: State, changed: Iterable[Entry], dropped: Iterable[Entry]) -> None:
        old = self._state
        keys = {(e.kind, e.key) for e in changed}
        rows = []
        for kind, key in keys:
            e = new.get(kind, key)
            assert e is not None
            value = (
                None if e.value is None else json.dumps(e.value.to_wire(), separators=(",", ":"))
            )
            rows.append((kind, key, e.origin, e.seq, e.hlc.wall_ms, e.hlc.counter, value))
        with _sqlite_errors("the state database cannot commit"), self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?)", rows)
            self._db.executemany(
                "DELETE FROM entries WHERE kind = ? AND key = ?",
                [(e.kind, e.key) for e in dropped],
            )
            for name, before, after in (
                ("vv", old.vv, new.vv),
                ("horizon", old.horizon, new.horizon),
            ):
                self._db.executemany(
                    "INSERT OR REPLACE INTO vectors VALUES (?,?,?)",
                    [(name, o, s) for o, s in after.items() if before.get(o) != s],
                )
            self._save_meta()
        self._state = new

    def probe(self) -> None:
        with self._lock, _sqlite_errors("the state database cannot commit"), self._transaction():
            self._save_meta()

    def _wipe(self) -> None:
        with _sqlite_errors("the state database cannot commit"), self._transaction():
            self._db.execute("DELETE FROM entries")
            self._db.execute("DELETE FROM vectors")
            self._save_meta()

    def _save_meta(self) -> None:
        hlc = self._clock.last
        self._db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [
                ("schema", str(SCHEMA_VERSION)),
                ("origin", self._origin),
                ("hlc", json.dumps([hlc.wall_ms, hlc.counter])),
            ],
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if t is None:
            try:
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that fails (SQLITE_FULL) leaves the transaction open:
                # without this every later BEGIN would fail too.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        elif self._db.in_transaction:
            self._db.execute("ROLLBACK")


class _sqlite_errors:
    """Turns sqlite3 errors into StoreError (StoreFullError for a full disk).

    SQLite says "disk is full" only for a write that runs out of room; creating
    its -wal and -shm files on a full disk is a "disk I/O error".  With a
    `directory`, an error while its filesystem has no block free is named a
    full disk too, which is what the operator has to fix."""

    def __init__(self, what: str, directory: Path | None = None) -> None:
        self.what = what
        self.directory = directory

    def __enter__(self) -> None:
        pass

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not isinstance(e, sqlite3.Error):
            return
        code = getattr(e, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL or "disk is full" in str(e) or self._no_space_left():
            raise StoreFullError(f"{self.what}: the disk is full ({e})") from None
        raise StoreError(f"{self.what}: {str(e) or type(e).__name__}") from None

    def _no_space_left(self) -> bool:
        if self.directory is None:
            return False
        try:
            return os.statvfs(self.directory).f_bavail == 0
        except OSError:
            return False


def _decode_stored(kind: str, key: str, wire: object) -> Record:
    """A stored record; one with lone surrogates (accepted before they were
    refused at the edge) is repaired, U+FFFD in their place."""
    try:
        return decode_record(kind, wire)
    except RecordError:
        repaired = _replace_surrogates(wire)
        if repaired == wire:
            raise
    record = decode_record(kind, repaired)
    log.warning("stored record %s/%s held lone surrogates: loaded with U+FFFD instead", kind, key)
    return record


_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_surrogates(wire: object) -> object:
    if isinstance(wire, str):
        return _SURROGATE.sub("\ufffd", wire)
    if isinstance(wire, list):
        return [_replace_surrogates(v) for v in wire]
    if isinstance(wire, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in wire.items()}
    return wire


def _lock_directory(path: Path) -> int:
    """Hold an exclusive lock so two agents never share one state directory."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{path.parent} is in use by another flynnp2p process") from None
    return fd
