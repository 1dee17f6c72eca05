"""Hybrid logical clock (Kulkarni et al., 2014), sans-I/O.

Theory of operation
-------------------
A timestamp is ``(wall_ms, counter)``: the largest physical time (ms) this node
has seen, locally or in a message, plus a counter that orders events sharing that
millisecond. The clock never reads the time itself; callers pass ``physical_ms``.

* ``now(pt)`` stamps a local event: strictly greater than every timestamp issued
  or observed so far, and equal to ``(pt, 0)`` whenever physical time has moved on.
* ``observe(ts)`` folds in a timestamp from a peer, so the next local event is
  ordered after it (a write made after reading a peer's write wins over it).
* ``update(ts, pt)`` is the classic HLC receive rule: ``observe`` then ``now``.

So HLC order extends causality: if event *a* could have influenced *b*, then
``hlc(a) < hlc(b)``, whatever the physical clocks say. A physical clock that goes
backwards (NTP step, restart on another host) only makes the counter grow.

A peer whose clock runs far ahead drags everyone's ``wall_ms`` along with it.
``drift_ms`` lets a service spot that and alert; the clock still accepts the
timestamp, because refusing replicated writes would break convergence.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_WALL_MS = 2**63 - 1
MAX_COUNTER = 2**32 - 1


@dataclass(frozen=True, order=True, slots=True)
class Hlc:
    """A hybrid logical timestamp; ordered by ``(wall_ms, counter)``."""

    wall_ms: int
    counter: int = 0

    def __post_init__(self) -> None:
        for name, value, top in (
            ("wall_ms", self.wall_ms, MAX_WALL_MS),
            ("counter", self.counter, MAX_COUNTER),
        ):
            if type(value) is not int or not 0 <= value <= top:
                raise ValueError(f"Hlc.{name} must be an integer from 0 to {top}, got {value!r}")

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}"


ZERO = Hlc(0, 0)


class HlcClock:
    """The node's clock: issues strictly increasing `Hlc` timestamps.

    Not thread-safe; it belongs to the one task (or store) that writes.
    """

    __slots__ = ("_last",)

    def __init__(self, last: Hlc = ZERO) -> None:
        self._last = last

    @property
    def last(self) -> Hlc:
        """The greatest timestamp issued or observed (persist it to survive restarts)."""
        return self._last

    def now(self, physical_ms: int) -> Hlc:
        """Timestamp a local event happening at physical time `physical_ms`."""
        last = self._last
        if physical_ms > last.wall_ms:
            ts = Hlc(physical_ms, 0)
        else:
            ts = Hlc(last.wall_ms, last.counter + 1)
        self._last = ts
        return ts

    def observe(self, remote: Hlc) -> None:
        """Fold in a timestamp received from a peer."""
        if remote > self._last:
            self._last = remote

    def update(self, remote: Hlc, physical_ms: int) -> Hlc:
        """Timestamp the receipt of a message stamped `remote` (classic HLC receive)."""
        self.observe(remote)
        return self.now(physical_ms)


def drift_ms(remote: Hlc, physical_ms: int) -> int:
    """How far `remote` runs ahead of the local physical clock (0 if it does not)."""
    return max(0, remote.wall_ms - physical_ms)
