#!/usr/bin/env python3
"""What a node's clients see when its only router worker dies (``--router-workers 1``).

One real agent on loopback runs the test app at web=1. Each round, four client
loops open a new connection per request through the node's router
(`tests.restart_probe`), the router worker (its pid from ``/v1/router/status``)
is SIGKILLed, and the loops go on until the agent has a new worker answering
and 0.5 s more. Each kill is of a worker past `HEALTHY_AFTER_S` (a younger one's
replacement waits out a back-off: that is another figure). Per round: requests refused (the kernel found no listener),
requests that failed after connecting (in flight on the killed worker), and the
gap: SIGKILL → the first 200 of a request started after it. Printed per round
and as medians and max.

    .venv/bin/python scripts/bench/router_restart.py [ROUNDS]     (default 10)
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flynnp2p.router.workers import HEALTHY_AFTER_S
from tests.harness import AgentProc, Cluster, wait_for
from tests.jobs_app import deploy, make_slug, scale, wait_up
from tests.restart_probe import Tally, hammer, request_once

HOST = "bench.flynnp2p.localhost"


async def worker_pid(agent: AgentProc) -> int | None:
    async with agent.client() as c:
        (w,) = (await c.get("/v1/router/status")).json()["workers"]
        return w["pid"] if w["answered"] else None


async def one_round(agent: AgentProc, born: float) -> tuple[dict[str, int], float, float]:
    await trio.sleep_until(trio.current_time() + max(0.0, born + HEALTHY_AFTER_S + 0.5 - time.monotonic()))
    victim = await worker_pid(agent)
    assert victim is not None
    tally = Tally()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hammer, agent.addr, 8080, HOST, tally)
        await trio.sleep(0.5)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            return (await worker_pid(agent)) not in (None, victim)

        await wait_for(replaced, 30, "a new router worker")
        born = time.monotonic()
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    gap = tally.first_ok_after(killed)
    assert gap is not None
    return tally.counts(), gap, born


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="f2p-bench-restart-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            (agent,) = await cluster.start(1, timeout=60)
            slug, digest = make_slug(Path(tmp) / "app.tgz")
            async with agent.client() as c:
                await deploy(c, "bench", slug, digest)
                await scale(c, "bench", web=1)
                await wait_up(c, "bench", 1, timeout=60)

            async def served() -> bool:
                return await request_once(agent.addr, 8080, HOST) == "ok"

            await wait_for(served, 20, "the router to serve the app")
            born = time.monotonic()  # (at the latest)
            gaps: list[float] = []
            totals = {"ok": 0, "refused": 0, "failed": 0, "other": 0}
            for rnd in range(rounds):
                counts, gap, born = await one_round(agent, born)
                gaps.append(gap)
                totals = {k: totals[k] + counts[k] for k in totals}
                print(f"round {rnd + 1:2}: gap {gap * 1000:7.1f} ms  ok {counts['ok']:5}  refused "
                      f"{counts['refused']:4}  failed in flight {counts['failed']:3}  other {counts['other']}",
                      flush=True)  # fmt: skip
            print(f"\n{rounds} SIGKILLs of the only router worker, 4 client loops, a new connection per "
                  f"request: gap SIGKILL -> first 200 p50 {statistics.median(gaps) * 1000:.1f} ms, "
                  f"max {max(gaps) * 1000:.1f} ms; refused {totals['refused']}, failed in flight "
                  f"{totals['failed']}, other {totals['other']}, ok {totals['ok']}")  # fmt: skip
        finally:
            cluster.kill_all()


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 10)
