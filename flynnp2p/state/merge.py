"""The replicated state as a CRDT: a last-writer-wins map with version vectors.

Theory of operation
-------------------
Every write is an `Entry` ``(kind, key, value | None, hlc, origin, seq)``: ``origin``
names the replica that made it (a node *incarnation*, so a wiped node never reuses
sequence numbers), ``seq`` counts that origin's writes 1, 2, 3, ... and ``value``
None is a tombstone. The `State` keeps, per ``(kind, key)``, the entry with the
greatest ``rank = (hlc, origin, seq)``. An ``(origin, seq)`` pair names exactly one
write, so ranks never tie between different entries and the map is a join
semilattice: `merge` is commutative, associative and idempotent.

Version vectors. ``vv[o] = n`` claims *coverage* of o's writes 1..n:

    (I)  for every s <= vv[o], the map holds, for the key o's write s touched,
         an entry ranked >= that write (or a tombstone that did so was collected).

The map only keeps winners, so a write overwritten by a later one (from any origin)
is gone and cannot be shipped; the vector must still move past it. It moves only
in ways that keep (I):

1. ``apply_entries``: an entry ``(o, s)`` with ``s == vv[o] + 1``, once applied
   (or already beaten), extends the covered prefix by one. An entry past a gap is
   applied but does not move the vector.
2. A *complete* delta ``delta_since(S, vv_R)`` holds every entry of S with
   ``seq > vv_R[origin]``. After R applies all of it, R may take ``vv_S``: for any
   write w covered by S, S's map holds some e >= w; either e is in the delta, or
   ``e.seq <= vv_R[e.origin]`` and R already covers e (hence w). This holds for
   any vector R had (vectors only grow), so a stale request is still safe. A delta
   is all-or-nothing: a transport that splits one must send the pieces as
   incomplete deltas and let the last, complete one carry the claim.

Entries with ``seq <= vv[origin]`` are skipped on arrival: by (I) they would lose
anyway (an optimisation; the horizon below is what keeps collected keys dead).

Tombstone collection. A tombstone ``(o, s)`` may be dropped once every replica's
vector covers it (`collectable`). Then no replica's map still holds a write it beat,
so no delta can bring one back, but a message cut *before* its sender saw the
tombstone may still be in flight. So a replica remembers a ``horizon``: per origin,
the greatest seq of a collected tombstone (joined from peers' horizons too), and

* ignores any delta whose sender vector does not dominate its horizon (such a
  message predates a collected tombstone and may carry what it beat), and
* raises `StaleReplicaError` when a peer's horizon is not dominated by its own
  vector while it holds entries: it was left out of a collection (down too long)
  and may hold deleted data, so it must be emptied and refilled.

So "every replica" in `collectable` means every member that can come back, not
just the ones alive right now. Entries shipped in an incomplete delta must be
taken from the sender's map together with its vector (`delta_of` enforces this).

Everything here is pure: no clocks (the HLC is passed in), no I/O. A `State` is
an immutable value; updates copy only the tables they touch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from flynnp2p.state.errors import RecordError, StaleReplicaError
from flynnp2p.state.hlc import Hlc, HlcClock
from flynnp2p.state.records import KIND_CHOICES, KINDS, Record, decode_record
from flynnp2p.state.schema import EMPTY, Bool, Int, Seq, Str

VersionVector = Mapping[str, int]
R = TypeVar("R", bound=Record)

ORIGIN = Str(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,191}", "an origin name (node/incarnation)", 192)
KEY = Str(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,255}", "a record key", 256)
SEQ = Int(1)
_HLC = Seq(Int(0), max_items=2)


@dataclass(frozen=True, slots=True)
class Entry:
    """One write: `value` None is a tombstone."""

    kind: str
    key: str
    value: Record | None
    hlc: Hlc
    origin: str
    seq: int

    def __post_init__(self) -> None:
        if self.value is not None and (self.kind != self.value.KIND or self.value.key != self.key):
            raise RecordError(
                "entry", f"value is {self.value.KIND}/{self.value.key}, not {self.kind}/{self.key}"
            )

    @property
    def rank(self) -> tuple[Hlc, str, int]:
        """Last-writer-wins order: the greater rank wins."""
        return (self.hlc, self.origin, self.seq)

    def to_wire(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "key": self.key,
            "value": None if self.value is None else self.value.to_wire(),
            "hlc": [self.hlc.wall_ms, self.hlc.counter],
            "origin": self.origin,
            "seq": self.seq,
        }

    @classmethod
    def from_wire(cls, wire: object, path: str = "entry") -> Entry:
        if not isinstance(wire, Mapping) or set(wire) != _ENTRY_FIELDS:
            raise RecordError(path, f"expected a map with exactly {sorted(_ENTRY_FIELDS)}")
        kind = wire["kind"]
        if kind not in KINDS:
            raise RecordError(f"{path}.kind", f"expected one of {KIND_CHOICES}, got {kind!r}")
        key = KEY.decode(f"{path}.key", wire["key"])
        wall_counter = _HLC.decode(f"{path}.hlc", wire["hlc"])
        if len(wall_counter) != 2:
            raise RecordError(f"{path}.hlc", "expected [wall_ms, counter]")
        try:
            hlc = Hlc(*wall_counter)
        except ValueError as e:
            raise RecordError(f"{path}.hlc", str(e)) from None
        value = None
        if wire["value"] is not None:
            try:
                value = decode_record(kind, wire["value"])
            except RecordError as e:  # re-root "app.name" as "<path>.value.name"
                field = f"{path}.value" + e.field[len(kind) :]
                raise type(e)(field, str(e).partition(": ")[2]) from None
            if value.key != key:
                raise RecordError(f"{path}.key", f"is {key!r} but the value's key is {value.key!r}")
        return cls(
            kind=kind,
            key=key,
            value=value,
            hlc=hlc,
            origin=ORIGIN.decode(f"{path}.origin", wire["origin"]),
            seq=SEQ.decode(f"{path}.seq", wire["seq"]),
        )


_ENTRY_FIELDS = frozenset({"kind", "key", "value", "hlc", "origin", "seq"})


@dataclass(frozen=True, slots=True)
class Delete:
    """A local change that deletes `kind`/`key` (becomes a tombstone entry)."""

    kind: str
    key: str


Change = Record | Delete


@dataclass(frozen=True, slots=True)
class Delta:
    """Entries shipped from one replica to another.

    `vv` and `horizon` are the sender's when the entries were taken from its map.
    `complete` means the entries are *all* the sender had beyond the receiver's
    vector, so the receiver may adopt `vv` (see the module docstring).
    """

    entries: tuple[Entry, ...]
    vv: VersionVector
    horizon: VersionVector
    complete: bool

    def to_wire(self) -> dict[str, object]:
        return {
            "entries": [e.to_wire() for e in self.entries],
            "vv": dict(self.vv),
            "horizon": dict(self.horizon),
            "complete": self.complete,
        }

    @classmethod
    def from_wire(cls, wire: object) -> Delta:
        if not isinstance(wire, Mapping) or set(wire) != {"entries", "vv", "horizon", "complete"}:
            raise RecordError("delta", "expected a map of entries, vv, horizon, complete")
        entries = wire["entries"]
        if not isinstance(entries, list):
            raise RecordError("delta.entries", "expected a list of entries")
        return cls(
            entries=tuple(Entry.from_wire(e, f"delta.entries[{i}]") for i, e in enumerate(entries)),
            vv=decode_vector("delta.vv", wire["vv"]),
            horizon=decode_vector("delta.horizon", wire["horizon"]),
            complete=Bool().decode("delta.complete", wire["complete"]),
        )


def decode_vector(path: str, wire: object) -> dict[str, int]:
    if not isinstance(wire, Mapping):
        raise RecordError(path, "expected a map of origin to sequence number")
    out = {
        ORIGIN.decode(f"{path} key", o): Int(0).decode(f"{path}.{o}", s) for o, s in wire.items()
    }
    return {o: s for o, s in out.items() if s}


@dataclass(frozen=True, slots=True)
class State:
    """One replica's view: tables of winning entries, version vector, GC horizon.

    Immutable: the functions below return new states. Tables never hold empty
    maps and vectors never hold zeros, so equal contents compare equal.
    """

    tables: Mapping[str, Mapping[str, Entry]] = EMPTY
    vv: VersionVector = EMPTY
    horizon: VersionVector = EMPTY

    def get(self, kind: str, key: str) -> Entry | None:
        table = self.tables.get(kind)
        return None if table is None else table.get(key)

    def record(self, cls: type[R], key: str) -> R | None:
        """The live record `cls`/`key`, or None if absent or deleted."""
        entry = self.get(cls.KIND, key)
        value = None if entry is None else entry.value
        return value if isinstance(value, cls) else None

    def records(self, cls: type[R]) -> list[R]:
        """Every live record of kind `cls`, sorted by key."""
        table = self.tables.get(cls.KIND, {})
        values = (table[k].value for k in sorted(table))
        return [v for v in values if isinstance(v, cls)]

    def entries(self) -> Iterator[Entry]:
        """Every entry, tombstones included, sorted by (kind, key)."""
        for kind in sorted(self.tables):
            table = self.tables[kind]
            for key in sorted(table):
                yield table[key]

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())


def covers(vv: VersionVector, entry: Entry) -> bool:
    return vv.get(entry.origin, 0) >= entry.seq


def dominates(a: VersionVector, b: VersionVector) -> bool:
    """True if `a` covers everything `b` does."""
    return all(a.get(o, 0) >= s for o, s in b.items())


def join(a: VersionVector, b: VersionVector) -> dict[str, int]:
    out = dict(a)
    for o, s in b.items():
        if s > out.get(o, 0):
            out[o] = s
    return out


def local_entries(
    state: State, origin: str, clock: HlcClock, changes: Iterable[Change], physical_ms: int
) -> list[Entry]:
    """Turn local changes into entries numbered after `origin`'s last write."""
    seq = state.vv.get(origin, 0)
    out = []
    for change in changes:
        seq += 1
        hlc = clock.now(physical_ms)
        if isinstance(change, Delete):
            out.append(Entry(change.kind, change.key, None, hlc, origin, seq))
        else:
            out.append(Entry(change.KIND, change.key, change, hlc, origin, seq))
    return out


