"""Backend choice (power of two choices on in-flight counts) and passive health (pure).

This node's view only: `Balancer` counts the requests and connections it has in
flight to each backend address and remembers the addresses that refused or
timed out on connect, skipping them until ``now`` passes their mark. Time and
randomness are the caller's (``now``, ``rng``), so choices replay in tests.

When every candidate is marked down, the marks are ignored: trying a backend
that may have come back beats answering 503 for a few seconds.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from flynnp2p.router.table import Backend


class Balancer:
    def __init__(self, rng: random.Random, skip_seconds: float = 5.0) -> None:
        self.rng = rng
        self.skip_seconds = skip_seconds
        self.in_flight: dict[str, int] = {}
        self.down_until: dict[str, float] = {}

    def choose(
        self, backends: Sequence[Backend], now: float, exclude: Collection[str] = ()
    ) -> Backend | None:
        live: Sequence[Backend] = backends  # (read only: no copy without marks or exclusions)
        if self.down_until or exclude:
            live = [
                b for b in backends
                if b.address not in exclude and self.down_until.get(b.address, 0.0) <= now
            ]  # fmt: skip
            if not live:
                live = [b for b in backends if b.address not in exclude]
        if len(live) <= 1:
            return live[0] if live else None
        a, b = self.rng.sample(live, 2)
        counts = self.in_flight
        return a if counts.get(a.address, 0) <= counts.get(b.address, 0) else b

    def usable(self, address: str, now: float) -> bool:
        """Not skipped for a failed connect right now."""
        return self.down_until.get(address, 0.0) <= now

    def acquire(self, address: str) -> None:
        self.in_flight[address] = self.in_flight.get(address, 0) + 1

    def release(self, address: str) -> None:
        n = self.in_flight.get(address, 0) - 1
        if n > 0:
            self.in_flight[address] = n
        else:
            self.in_flight.pop(address, None)

    def mark_down(self, address: str, now: float) -> None:
        self.down_until[address] = now + self.skip_seconds

    def expire(self, now: float) -> None:
        for address in [a for a, t in self.down_until.items() if t <= now]:
            del self.down_until[address]

    def status(self, now: float) -> dict[str, object]:
        return {
            "in_flight": dict(sorted(self.in_flight.items())),
            "skipped": {a: round(t - now, 3) for a, t in sorted(self.down_until.items()) if t > now},
        }
