#!/usr/bin/env python3
"""The router against nginx as a reverse proxy, per core, on loopback.

A small-response backend (nginx, ``return 200``) and wrk share core 1; the proxy
under test is pinned to core 0 (``taskset``; other tenants of the machine are not
kept off it, so compare the CPU µs per request more than req/s). In alternating rounds: backend
direct, nginx (1 worker, upstream keepalive), the flynnp2p router (one
process). ``wrk -t2 -c64`` and ``-c1``: req/s, p50/p99 latency, the proxy's
CPU µs per request (from /proc), and each as a ratio to nginx. Installs
``nginx`` and ``wrk`` with apt-get when missing. Every process started here is
stopped by its PID.

    .venv/bin/python scripts/bench/router.py [--rounds 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HOST = "127.0.0.1"
PROXY_CORE, OTHER_CORE = "0", "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("nginx", "nginx"), ("wrk", "wrk")) if not shutil.which(tool)
               and not Path(f"/usr/sbin/{tool}").exists()]  # fmt: skip
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_conf(root: Path, name: str, body: str) -> Path:
    conf = root / f"{name}.conf"
    conf.write_text(
        f"worker_processes 1;\ndaemon off;\nerror_log {root}/{name}.err warn;\npid {root}/{name}.pid;\n"
        f"events {{ worker_connections 4096; }}\n"
        f"http {{\n access_log off;\n client_body_temp_path {root}/{name}-body;\n"
        f" proxy_temp_path {root}/{name}-proxy;\n{body}\n}}\n"
    )  # fmt: skip
    return conf


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_wrk(out: str) -> dict[str, float]:
    def lat(q: str) -> float:
        m = re.search(rf"^\s*{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * _UNIT[m.group(2)] if m else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": float(total.group(1)) if total else 0.0,
        "p50": lat("50"), "p99": lat("99"),
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 1.0 if socket_errors else 0.0,
    }  # fmt: skip


def run_wrk(port: int, conns: int, duration: int) -> dict[str, float]:
    cmd = ["taskset", "-c", OTHER_CORE, "wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{duration}s",
           "--latency", "-H", "Host: bench.test", f"http://{HOST}:{port}/"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


ROUTER_MAIN = """
import sys, trio
from flynnp2p.router.service import Router
from flynnp2p.router.table import Backend, RouteSpec, RouteTable
from flynnp2p.watch import Watched
port, backend = int(sys.argv[1]), sys.argv[2]
table = RouteTable.build([RouteSpec(id="r", app_id="bench", type="http", domain="bench.test")],
                         {("bench", "web"): [Backend("j1", backend)]})
trio.run(Router(Watched(table), address="127.0.0.1", http_port=port).run)
"""


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    args = ap.parse_args()
    ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="bench-router-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        b_port, n_port, r_port = free_port(), free_port(), free_port()
        b_conf = nginx_conf(root, "backend", f' server {{ listen {HOST}:{b_port} backlog=4096; '
                            f'keepalive_requests 1000000; location / {{ return 200 "hello world\\n"; }} }}')  # fmt: skip
        n_conf = nginx_conf(root, "proxy", f" upstream b {{ server {HOST}:{b_port}; keepalive 64; }}\n"
                            f" server {{ listen {HOST}:{n_port} backlog=4096; keepalive_requests 1000000;\n"
                            "  location / { proxy_pass http://b; proxy_http_version 1.1;\n"
                            '   proxy_set_header Connection ""; } }')  # fmt: skip
        backend = subprocess.Popen(["taskset", "-c", OTHER_CORE, nginx_bin(), "-c", str(b_conf)])
        procs.append(backend)
        nginx = subprocess.Popen(["taskset", "-c", PROXY_CORE, nginx_bin(), "-c", str(n_conf)])
        procs.append(nginx)
        router = subprocess.Popen(
            ["taskset", "-c", PROXY_CORE, sys.executable, "-c", ROUTER_MAIN, str(r_port), f"{HOST}:{b_port}"],
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        procs.append(router)
        for port, proc in ((b_port, backend), (n_port, nginx), (r_port, router)):
            wait_port(port, proc)
        variants = {
            "backend direct": (b_port, []),
            "nginx proxy": (n_port, [nginx.pid, *children(nginx.pid)]),
            "flynnp2p router": (r_port, [router.pid]),
        }
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for conns in (64, 1):
                for name, (port, pids) in variants.items():
                    cpu0 = cpu_seconds(pids)
                    r = run_wrk(port, conns, args.duration)
                    cpu = cpu_seconds(pids) - cpu0
                    r["cpu_us"] = cpu / r["requests"] * 1e6 if pids and r["requests"] else float("nan")
                    results.setdefault((name, conns), []).append(r)
                    print(f"round {rnd + 1} c{conns:<3} {name:16} {r['rps']:9.0f} req/s  "
                          f"p50 {r['p50']:.3f} ms  p99 {r['p99']:.3f} ms  cpu {r['cpu_us']:.1f} us/req"
                          + ("  ERRORS" if r["errors"] or r["socket_errors"] else ""), flush=True)  # fmt: skip
        print(f"\nmedians over {args.rounds} rounds, wrk -t2 -d{args.duration}s, proxy pinned to core "
              f"{PROXY_CORE}, backend and wrk on core {OTHER_CORE}")  # fmt: skip
        print(f"{'variant':18}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu us/req':>12}"
              f"{'x nginx req/s':>15}{'x nginx p99':>13}")  # fmt: skip
        for conns in (64, 1):
            ref = results[("nginx proxy", conns)]
            ref_rps = statistics.median(r["rps"] for r in ref)
            ref_p99 = statistics.median(r["p99"] for r in ref)
            for name in variants:
                rs = results[(name, conns)]
                rps = statistics.median(r["rps"] for r in rs)
                p50 = statistics.median(r["p50"] for r in rs)
                p99 = statistics.median(r["p99"] for r in rs)
                cpu = statistics.median(r["cpu_us"] for r in rs)
                print(f"{name:18}{conns:>6}{rps:>10.0f}{p50:>9.3f}{p99:>9.3f}{cpu:>12.1f}"
                      f"{rps / ref_rps:>15.2f}{p99 / ref_p99:>13.2f}")  # fmt: skip
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