def apply_entries(state: State, entries: Iterable[Entry]) -> tuple[State, list[Entry]]:
    """Apply entries known not to be stale (local writes, a checked delta).

    Returns the new state and the entries of the batch now in its map, in (origin, seq)
    order.
    """
    vv = dict(state.vv)
    touched: dict[str, dict[str, Entry]] = {}
    applied = []
    for e in sorted(entries, key=_by_origin_seq):
        have = vv.get(e.origin, 0)
        if e.seq <= have:
            continue  # covered: by (I) it would lose
        table = touched.get(e.kind)
        current = (table if table is not None else state.tables.get(e.kind, {})).get(e.key)
        if current is None or current.rank < e.rank:
            if table is None:
                table = touched[e.kind] = dict(state.tables.get(e.kind, {}))
            table[e.key] = e
            applied.append(e)
        if e.seq == have + 1:
            vv[e.origin] = e.seq
    if not touched and vv == state.vv:
        return state, applied
    applied = [e for e in applied if touched[e.kind][e.key] is e]  # drop ones beaten in-batch
    return State({**state.tables, **touched}, vv, state.horizon), applied


def apply_delta(state: State, delta: Delta) -> tuple[State, list[Entry]]:
    """Apply a delta from a peer (see the module docstring for the checks)."""
    if not dominates(delta.vv, state.horizon):
        return state, []  # cut before a tombstone we collected: may carry what it beat
    if state.tables and not dominates(state.vv, delta.horizon):
        raise StaleReplicaError(
            "a peer collected tombstones this replica never saw; reset it and resync"
        )
    new, applied = apply_entries(state, delta.entries)
    vv = join(new.vv, delta.vv) if delta.complete else new.vv
    horizon = join(new.horizon, delta.horizon)
    if vv == new.vv and horizon == new.horizon:
        return new, applied
    return State(new.tables, vv, horizon), applied


