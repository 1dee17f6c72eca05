"""Declarative field checks for the typed records in `records`.

Theory of operation
-------------------
A record is a frozen dataclass whose fields are annotated with a check::

    name: Annotated[str, Str(APP_NAME_RE, "lowercase letters, digits and -")]

`Schema.__post_init__` runs every field through its check's `decode`, which
validates and normalises (lists become tuples, dicts become `FrozenMap`, nested
dicts become their dataclass), so an invalid record cannot be constructed, whether
it comes from Python code, the wire or the database. `to_wire` is the inverse:
plain dicts, lists, str, int, bool and None, safe for msgpack and JSON.

Every failure is a `RecordError` naming the dotted field path and what is accepted.
Every string (values and map keys alike) must be valid Unicode without NUL, so
that whatever a check accepts can be encoded for peers (see `unencodable_char`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any, Generic, Self, TypeVar

from flynnp2p.state.errors import RecordError
from flynnp2p.vocab import Term, show

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class FrozenMap(Mapping[K, V]):
    """An immutable, hashable mapping with keys kept in sorted order."""

    __slots__ = ("_d", "_hash")

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        d = dict(items or {})
        self._d: dict[K, V] = {k: d[k] for k in sorted(d)}  # type: ignore[type-var]
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._d[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._d == other._d
        if isinstance(other, Mapping):
            return self._d == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._d.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


EMPTY: FrozenMap[str, Any] = FrozenMap()


_show = show


class Check(Generic[T]):
    """Validates/normalises one field (`decode`) and renders it for the wire (`encode`)."""

    accepted: str = ""

    def decode(self, path: str, value: object) -> T:
        raise NotImplementedError

    def encode(self, value: T) -> object:
        return value

    def fail(self, path: str, value: object) -> RecordError:
        return RecordError(path, f"expected {self.accepted}, got {_show(value)}")


class Str(Check[str]):
    def __init__(
        self, pattern: str | None = None, accepted: str = "", max_len: int = 256, min_len: int = 1
    ) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.min_len, self.max_len = min_len, max_len
        self.accepted = accepted or f"a string of {min_len} to {max_len} characters"

    @classmethod
    def of(cls, term: Term) -> Str:
        """The field check of a vocabulary term (its pattern, limits and wording)."""
        return cls(term.regex, term.accepted, term.max_len, term.min_len)

    def decode(self, path: str, value: object) -> str:
        if type(value) is not str or not self.min_len <= len(value) <= self.max_len:
            raise self.fail(path, value)
        bad = unencodable_char(value)
        if bad is not None:
            raise RecordError(
                path,
                f"{bad} is not accepted: expected {self.accepted}, in valid Unicode text "
                "(encodable as UTF-8, no NUL)",
            )
        if self.pattern is not None and self.pattern.fullmatch(value) is None:
            raise self.fail(path, value)
        return value


def unencodable_char(text: str) -> str | None:
    """Why `text` cannot be stored and sent to peers, or None if it can.

    Peers exchange records as msgpack, which carries UTF-8: a lone surrogate
    (which JSON's ``"\\udfff"`` escape can produce) would commit here and then
    fail every push and pull of it.  NUL is refused as well (C strings, serf tags,
    process arguments)."""
    if text.isascii():
        i = text.find("\x00")
        return None if i < 0 else f"NUL at index {i}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"the lone surrogate U+{ord(text[exc.start]):04X} at index {exc.start}"
    i = text.find("\x00")
    return None if i < 0 else f"NUL at index {i}"


class Choice(Check[str]):
    def __init__(self, *choices: str) -> None:
        self.choices = frozenset(choices)
        self.accepted = "one of " + ", ".join(repr(c) for c in choices)

    def decode(self, path: str, value: object) -> str:
        if type(value) is not str or value not in self.choices:
            raise self.fail(path, value)
        return value


class Int(Check[int]):
    def __init__(self, lo: int = 0, hi: int = 2**63 - 1) -> None:
        self.lo, self.hi = lo, hi
        self.accepted = f"an integer from {lo} to {hi}"

    def decode(self, path: str, value: object) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:  # bool is refused too
            raise self.fail(path, value)
        return value


class Bool(Check[bool]):
    accepted = "true or false"

    def decode(self, path: str, value: object) -> bool:
        if type(value) is not bool:
            raise self.fail(path, value)
        return value


class Opt(Check[T | None]):
    def __init__(self, inner: Check[T]) -> None:
        self.inner = inner
        self.accepted = f"null or {inner.accepted}"

    def decode(self, path: str, value: object) -> T | None:
        return None if value is None else self.inner.decode(path, value)

    def encode(self, value: T | None) -> object:
        return None if value is None else self.inner.encode(value)


class Seq(Check[tuple[T, ...]]):
    def __init__(self, item: Check[T], max_items: int = 64) -> None:
        self.item, self.max_items = item, max_items
        self.accepted = f"a list of at most {max_items} items, each {item.accepted}"

    def decode(self, path: str, value: object) -> tuple[T, ...]:
        if not isinstance(value, list | tuple) or len(value) > self.max_items:
            raise self.fail(path, value)
        return tuple(self.item.decode(f"{path}[{i}]", v) for i, v in enumerate(value))

    def encode(self, value: tuple[T, ...]) -> object:
        return [self.item.encode(v) for v in value]


class Dict(Check[Mapping[str, T]]):
    def __init__(self, key: Check[str], value: Check[T], max_items: int = 256) -> None:
        self.key, self.value, self.max_items = key, value, max_items
        self.accepted = f"a map of at most {max_items} entries"

    def decode(self, path: str, value: object) -> Mapping[str, T]:
        if not isinstance(value, Mapping) or len(value) > self.max_items:
            raise self.fail(path, value)
        out: dict[str, T] = {}
        for k, v in value.items():
            key = self.key.decode(f"{path} key", k)
            out[key] = self.value.decode(f"{path}.{key}", v)
        return FrozenMap(out)

    def encode(self, value: Mapping[str, T]) -> object:
        return {k: self.value.encode(value[k]) for k in sorted(value)}


S = TypeVar("S", bound="Schema")


class Nested(Check[S]):
    def __init__(self, cls: type[S]) -> None:
        self.cls = cls
        self.accepted = f"a {cls.__name__} map"

    def decode(self, path: str, value: object) -> S:
        if isinstance(value, self.cls):
            return value
        return self.cls.decode_fields(path, value)

    def encode(self, value: S) -> object:
        return value.to_wire()


class _Field:
    __slots__ = ("check", "default", "name")

    def __init__(self, name: str, check: Check[Any], default: object) -> None:
        self.name, self.check, self.default = name, check, default


class _Layout:
    __slots__ = ("fields", "names")

    def __init__(self, fields: tuple[_Field, ...]) -> None:
        self.fields = fields
        self.names = frozenset(f.name for f in fields)


def _layout(cls: type) -> _Layout:
    """Each dataclass field with the one `Check` in its `Annotated` metadata (memoised)."""
    layout: _Layout | None = cls.__dict__.get("_schema_layout")
    if layout is not None:
        return layout
    out = []
    for f in dataclasses.fields(cls):
        checks = [m for m in getattr(f.type, "__metadata__", ()) if isinstance(m, Check)]
        if len(checks) != 1 or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: needs one Check and no default_factory")
        out.append(_Field(f.name, checks[0], f.default))
    layout = _Layout(tuple(out))
    cls._schema_layout = layout  # type: ignore[attr-defined]
    return layout


class Schema:
    """Base of checked frozen dataclasses (records and the values nested in them)."""

    __slots__ = ()

    def __post_init__(self) -> None:
        path = getattr(self, "KIND", None) or type(self).__name__.lower()
        for f in _layout(type(self)).fields:
            old = getattr(self, f.name)
            new = f.check.decode(f"{path}.{f.name}", old)
            if new is not old:
                object.__setattr__(self, f.name, new)
        self.validate(path)

    def validate(self, path: str) -> None:
        """Cross-field rules; raise `RecordError` naming the field."""

    def to_wire(self) -> dict[str, object]:
        return {f.name: f.check.encode(getattr(self, f.name)) for f in _layout(type(self)).fields}

    @classmethod
    def decode_fields(cls, path: str, wire: object, skip: frozenset[str] = frozenset()) -> Self:
        """Build from a wire map; unknown keys and missing required keys are errors.

        Fields are decoded once, here, with their full path (``__init__`` is
        bypassed so they are not checked twice).
        """
        if not isinstance(wire, Mapping):
            raise RecordError(path, f"expected a map, got {_show(wire)}")
        layout = _layout(cls)
        known = layout.names
        if not all(k in known or k in skip for k in wire):
            unknown = sorted(str(k) for k in wire if k not in known and k not in skip)
            raise RecordError(path, f"unknown field(s) {unknown}; accepted: {sorted(known)}")
        obj = cls.__new__(cls)
        for f in layout.fields:
            if f.name in wire:
                value = f.check.decode(f"{path}.{f.name}", wire[f.name])
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                raise RecordError(f"{path}.{f.name}", f"missing; expected {f.check.accepted}")
            object.__setattr__(obj, f.name, value)
        obj.validate(path)
        return obj
