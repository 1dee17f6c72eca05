"""Per-app counters: requests by status class and latency percentiles (pure).

Latencies are kept in a ring of the last `WINDOW` requests per app, so a
record is an append and percentiles are computed only when status is read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 1024


@dataclass(slots=True)
class AppStats:
    by_class: list[int] = field(default_factory=lambda: [0] * 6)  # index 1..5: 1xx..5xx
    router_errors: int = 0
    retries: int = 0
    codes: dict[str, int] = field(default_factory=dict)  # router log lines by code (logline)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


class Stats:
    def __init__(self) -> None:
        self.apps: dict[str, AppStats] = {}

    def app(self, name: str) -> AppStats:
        s = self.apps.get(name)
        if s is None:
            s = self.apps[name] = AppStats()
        return s

    def record(self, app: str, status: int, seconds: float, by_router: bool = False) -> None:
        s = self.apps.get(app) or self.app(app)  # (once per request: no call when known)
        c = status // 100
        s.by_class[c if 1 <= c <= 5 else (1 if c < 1 else 5)] += 1
        s.latencies.append(seconds)
        if by_router:
            s.router_errors += 1

    def retried(self, app: str) -> None:
        self.app(app).retries += 1

    def logged(self, app: str, code: str) -> None:
        codes = self.app(app).codes
        codes[code] = codes.get(code, 0) + 1

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name in sorted(self.apps):
            s = self.apps[name]
            lat = sorted(s.latencies)
            out[name] = {
                "requests": {f"{i}xx": s.by_class[i] for i in range(1, 6)},
                "router_errors": s.router_errors,
                "retries": s.retries,
                "codes": dict(sorted(s.codes.items())),
                "latency_ms": {
                    f"p{int(q * 100)}": round(percentile(lat, q) * 1000, 3)
                    for q in (0.5, 0.9, 0.99)
                },
            }
        return out
