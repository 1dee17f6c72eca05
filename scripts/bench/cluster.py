#!/usr/bin/env python3
"""Cluster benchmark: convergence, leader failover, agent footprint.

For N agents on loopback (127.0.20.x …): time from the first start (and from the
moment every agent answers /healthz) until every node sees N alive members and
one leader; time from SIGKILL of the leader (agent
and serf) until the survivors agree on a new leader; agent RSS (without serf)
and idle CPU over 10 s.  The competitor is bare serf: the same N serf agents
joined by hand, time until every one lists N alive members; the ratio is ours /
bare serf.

    .venv/bin/python scripts/bench/cluster.py [N ...]      (default 5 10 20)
"""

from __future__ import annotations

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
        pids = [a.proc.pid for a in agents if a.proc]
        before = [proc_stats(p) for p in pids]
        await trio.sleep(10)
        after = [proc_stats(p) for p in pids]
        rss = max(r for r, _ in after) / 2**20
        cpu = max((a[1] - b[1]) / 10 * 100 for a, b in zip(after, before, strict=True))
        status = await agents[0].status()
        assert status is not None
        leader = next(a for a in agents if a.name == status["leader"]["name"])
        old_epoch = status["leader"]["epoch"]
        leader.kill()
        t1 = time.monotonic()
        rest = [a for a in agents if a is not leader]

        async def agreed() -> bool:
            sts = [await a.status() for a in rest]
            views = {(s["leader"]["name"], s["leader"]["epoch"]) for s in sts if s}
            if None in sts or len(views) != 1:
                return False
            name, epoch = views.pop()
            return name not in (None, leader.name) and epoch > old_epoch

        await wait_for(agreed, 60, "a new leader", interval=0.05)
        failover = time.monotonic() - t1
        return {"converged_s": converged, "after_ready_s": after_ready, "failover_s": failover, "rss_mb": rss, "idle_cpu_pct": cpu}
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
    sizes = [int(a) for a in sys.argv[1:]] or [5, 10, 20]
    print(f"{'N':>3}  {'converged':>9}  {'all ready→converged':>19}  {'bare serf':>9}  {'ratio':>5}  {'new leader':>10}  "
          f"{'agent RSS':>9}  {'idle CPU':>8}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            ours = await bench_ours(n, Path(d))
        with tempfile.TemporaryDirectory() as d:
            bare = await bench_bare_serf(n, Path(d))
        print(f"{n:>3}  {ours['converged_s']:>8.2f}s  {ours['after_ready_s']:>18.2f}s  {bare:>8.2f}s  {ours['converged_s'] / bare:>5.1f}  "
              f"{ours['failover_s']:>9.2f}s  {ours['rss_mb']:>7.1f}MB  {ours['idle_cpu_pct']:>7.2f}%",
              flush=True)
    print("targets: converged <= 2 s at N=10, new leader <= 10 s, agent RSS <= 60 MB, idle CPU <= 1 %")


if __name__ == "__main__":
    trio.run(main)
