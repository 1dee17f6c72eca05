#!/usr/bin/env python3
"""The router against nginx and haproxy, per core, on loopback.

A small-response backend (nginx, ``return 200``) and wrk share core 1; the proxy
under test is pinned to core 0 (``taskset``; other tenants of the machine are not
kept off it, so compare the CPU µs per request more than req/s). In alternating rounds: backend
direct, nginx (1 worker, upstream keepalive), haproxy (1 thread, connection
reuse), the flynnp2p router (one process). ``wrk -t2 -c64`` and ``-c1``: req/s,
p50/p99 latency, the proxy's CPU µs per request (from /proc), and each as a
ratio to nginx. Then:

- TCP bulk throughput (iperf3, one stream, the server on core 1): direct, nginx
  ``stream`` (1 worker) and the router's TCP route, Gbit/s and the proxy's CPU
  seconds per GB, as a ratio to nginx stream (a run iperf3 reports as failed is
  printed with its error and left out of the medians);
- RSS with 10,000 idle keep-alive client connections (each has made one
  request) against the router's RSS when idle; the target is at most 60 MB more
  (RLIMIT_NOFILE is raised for the bench and the router);
- route change → applied on every node of a 3-node cluster
  (``scripts/bench/route_propagation.py``, its rounds given by ``--propagation``).

Installs ``nginx`` (with its stream module), ``haproxy``, ``iperf3`` and ``wrk``
with apt-get when missing. Every process started here is stopped by its PID.

    .venv/bin/python scripts/bench/router.py [--rounds 3] [--duration 5]
        [--idle-conns 10000] [--propagation 10]     (0 skips a section)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HOST = "127.0.0.1"
PROXY_CORE, OTHER_CORE = "0", "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


TOOLS = (("nginx", "nginx"), ("wrk", "wrk"), ("haproxy", "haproxy"), ("iperf3", "iperf3"))
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def ensure_tools(tools: tuple[tuple[str, str], ...] = TOOLS, stream: bool = True) -> None:
    missing = [pkg for tool, pkg in tools if not shutil.which(tool)
               and not Path(f"/usr/sbin/{tool}").exists()]  # fmt: skip
    if stream and not STREAM_MODULE.exists():
        missing.append("libnginx-mod-stream")
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_conf(root: Path, name: str, body: str, stream: str | None = None) -> Path:
    conf = root / f"{name}.conf"
    head = f"load_module {STREAM_MODULE};\n" if stream is not None else ""
    conf.write_text(
        f"{head}worker_processes 1;\ndaemon off;\nerror_log {root}/{name}.err warn;\npid {root}/{name}.pid;\n"
        f"events {{ worker_connections 4096; }}\n"
        f"http {{\n access_log off;\n client_body_temp_path {root}/{name}-body;\n"
        f" proxy_temp_path {root}/{name}-proxy;\n{body}\n}}\n"
        + (f"stream {{\n{stream}\n}}\n" if stream is not None else "")
    )  # fmt: skip
    return conf


def haproxy_conf(root: Path, port: int, backend_port: int) -> Path:
    conf = root / "haproxy.cfg"
    conf.write_text(
        "global\n nbthread 1\n maxconn 8000\n"
        "defaults\n mode http\n timeout connect 5s\n timeout client 60s\n timeout server 60s\n"
        " option http-keep-alive\n"
        f"frontend f\n bind {HOST}:{port}\n default_backend b\n"
        f"backend b\n http-reuse always\n server s1 {HOST}:{backend_port}\n"
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


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


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
import resource, sys, trio
from flynnp2p.router.service import Router
from flynnp2p.router.table import Backend, RouteSpec, RouteTable
from flynnp2p.watch import Watched
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, backend, tcp_port, tcp_backend = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
table = RouteTable.build(
    [RouteSpec(id="r", app_id="bench", type="http", domain="bench.test"),
     RouteSpec(id="t", app_id="bench", type="tcp", port=tcp_port, process_type="tcp")],
    {("bench", "web"): [Backend("j1", backend)], ("bench", "tcp"): [Backend("j2", tcp_backend)]})
trio.run(Router(Watched(table), address="127.0.0.1", http_port=port).run)
"""


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_iperf(port: int, seconds: int) -> float | str:
    """Gbit/s received, one stream, the client on the other core; or, when the run
    failed, why (iperf3's own error text when it gave one)."""
    cmd = ["taskset", "-c", OTHER_CORE, "iperf3", "-c", HOST, "-p", str(port), "-t", str(seconds), "-J"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return iperf_result(done.returncode, done.stdout, done.stderr)


def iperf_result(returncode: int, stdout: str, stderr: str) -> float | str:
    """Gbit/s from an ``iperf3 -J`` run, or the reason it has none. A failed run
    still prints JSON, with an ``error`` and an ``end`` without ``sum_received``
    (iperf3 3.12: "unable to receive results"), or no JSON at all."""
    try:
        report = json.loads(stdout)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        text = (stderr.strip() or stdout.strip() or "no output").splitlines()[-1]
        return f"iperf3 exited {returncode}: {text}"
    received = (report.get("end") or {}).get("sum_received", {}).get("bits_per_second")
    if report.get("error") or received is None:
        why = report.get("error") or "its report has no end.sum_received"
        return f"iperf3 exited {returncode}: {why}"
    return float(received) / 1e9


async def hold_idle(port: int, n: int, measure: Callable[[], None]) -> int:
    """Open `n` keep-alive connections, one request each, then hold them idle while
    `measure` runs; returns how many were answered."""
    request = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
    streams: list[trio.SocketStream] = []
    answered = 0

    async def one() -> None:
        nonlocal answered
        s = await trio.open_tcp_stream(HOST, port)
        streams.append(s)
        await s.send_all(request)
        got = b""
        while b"hello world" not in got:
            chunk = await s.receive_some(4096)
            if not chunk:
                return
            got += chunk
        answered += 1

    try:
        for start in range(0, n, 500):  # the listen backlog is 1024
            async with trio.open_nursery() as nursery:
                for _ in range(min(500, n - start)):
                    nursery.start_soon(one)
        await trio.sleep(1.0)  # let the router settle
        measure()
    finally:
        for s in streams:
            await s.aclose()
    return answered


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_rounds(args: argparse.Namespace, variants: dict[str, tuple[int, list[int]]]) -> None:
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
          f"{'x nginx req/s':>15}{'x nginx p99':>13}{'x nginx cpu':>13}")  # fmt: skip
    for conns in (64, 1):
        ref = results[("nginx proxy", conns)]
        ref_rps = statistics.median(r["rps"] for r in ref)
        ref_p99 = statistics.median(r["p99"] for r in ref)
        ref_cpu = statistics.median(r["cpu_us"] for r in ref)
        for name in variants:
            rs = results[(name, conns)]
            rps = statistics.median(r["rps"] for r in rs)
            p50 = statistics.median(r["p50"] for r in rs)
            p99 = statistics.median(r["p99"] for r in rs)
            cpu = statistics.median(r["cpu_us"] for r in rs)
            print(f"{name:18}{conns:>6}{rps:>10.0f}{p50:>9.3f}{p99:>9.3f}{cpu:>12.1f}"
                  f"{rps / ref_rps:>15.2f}{p99 / ref_p99:>13.2f}{cpu / ref_cpu:>13.2f}")  # fmt: skip


