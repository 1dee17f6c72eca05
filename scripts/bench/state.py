#!/usr/bin/env python3
"""Replicated-state benchmark.

1. Propagation: N agents (3, 10); a write on one node until it is visible on all
   N, seen through every node's /v1/events stream; p50/p99 over 200 writes.
2. Acknowledged writes/s on one node of 3, durability on (committed here and on
   at least one peer), 16 and 64 concurrent clients for 10 s each.  Competitor in the same
   run: a 3-member etcd cluster (Debian's etcd-server) on loopback, the same
   clients writing through its JSON gateway; the ratio is ours / etcd.
3. Full copy: a node joining a cluster that holds 100,000 records, from its
   start until it holds them all.

    .venv/bin/python scripts/bench/state.py [--quick] [--writes-only]
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import msgpack
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flynnp2p.peering import Peer
from flynnp2p.state.hlc import Hlc
from flynnp2p.state.merge import Delta, Entry
from flynnp2p.state.records import App
from flynnp2p.state.service import StateService
from flynnp2p.state.store import SqliteStore
from flynnp2p.state.wire import envelope
from tests.harness import AgentProc, Cluster, wait_for

CLIENT_COUNTS = (16, 64)
DURATION_S = 10.0


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def propagation(n: int, writes: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        cluster = Cluster(Path(d))
        try:
            agents = await cluster.start(n, timeout=60)
            await cluster.wait_converged(agents, alive=n, timeout=60)
            async with agents[0].client() as c:
                r = await c.post("/v1/apps", json={"name": "bench"})
                assert r.status_code == 201, r.text
            seen: dict[str, dict[str, float]] = {a.name: {} for a in agents}

            async def watch(agent: AgentProc, task_status: trio.TaskStatus[None]) -> None:
                async with agent.client() as c, c.stream(
                    "GET", "/v1/events", params={"kinds": "app"}, timeout=None
                ) as resp:
                    task_status.started()
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            data = json.loads(line[5:])
                            mark = ((data.get("value") or {}).get("meta") or {}).get("mark")
                            if mark:
                                seen[agent.name].setdefault(mark, time.monotonic())

            latencies = []
            async with trio.open_nursery() as nursery:
                for a in agents:
                    await nursery.start(watch, a)
                async with agents[0].client() as c:
                    for i in range(writes):
                        mark = f"m{i}"
                        t0 = time.monotonic()
                        r = await c.patch("/v1/apps/bench", json={"meta": {"mark": mark}})
                        assert r.status_code == 200, r.text
                        await wait_for(lambda m=mark: all(m in s for s in seen.values()), 10,
                                       f"write {mark} everywhere", interval=0.002)
                        latencies.append(max(s[mark] for s in seen.values()) - t0)
                nursery.cancel_scope.cancel()
            return pct(latencies, 50), pct(latencies, 99)
        finally:
            cluster.kill_all()


async def hammer(post: object, duration: float, clients: int) -> int:
    done = 0

    async def worker(i: int) -> None:
        nonlocal done
        k = 0
        while True:
            await post(i, k)  # type: ignore[operator]
            done += 1
            k += 1

    with trio.move_on_after(duration):
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(worker, i)
    return done


async def ours_writes_per_s(clients: int) -> tuple[float, float | None]:
    with tempfile.TemporaryDirectory() as d:
        cluster = Cluster(Path(d))
        try:
            agents = await cluster.start(3)
            await cluster.wait_converged(agents, alive=3)
            limits = httpx.Limits(max_connections=clients)
            async with httpx.AsyncClient(base_url=agents[0].url, limits=limits, timeout=30, headers={
                "Authorization": f"Bearer {cluster.token.api_key}"}) as c:
                r = await c.post("/v1/apps", json={"name": "bench"})
                assert r.status_code == 201, r.text

                async def post(i: int, k: int) -> None:
                    r = await c.patch("/v1/apps/bench", json={"meta": {f"c{i}": str(k)}})
                    assert r.status_code == 200 and r.json()["replicas"] >= 2, r.text

                python_rate = await hammer(post, DURATION_S, clients) / DURATION_S
            wrk = await wrk_rate(f"{agents[0].url}/v1/apps/bench", "PATCH", '{"meta": {"k": "v"}}',
                                 clients, cluster.token.api_key)
            return python_rate, wrk
        finally:
            cluster.kill_all()


class _TwoPeers:
    def __init__(self, agents: list[AgentProc]) -> None:
        self.agents = agents

    def alive_peers(self) -> list[Peer]:
        return [Peer(a.name, f"{a.addr}:{a.api_port}") for a in self.agents]

    def electorate(self) -> list[str]:
        return [a.name for a in self.agents]

    async def send_hint(self, payload: bytes) -> None:
        return None

    @asynccontextmanager
    async def hints(self) -> AsyncIterator[AsyncIterator[bytes]]:
        async def nothing() -> AsyncIterator[bytes]:
            await trio.sleep_forever()
            yield b""

        yield nothing()


WRK_SCRIPT = """
wrk.method = "{method}"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
{auth}
"""


async def wrk_rate(url: str, method: str, body: str, clients: int, token: str | None = None) -> float | None:
    """Requests/s that wrk (C, not Python) gets through ``url``; None without wrk.
    Every request must answer 2xx (checked from wrk's "Non-2xx" line)."""
    if not shutil.which("wrk"):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        auth = f'wrk.headers["Authorization"] = "Bearer {token}"' if token else ""
        f.write(WRK_SCRIPT.format(method=method, body=body, auth=auth))
    out = await trio.run_process(
        ["wrk", "-t2", f"-c{clients}", f"-d{DURATION_S:.0f}s", "-s", f.name, url],
        capture_stdout=True, check=True,
    )
    text = out.stdout.decode()
    if "Non-2xx" in text:
        raise AssertionError(f"wrk saw errors:\n{text}")
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("Requests/sec")))


