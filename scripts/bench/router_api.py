#!/usr/bin/env python3
"""Does a saturated router stall the agent's API? (issue 10, item 9)

One real agent (``flynnp2p join``, process backend) on loopback runs one app
whose web job is nginx (``return 200``, one process), so the backend is never
the bottleneck. The agent's process tree (agent, serf, etcd, router workers) is
pinned to core 0; the nginx job, wrk and the API client to core 1. The client
sends ``GET /v1/status`` and ``GET /v1/apps`` alternately over one keep-alive
connection, 20 ms apart, and records each latency, in three phases:

- ``idle``: nothing else runs;
- ``core 1 busy``: wrk saturates the backend directly (the client's own core is
  loaded as much as in the next phase, the agent's core is not) — the control;
- ``router saturated``: wrk ``-t2 -c64`` through the agent's router.

Printed: p50/p99/max per phase and endpoint, and the router's req/s. The target
is API p99 ≤ 100 ms while the router is saturated.

    .venv/bin/python scripts/bench/router_api.py [--duration 15] [--workers N]

``--workers N`` passes ``--router-workers N`` to the agent (omitted: the
agent's default). Installs ``nginx`` and ``wrk`` when missing; every process
started here is stopped by its PID (the agent's process group at the end).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from router import ensure_tools, parse_wrk  # scripts/bench/router.py

from tests.harness import AgentProc, Cluster
from tests.jobs_app import deploy, make_slug, scale, wait_up

AGENT_CORE, OTHER_CORE = "0", "1"
APP = "bench"
HOST_HEADER = f"{APP}.flynnp2p.localhost"

# The web job: nginx in the foreground, one process, on $PORT, files in a temp dir.
NGINX_PROCFILE = (
    b"web: sh -c 'd=$(mktemp -d); printf \"daemon off; master_process off; worker_processes 1; "
    b"pid $d/pid; error_log $d/err warn; events { worker_connections 4096; } "
    b"http { access_log off; client_body_temp_path $d/b; proxy_temp_path $d/p; "
    b"fastcgi_temp_path $d/f; uwsgi_temp_path $d/u; scgi_temp_path $d/s; "
    b"server { listen $PORT backlog=4096; keepalive_requests 1000000; "
    b'location / { return 200 \\"hello world\\\\n\\"; } } }" > $d/conf; '
    b"exec /usr/sbin/nginx -p $d -c $d/conf'\n"
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def pin(pids: list[int], core: str) -> None:
    for pid in pids:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", core, str(pid)], capture_output=True, check=False
        )


def pids_where(field: int, value: int) -> list[int]:
    """Processes whose /proc stat `field` (after the name: 2 = pgrp, 3 = session) is `value`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[field]) == value:
                out.append(int(d.name))
    return out


def api_probe(url: str, token: str, stop: threading.Event) -> dict[str, list[float]]:
    os.sched_setaffinity(0, {int(OTHER_CORE)})
    lat: dict[str, list[float]] = {"/v1/status": [], "/v1/apps": []}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
        while not stop.is_set():
            for path, values in lat.items():
                t = time.perf_counter()
                r = c.get(path)
                values.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
                time.sleep(0.02)
    return lat


def phase(
    agent: AgentProc, wrk_target: str | None, duration: int
) -> tuple[dict[str, list[float]], float]:
    stop = threading.Event()
    result: dict[str, dict[str, list[float]]] = {}
    t = threading.Thread(
        target=lambda: result.update(lat=api_probe(agent.url, agent.token.api_key, stop))
    )
    t.start()
    rps = 0.0
    try:
        if wrk_target is None:
            time.sleep(duration)
        else:
            cmd = ["taskset", "-c", OTHER_CORE, "wrk", "-t2", "-c64", f"-d{duration}s", "--latency",
                   "-H", f"Host: {HOST_HEADER}", wrk_target]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            parsed = parse_wrk(out)
            rps = parsed["rps"]
            if parsed["errors"] or parsed["socket_errors"]:
                print(f"  wrk errors: {parsed['errors']:.0f} non-2xx/3xx; socket errors: "
                      f"{'yes' if parsed['socket_errors'] else 'no'}")  # fmt: skip
    finally:
        stop.set()
        t.join()
    return result["lat"], rps


async def start(root: Path, workers: int | None) -> tuple[Cluster, AgentProc, str]:
    cluster = Cluster(root)
    agent = cluster.add()
    agent.start(extra=[] if workers is None else ["--router-workers", str(workers)])
    await agent.wait_ready(60)
    await cluster.wait_coord(timeout=60)
    assert agent.proc is not None
    slug, digest = make_slug(root / "app.tgz", NGINX_PROCFILE)
    async with agent.client() as c:
        await deploy(c, APP, slug, digest)
        await scale(c, APP, web=1)
        (job,) = await wait_up(c, APP, 1, timeout=60)
    return cluster, agent, job["address"]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    ensure_tools((("nginx", "nginx"), ("wrk", "wrk")), stream=False)
    with tempfile.TemporaryDirectory(prefix="f2p-bench-router-api-") as tmp:
        cluster, agent, backend = trio.run(start, Path(tmp), args.workers)
        try:
            assert agent.proc is not None
            jobs = set(agent.job_groups().values())
            pin(pids_where(3, agent.proc.pid), AGENT_CORE)  # the agent's session: agent, serf, etcd
            pin([p for g in jobs for p in pids_where(2, g)], OTHER_CORE)  # then its jobs' groups
            router = f"http://{agent.addr}:8080/"
            phases = [
                ("idle", None),
                ("core 1 busy", f"http://{backend}/"),
                ("router saturated", router),
            ]
            print(f"agent {agent.url}, router workers: {args.workers if args.workers is not None else 'default'}; "
                  f"{args.duration}s per phase; API client, wrk and the nginx job on core {OTHER_CORE}, "
                  f"the agent's tree on core {AGENT_CORE}")  # fmt: skip
            print(
                f"{'phase':18}{'endpoint':12}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'wrk req/s':>11}"
            )
            for name, target in phases:
                lat, rps = phase(agent, target, args.duration)
                for path, values in lat.items():
                    print(f"{name:18}{path:12}{len(values):>6}{pct(values, 0.5) * 1e3:>9.1f}"
                          f"{pct(values, 0.99) * 1e3:>9.1f}{max(values) * 1e3:>9.1f}"
                          f"{rps:>11.0f}", flush=True)  # fmt: skip
        finally:
            cluster.kill_all()


if __name__ == "__main__":
    main()