def tcp_rounds(args: argparse.Namespace, variants: dict[str, tuple[int, list[int]]]) -> None:
    seconds = max(3, args.duration)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    failed: dict[str, list[str]] = {name: [] for name in variants}
    for rnd in range(args.rounds):
        for name, (port, pids) in variants.items():
            cpu0 = cpu_seconds(pids)
            gbps = run_iperf(port, seconds)
            cpu = cpu_seconds(pids) - cpu0
            if isinstance(gbps, str):  # a failed run is reported, and the bench goes on
                failed[name].append(gbps)
                print(f"round {rnd + 1} tcp {name:18} FAILED: {gbps}", flush=True)
                continue
            per_gb = cpu / (gbps * seconds / 8) if pids and gbps else float("nan")
            results[name].append((gbps, per_gb))
            print(f"round {rnd + 1} tcp {name:18} {gbps:6.2f} Gbit/s  cpu {per_gb:.3f} s/GB", flush=True)
    print(f"\nTCP bulk, iperf3 one stream {seconds}s, medians over the rounds that ran")
    print(f"{'variant':20}{'Gbit/s':>8}{'cpu s/GB':>10}{'x nginx Gbit/s':>16}{'x nginx cpu':>13}{'failed':>8}")
    nan = float("nan")
    ref_runs = results["nginx stream"]
    ref = statistics.median(g for g, _ in ref_runs) if ref_runs else nan
    ref_cpu = statistics.median(c for _, c in ref_runs) if ref_runs else nan
    for name, rs in results.items():
        g = statistics.median(g for g, _ in rs) if rs else nan
        c = statistics.median(c for _, c in rs) if rs else nan
        print(f"{name:20}{g:>8.2f}{c:>10.3f}{g / ref:>16.2f}{c / ref_cpu:>13.2f}{len(failed[name]):>8}")
    for name, errors in failed.items():
        for error in errors:
            print(f"  {name} failed: {error}")