def delta_since(state: State, vv: VersionVector) -> Delta:
    """A complete delta: every entry of `state` the holder of `vv` may lack."""
    entries = [e for t in state.tables.values() for e in t.values() if e.seq > vv.get(e.origin, 0)]
    entries.sort(key=_by_origin_seq)
    return Delta(tuple(entries), state.vv, state.horizon, complete=True)


def delta_of(state: State, entries: Iterable[Entry]) -> Delta:
    """An incomplete delta pushing `entries`, keeping only those still in `state`'s map."""
    kept = [e for e in entries if state.get(e.kind, e.key) == e]
    kept.sort(key=_by_origin_seq)
    return Delta(tuple(kept), state.vv, state.horizon, complete=False)


def merge(a: State, b: State) -> State:
    """The join of two states: per key the higher-ranked entry, vectors pointwise max."""
    tables = {kind: dict(table) for kind, table in a.tables.items()}
    for kind, table in b.tables.items():
        mine = tables.setdefault(kind, {})
        for key, e in table.items():
            current = mine.get(key)
            if current is None or current.rank < e.rank:
                mine[key] = e
    return State(tables, join(a.vv, b.vv), join(a.horizon, b.horizon))


def collectable(state: State, vectors: Iterable[VersionVector]) -> list[Entry]:
    """Tombstones covered by `state`'s vector and by every vector in `vectors`.

    `vectors` must hold the latest known vector of every member that may come
    back (alive or failed, not left); a member left out must be reset on return.
    """
    vecs = [state.vv, *vectors]
    return [
        e
        for t in state.tables.values()
        for e in t.values()
        if e.value is None and all(v.get(e.origin, 0) >= e.seq for v in vecs)
    ]


def collect_tombstones(state: State, vectors: Iterable[VersionVector]) -> tuple[State, list[Entry]]:
    """Drop the `collectable` tombstones and raise the horizon past them."""
    dropped = collectable(state, vectors)
    if not dropped:
        return state, []
    touched: dict[str, dict[str, Entry]] = {}
    horizon = dict(state.horizon)
    for e in dropped:
        table = touched.get(e.kind)
        if table is None:
            table = touched[e.kind] = dict(state.tables[e.kind])
        del table[e.key]
        if e.seq > horizon.get(e.origin, 0):
            horizon[e.origin] = e.seq
    tables = {kind: t for kind, t in {**state.tables, **touched}.items() if t}
    return State(tables, state.vv, horizon), sorted(dropped, key=_by_origin_seq)


def _by_origin_seq(e: Entry) -> tuple[str, int]:
    return (e.origin, e.seq)