async def state_layer_writes_per_s(clients: int) -> float:
    """The replicated write path without the public HTTP API: StateService.write
    in this process (SQLite, synchronous=FULL), pushed to two real agents."""
    with tempfile.TemporaryDirectory() as d:
        cluster = Cluster(Path(d))
        try:
            agents = await cluster.start(2)
            await cluster.wait_converged(agents, alive=2)
            store = SqliteStore(Path(d) / "bench-node", "bench")
            async with httpx.AsyncClient(
                headers={"Authorization": f"Bearer {cluster.token.peer_key}"}, timeout=10
            ) as http:  # the peers' endpoints take the peer credential
                service = StateService(store, _TwoPeers(agents), http, lambda: int(time.time() * 1000))
                async with trio.open_nursery() as nursery:
                    await nursery.start(service.run)

                    async def post(i: int, k: int) -> None:
                        app = App(id=f"a{i}", name=f"app-{i}", created_at=k + 1)
                        result = await service.write([app])
                        assert result.replicas == 3

                    rate = await hammer(post, DURATION_S, clients) / DURATION_S
                    nursery.cancel_scope.cancel()
            store.close()
            return rate
        finally:
            cluster.kill_all()


async def etcd_writes_per_s(clients: int) -> tuple[float, float | None] | None:
    if not shutil.which("etcd"):
        return None
    with tempfile.TemporaryDirectory() as d:
        names = [f"e{i}" for i in range(3)]
        addrs = [f"127.0.22.{i + 2}" for i in range(3)]
        initial = ",".join(f"{n}=http://{a}:2380" for n, a in zip(names, addrs, strict=True))
        procs = [
            subprocess.Popen(
                ["etcd", "--name", n, "--data-dir", f"{d}/{n}",
                 "--listen-peer-urls", f"http://{a}:2380", "--initial-advertise-peer-urls", f"http://{a}:2380",
                 "--listen-client-urls", f"http://{a}:2379", "--advertise-client-urls", f"http://{a}:2379",
                 "--initial-cluster", initial, "--initial-cluster-state", "new"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for n, a in zip(names, addrs, strict=True)
        ]
        try:
            limits = httpx.Limits(max_connections=clients)
            async with httpx.AsyncClient(base_url=f"http://{addrs[0]}:2379", limits=limits, timeout=30) as c:

                async def healthy() -> bool:
                    try:
                        return (await c.get("/health")).json().get("health") == "true"
                    except (httpx.HTTPError, ValueError):
                        return False

                await wait_for(healthy, 30, "etcd cluster health")

                async def post(i: int, k: int) -> None:
                    body = {"key": base64.b64encode(f"c{i}".encode()).decode(),
                            "value": base64.b64encode(str(k).encode()).decode()}
                    r = await c.post("/v3/kv/put", json=body)
                    assert r.status_code == 200, r.text

                python_rate = await hammer(post, DURATION_S, clients) / DURATION_S
            wrk = await wrk_rate(f"http://{addrs[0]}:2379/v3/kv/put", "POST",
                                 '{"key": "Zm9v", "value": "YmFy"}', clients)
            return python_rate, wrk
        finally:
            for p in procs:
                p.kill()
                p.wait()


async def full_copy(records: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        cluster = Cluster(Path(d))
        try:
            (seed,) = await cluster.start(1)
            now = int(time.time() * 1000)
            async with seed.client() as c:
                for start in range(0, records, 5000):
                    entries = tuple(
                        Entry("app", f"id{i}", App(id=f"id{i}", name=f"app-{i}", created_at=now),
                              Hlc(now, i), "bench/seed", i + 1)
                        for i in range(start, min(records, start + 5000))
                    )
                    delta = Delta(entries, {}, {}, False)
                    r = await c.post("/v1/internal/state/push", content=msgpack.packb(envelope(delta)),
                                     headers={"Content-Type": "application/x-msgpack",
                                              "Authorization": f"Bearer {cluster.token.peer_key}"},
                                     timeout=120)
                    assert r.status_code == 200, r.text
            t0 = time.monotonic()
            (new,) = await cluster.start(1, timeout=120)

            async def has_all() -> bool:
                s = await new.status()
                return bool(s and s["components"]["state"]["records"] >= records)

            await wait_for(has_all, 120, "the full copy", interval=0.05)
            return time.monotonic() - t0
        finally:
            cluster.kill_all()


async def main() -> None:
    quick = "--quick" in sys.argv
    for n in () if "--writes-only" in sys.argv else (3,) if quick else (3, 10):
        p50, p99 = await propagation(n, 50 if quick else 200)
        print(f"propagation N={n}: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (target p99 <= 1 s at N=10)",
              flush=True)
    for clients in CLIENT_COUNTS:
        ours, ours_wrk = await ours_writes_per_s(clients)
        layer = await state_layer_writes_per_s(clients)
        etcd_rates = await etcd_writes_per_s(clients)
        etcd, etcd_wrk = etcd_rates if etcd_rates else (None, None)
        print(f"-- {clients} concurrent clients", flush=True)

        def line(what: str, value: float | None, other: float | None) -> None:
            if value is None:
                return
            ratio = f", ratio to etcd {value / other:.2f}" if other else ""
            print(f"{what}: {value:.0f}/s{ratio}", flush=True)

        line("etcd 3.4, 3 members, JSON gateway, Python clients", etcd, None)
        line("etcd 3.4, 3 members, JSON gateway, wrk", etcd_wrk, None)
        line("ours, PATCH /v1/apps/X on one node of 3, Python clients", ours, etcd)
        line("ours, PATCH /v1/apps/X on one node of 3, wrk", ours_wrk, etcd_wrk)
        line("ours, state layer (StateService.write, 3 replicas; target >= 1000/s)", layer, etcd)
    if "--writes-only" in sys.argv:
        return
    secs = await full_copy(20_000 if quick else 100_000)
    print(f"full copy of {20_000 if quick else 100_000} records to a new node: {secs:.2f} s (target <= 10 s)")


if __name__ == "__main__":
    trio.run(main)