def idle_connections(port: int, pid: int, n: int) -> None:
    idle = rss_kb(pid)
    seen: dict[str, int] = {}

    def measure() -> None:
        seen["rss"] = rss_kb(pid)

    answered = trio.run(hold_idle, port, n, measure)
    extra_mb = (seen["rss"] - idle) / 1024
    print(f"\nidle keep-alive connections: {answered}/{n} answered and held; router RSS "
          f"{idle / 1024:.1f} MB idle -> {seen['rss'] / 1024:.1f} MB (+{extra_mb:.1f} MB, "
          f"{(seen['rss'] - idle) / max(1, answered):.2f} KB per connection); target +60 MB: "
          f"{extra_mb / 60:.2f} of it")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--idle-conns", type=int, default=10000)
    ap.add_argument("--propagation", type=int, default=10, metavar="ROUNDS")
    ap.add_argument("--no-http", action="store_true", help="skip the wrk rounds")
    ap.add_argument("--no-tcp", action="store_true", help="skip the iperf3 rounds")
    args = ap.parse_args()
    ensure_tools()
    raise_nofile()  # for the idle connections, and inherited by the proxies
    root = Path(tempfile.mkdtemp(prefix="bench-router-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        b_port, n_port, h_port, r_port = free_port(), free_port(), free_port(), free_port()
        i_port, ns_port, rt_port = free_port(), free_port(), free_port()
        b_conf = nginx_conf(root, "backend", f' server {{ listen {HOST}:{b_port} backlog=4096; '
                            f'keepalive_requests 1000000; location / {{ return 200 "hello world\\n"; }} }}')  # fmt: skip
        n_conf = nginx_conf(root, "proxy", f" upstream b {{ server {HOST}:{b_port}; keepalive 64; }}\n"
                            f" server {{ listen {HOST}:{n_port} backlog=4096; keepalive_requests 1000000;\n"
                            "  location / { proxy_pass http://b; proxy_http_version 1.1;\n"
                            '   proxy_set_header Connection ""; } }',
                            stream=f" server {{ listen {HOST}:{ns_port}; proxy_pass {HOST}:{i_port}; }}")  # fmt: skip
        backend = subprocess.Popen(["taskset", "-c", OTHER_CORE, nginx_bin(), "-c", str(b_conf)])
        procs.append(backend)
        iperf = subprocess.Popen(["taskset", "-c", OTHER_CORE, "iperf3", "-s", "-B", HOST, "-p", str(i_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        procs.append(iperf)
        nginx = subprocess.Popen(["taskset", "-c", PROXY_CORE, nginx_bin(), "-c", str(n_conf)])
        procs.append(nginx)
        haproxy = subprocess.Popen(["taskset", "-c", PROXY_CORE, "haproxy", "-db", "-f",
                                    str(haproxy_conf(root, h_port, b_port))])  # fmt: skip
        procs.append(haproxy)
        router = subprocess.Popen(
            ["taskset", "-c", PROXY_CORE, sys.executable, "-c", ROUTER_MAIN, str(r_port), f"{HOST}:{b_port}",
             str(rt_port), f"{HOST}:{i_port}"],
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        procs.append(router)
        for port, proc in ((b_port, backend), (n_port, nginx), (h_port, haproxy), (r_port, router),
                           (rt_port, router)):  # fmt: skip
            wait_port(port, proc)
        nginx_pids = [nginx.pid, *children(nginx.pid)]
        if not args.no_http:
            http_rounds(args, {
                "backend direct": (b_port, []),
                "nginx proxy": (n_port, nginx_pids),
                "haproxy 1 thread": (h_port, [haproxy.pid]),
                "flynnp2p router": (r_port, [router.pid]),
            })  # fmt: skip
        if not args.no_tcp:
            tcp_rounds(args, {
                "iperf3 direct": (i_port, []),
                "nginx stream": (ns_port, nginx_pids),
                "flynnp2p tcp route": (rt_port, [router.pid]),
            })  # fmt: skip
        if args.idle_conns:
            idle_connections(r_port, router.pid, args.idle_conns)
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)
    if args.propagation:
        print("\nroute change -> applied on every node of 3 (scripts/bench/route_propagation.py):", flush=True)
        here = Path(__file__).resolve().parent
        subprocess.run([sys.executable, str(here / "route_propagation.py"), str(args.propagation)], check=True)


if __name__ == "__main__":
    main()
