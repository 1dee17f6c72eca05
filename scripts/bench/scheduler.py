#!/usr/bin/env python3
"""Scheduler core benchmark: placements per second of `plan()`.

1. Cold placement: 1,000 hosts (16 GiB each, a quarter tagged disk=ssd, 2% dead),
   100 apps x web=100 (256 MB each), nothing running yet: 10,000 jobs to place in
   one plan.
2. Steady state: the same cluster with those 10,000 jobs running and one app
   scaled up by 100: the cost of reconciling a busy cluster for a small change.

The target is >= 10,000 placements/s. The reference is Nomad's "C1M" run
(HashiCorp, 2015: 1,000,000 containers on 5,000 hosts in under five minutes),
taken as about 3,800 placements/s. That was a whole distributed system (many
schedulers, plan queue, Raft, real hosts) and this is one pure function in one
process, so the ratio compares orders of magnitude, not like with like.

    .venv/bin/python scripts/bench/scheduler.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flynnp2p.scheduler import Desired, Host, Inputs, JobInfo, Plan, plan

TARGET_PER_S = 10_000
NOMAD_C1M_PER_S = 3_800


def cluster(hosts: int) -> tuple[Host, ...]:
    return tuple(
        Host(
            f"n{i:04d}",
            alive=i % 50 != 7,
            tags={"disk": "ssd"} if i % 4 == 0 else {},
            memory_mb=16_384,
        )
        for i in range(hosts)
    )


def formation(apps: int, web: int) -> tuple[Desired, ...]:
    return tuple(
        Desired(
            f"app{a:03d}",
            "r1",
            "web",
            web,
            memory_mb=256,
            constraints={"disk": "ssd"} if a % 10 == 0 else {},
        )
        for a in range(apps)
    )


def running(p: Plan) -> tuple[JobInfo, ...]:
    return tuple(
        JobInfo(s.job_id, s.app, s.release, s.type, s.host, "up", 0, s.memory_mb) for s in p.starts
    )


def timed(inputs: Inputs, runs: int) -> tuple[float, Plan]:
    times, result = [], Plan()
    for seed in range(runs):
        t0 = time.perf_counter()
        result = plan(inputs, now_ms=1_000, seed=seed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    quick = "--quick" in sys.argv
    runs = 3 if quick else 7
    hosts, desired = cluster(1_000), formation(100, 100)

    cold_s, cold = timed(Inputs(hosts=hosts, desired=desired), runs)
    assert len(cold.starts) == 10_000 and not cold.blocked, cold.blocked[:1]
    cold_rate = len(cold.starts) / cold_s
    per_app_host = Counter((s.app, s.host) for s in cold.starts)
    spread_ok = max(per_app_host.values()) == 1  # 100 jobs of an app on 100 distinct hosts

    grown = tuple(
        Desired(d.app, d.release, d.type, d.count + 100, d.memory_mb, constraints=d.constraints)
        if d.app == "app001"
        else d
        for d in desired
    )
    busy = Inputs(hosts=hosts, desired=grown, jobs=running(cold))
    busy_s, delta = timed(busy, runs)
    assert len(delta.starts) == 100 and not delta.stops and not delta.blocked

    print(f"scheduler plan(), 1,000 hosts, median of {runs} runs")
    print(f"  cold: 10,000 placements in {cold_s * 1000:.0f} ms = {cold_rate:,.0f} placements/s")
    print(f"        every app on 100 distinct hosts: {'yes' if spread_ok else 'NO'}")
    print(f"  busy: 10,000 running + 100 to place in {busy_s * 1000:.0f} ms")
    print(
        f"  target >= {TARGET_PER_S:,}/s: {'met' if cold_rate >= TARGET_PER_S else 'MISSED'}"
        f" ({cold_rate / TARGET_PER_S:.1f}x)"
    )
    print(
        f"  reference: Nomad C1M ~{NOMAD_C1M_PER_S:,}/s; ratio ours/Nomad ="
        f" {cold_rate / NOMAD_C1M_PER_S:.1f}x"
    )


if __name__ == "__main__":
    main()
