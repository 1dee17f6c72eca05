#!/usr/bin/env python3
"""Cluster benchmark: convergence, leader failover, footprint, unique creates.

For N agents on loopback (127.0.20.x …): time from the first start (and from the
moment every agent answers /healthz) until every node sees N alive members and
one leader (etcd settled: its voters promoted); time from SIGKILL of the leader
(agent, serf and etcd) until a survivor acts as the new leader; RSS and idle CPU
over 10 s of one node's agent + serf + etcd; latency of 200 unique creates
(``POST /v1/apps``, through a follower and on the leader) against the same
number of compare-and-create transactions sent straight to etcd (the floor).
The competitor for convergence is bare serf: the same N serf agents joined by
hand, time until every one lists N alive members; the ratio is ours / bare serf.

    .venv/bin/python scripts/bench/cluster.py [N ...]      (default 5 10 20)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import Cluster, wait_for


def node_pids(agent: object) -> list[int]:
    """The agent's pid and its serf's and etcd's (from their pid files)."""
    pids = [agent.proc.pid]  # type: ignore[attr-defined]
    for name in ("serf.pid", "etcd.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int((agent.data_dir / name).read_text()))  # type: ignore[attr-defined]
    return pids


def node_stats(agent: object) -> tuple[int, float]:
    stats = [proc_stats(p) for p in node_pids(agent)]
    return sum(r for r, _ in stats), sum(c for _, c in stats)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_creates(agents: list, n: int = 200) -> dict[str, float]:  # type: ignore[type-arg]
    import base64
    import uuid

    import httpx

    status = await agents[0].status()
    leader = next(a for a in agents if a.name == status["leader"]["name"])
    follower = next(a for a in agents if a is not leader)
    out: dict[str, float] = {}
    for label, agent in (("follower", follower), ("leader", leader)):
        lat = []
        async with agent.client() as c:
            for _ in range(n):
                t = time.perf_counter()
                r = await c.post("/v1/apps", json={"name": f"b-{uuid.uuid4().hex[:12]}"})
                lat.append(time.perf_counter() - t)
                assert r.status_code == 201, r.text
        out[f"{label}_p50_ms"], out[f"{label}_p99_ms"] = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
    url = f"http://{leader.addr}:2379"
    lat = []
    async with httpx.AsyncClient(base_url=url) as c:
        for _ in range(n):
            key = base64.b64encode(f"bench/{uuid.uuid4().hex}".encode()).decode()
            body = {"compare": [{"key": key, "target": "CREATE", "createRevision": "0"}],
                    "success": [{"requestPut": {"key": key, "value": key}}]}
            t = time.perf_counter()
            r = await c.post("/v3/kv/txn", json=body)
            lat.append(time.perf_counter() - t)
            assert r.status_code == 200
    out["etcd_p50_ms"], out["etcd_p99_ms"] = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
    return out


def proc_stats(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of one process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


async def bench_ours(n: int, root: Path) -> dict[str, float]:
    cluster = Cluster(root)
    try:
        t0 = time.monotonic()
        agents = await cluster.start(n, timeout=60)
        ready = time.monotonic()
        await cluster.wait_converged(agents, alive=n, timeout=120)
        converged = time.monotonic() - t0
        after_ready = time.monotonic() - ready
        await trio.sleep(3)  # let start-up settle before measuring idle use
        before = [node_stats(a) for a in agents]
        await trio.sleep(10)
        after = [node_stats(a) for a in agents]
        rss = max(r for r, _ in after) / 2**20
        cpu = max((a[1] - b[1]) / 10 * 100 for a, b in zip(after, before, strict=True))
        creates = await bench_creates(agents) if n == 3 or os.environ.get("BENCH_CREATES") else {}
        status = await agents[0].status()
        assert status is not None
        leader = next(a for a in agents if a.name == status["leader"]["name"])
        old_epoch = status["leader"]["epoch"]
        leader.kill()
        t1 = time.monotonic()
        rest = [a for a in agents if a is not leader]

        async def agreed() -> bool:
            sts = [await a.status() for a in rest]
            acting = [s for s in sts if s and s["node"]["is_leader"]]
            return len(acting) == 1 and acting[0]["leader"]["epoch"] > old_epoch

        await wait_for(agreed, 60, "a new leader", interval=0.05)
        failover = time.monotonic() - t1
        return {"converged_s": converged, "after_ready_s": after_ready, "failover_s": failover,
                "rss_mb": rss, "idle_cpu_pct": cpu, **creates}
    finally:
        cluster.kill_all()


async def bench_bare_serf(n: int, root: Path) -> float:
    procs = []
    try:
        t0 = time.monotonic()
        for i in range(n):
            addr = f"127.0.21.{i + 2}"
            cmd = ["serf", "agent", f"-node=s{i}", f"-bind={addr}:7946", f"-rpc-addr={addr}:7373",
                   "-profile=lan", "-log-level=warn"]
            if i:
                cmd.append("-join=127.0.21.2:7946")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if i == 0:
                await trio.sleep(0.3)

        def all_see_all() -> bool:
            for i in range(n):
                out = subprocess.run(["serf", "members", f"-rpc-addr=127.0.21.{i + 2}:7373",
                                      "-status=alive", "-format=json"], capture_output=True, text=True)
                if out.returncode or len(json.loads(out.stdout)["members"]) != n:
                    return False
            return True

        await wait_for(all_see_all, 120, "bare serf convergence", interval=0.05)
        return time.monotonic() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


async def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [3, 5, 10]
    print(f"{'N':>3}  {'converged':>9}  {'all ready→converged':>19}  {'bare serf':>9}  {'ratio':>5}  {'new leader':>10}  "
          f"{'node RSS':>9}  {'idle CPU':>8}  (node = agent + serf + etcd)")
    creates = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            ours = await bench_ours(n, Path(d))
        with tempfile.TemporaryDirectory() as d:
            bare = await bench_bare_serf(n, Path(d))
        print(f"{n:>3}  {ours['converged_s']:>8.2f}s  {ours['after_ready_s']:>18.2f}s  {bare:>8.2f}s  {ours['converged_s'] / bare:>5.1f}  "
              f"{ours['failover_s']:>9.2f}s  {ours['rss_mb']:>7.1f}MB  {ours['idle_cpu_pct']:>7.2f}%",
              flush=True)
        if "etcd_p50_ms" in ours:
            creates.append((n, ours))
    for n, c in creates:
        print(f"unique creates, N={n}: through a follower p50 {c['follower_p50_ms']:.1f} ms / p99 "
              f"{c['follower_p99_ms']:.1f} ms; on the leader p50 {c['leader_p50_ms']:.1f} / p99 "
              f"{c['leader_p99_ms']:.1f} ms; etcd txn alone p50 {c['etcd_p50_ms']:.1f} / p99 "
              f"{c['etcd_p99_ms']:.1f} ms (leader p99 ratio {c['leader_p99_ms'] / c['etcd_p99_ms']:.1f}x)")
    print("targets: new leader <= 5 s, unique create p99 <= 50 ms on 3 nodes, node RSS <= 120 MB, "
          "idle CPU <= 2 %")


if __name__ == "__main__":
    trio.run(main)
