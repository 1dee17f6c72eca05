#!/usr/bin/env python3
"""How long a route or backend change takes to reach every node's router.

A 3-node cluster on loopback runs one app with web=1. Each round adds an HTTP
route through node 1's API, then polls every node's router (every 5 ms) until it
answers 200 for the new domain; then deletes the route and polls until every
router answers 404. A backend round scales web 1 → 2 and waits until every
router has spread requests over both jobs. Printed: p50/p99/max of "the change
acknowledged → the last node's router serves it", and the ratio to the issue's
target of 1 s (below 1 is better). The competitor is the target: no other proxy
reconfigures from a replicated state.

    .venv/bin/python scripts/bench/route_propagation.py [ROUNDS]     (default 20)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import Cluster
from tests.jobs_app import deploy, make_slug, scale, wait_up

TARGET_S = 1.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def until_every_router(agents: list, host: str, want: int, timeout: float = 10.0) -> float:  # type: ignore[type-arg]
    start = time.monotonic()
    pending = set(range(len(agents)))
    async with httpx.AsyncClient(timeout=2) as c:
        while pending:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{host}: routers {sorted(pending)} never answered {want}")
            for i in sorted(pending):
                r = await c.get(f"http://{agents[i].addr}:8080/", headers={"Host": host})
                if r.status_code == want:
                    pending.discard(i)
            await trio.sleep(0.005)
    return time.monotonic() - start


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="f2p-bench-routes-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            agents = await cluster.start(3, timeout=60)
            await cluster.wait_converged(agents, alive=3, timeout=120)
            slug, digest = make_slug(Path(tmp) / "app.tgz")
            async with agents[0].client() as c:
                await deploy(c, "bench", slug, digest)
                await scale(c, "bench", web=1)
                await wait_up(c, "bench", 1, timeout=60)
                adds, deletes = [], []
                for i in range(rounds):
                    domain = f"r{i}.bench.test"
                    r = await c.post("/v1/apps/bench/routes", json={"type": "http", "domain": domain})
                    r.raise_for_status()
                    adds.append(await until_every_router(agents, domain, 200))
                    r = await c.delete(f"/v1/apps/bench/routes/{r.json()['route']['id']}")
                    r.raise_for_status()
                    deletes.append(await until_every_router(agents, domain, 404))
                await scale(c, "bench", web=2)
                t0 = time.monotonic()
                await wait_up(c, "bench", 2, timeout=60)
                up = time.monotonic() - t0

                async def spread(a: object) -> bool:
                    async with httpx.AsyncClient(timeout=2) as h:
                        bodies = set()
                        for _ in range(20):
                            resp = await h.get(f"http://{a.addr}:8080/", headers={"Host": "bench.flynnp2p.localhost"})  # type: ignore[attr-defined]
                            bodies.add(resp.text.split()[0])
                        return len(bodies) == 2

                t1 = time.monotonic()
                for a in agents:
                    while not await spread(a):  # noqa: ASYNC110 (polling the routers is the measurement)
                        await trio.sleep(0.005)
                backend_s = time.monotonic() - t1
        finally:
            cluster.kill_all()
    for name, values in (("route added", adds), ("route deleted", deletes)):
        p50, p99 = pct(values, 0.5), pct(values, 0.99)
        print(f"{name:14s} → every router: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"max {max(values) * 1000:.0f} ms over {len(values)} rounds; p99 / 1 s target = {p99 / TARGET_S:.2f}")
    print(f"new backend    → every router spreads over it {backend_s * 1000:.0f} ms after its job "
          f"reports up ({up:.1f} s to start it); / 1 s target = {backend_s / TARGET_S:.2f}")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 20)
