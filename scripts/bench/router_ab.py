#!/usr/bin/env python3
"""Two builds of the router against each other, per core, on loopback (A/B).

For changes to the router's hot path, where the question is "does this help?"
and the machine is shared: the router of each source tree (``--a``, ``--b``:
directories holding a ``flynnp2p`` package, e.g. ``git archive main`` unpacked)
runs pinned to core 0, the small-response backend (nginx) and wrk on core 1, as
in ``router.py``. In every round each build gets ``wrk -c64`` and ``-c1`` in
turn, the order swapped from round to round so neither always runs first; the
figure to compare is the router's CPU µs per request (from /proc), which other
tenants of the machine disturb less than req/s. ``--nginx`` adds nginx as a
proxy (1 worker, upstream keepalive) for the ratio.

    .venv/bin/python scripts/bench/router_ab.py --a /tmp/base --b . [--rounds 4]
        [--duration 5] [--nginx]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from router import (
    HOST,
    OTHER_CORE,
    PROXY_CORE,
    ROUTER_MAIN,
    children,
    cpu_seconds,
    ensure_tools,
    free_port,
    nginx_bin,
    nginx_conf,
    raise_nofile,
    run_wrk,
    stop,
    wait_port,
)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--a", type=Path, required=True, help="source tree of build A")
    ap.add_argument("--b", type=Path, required=True, help="source tree of build B")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", default="64,1", help="wrk connection counts, comma-separated")
    ap.add_argument("--nginx", action="store_true", help="also nginx as a proxy, for the ratio")
    args = ap.parse_args()
    ensure_tools((("nginx", "nginx"), ("wrk", "wrk")), stream=False)
    raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="bench-router-ab-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        b_port = free_port()
        b_conf = nginx_conf(root, "backend", f' server {{ listen {HOST}:{b_port} backlog=4096; '
                            f'keepalive_requests 1000000; location / {{ return 200 "hello world\\n"; }} }}')  # fmt: skip
        backend = subprocess.Popen(["taskset", "-c", OTHER_CORE, nginx_bin(), "-c", str(b_conf)])
        procs.append(backend)
        wait_port(b_port, backend)
        variants: dict[str, tuple[int, list[int]]] = {}
        for name, tree in (("A", args.a), ("B", args.b)):
            port = free_port()
            proc = subprocess.Popen(
                ["taskset", "-c", PROXY_CORE, sys.executable, "-c", ROUTER_MAIN, str(port),
                 f"{HOST}:{b_port}", str(free_port()), f"{HOST}:{b_port}"],
                cwd=tree.resolve(),
            )  # fmt: skip
            procs.append(proc)
            wait_port(port, proc)
            variants[f"{name} {tree}"] = (port, [proc.pid])
        if args.nginx:
            n_port = free_port()
            n_conf = nginx_conf(root, "proxy", f" upstream b {{ server {HOST}:{b_port}; keepalive 64; }}\n"
                                f" server {{ listen {HOST}:{n_port} backlog=4096; keepalive_requests 1000000;\n"
                                "  location / { proxy_pass http://b; proxy_http_version 1.1;\n"
                                '   proxy_set_header Connection ""; } }')  # fmt: skip
            nginx = subprocess.Popen(["taskset", "-c", PROXY_CORE, nginx_bin(), "-c", str(n_conf)])
            procs.append(nginx)
            wait_port(n_port, nginx)
            variants["nginx proxy"] = (n_port, [nginx.pid, *children(nginx.pid)])
        conns_list = [int(c) for c in args.conns.split(",")]
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        names = list(variants)
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for conns in conns_list:
                for name in order:
                    port, pids = variants[name]
                    cpu0 = cpu_seconds(pids)
                    r = run_wrk(port, conns, args.duration)
                    r["cpu_us"] = (
                        (cpu_seconds(pids) - cpu0) / r["requests"] * 1e6 if r["requests"] else 0.0
                    )
                    results.setdefault((name, conns), []).append(r)
                    print(f"round {rnd + 1} c{conns:<3} {name:28} {r['rps']:9.0f} req/s  "
                          f"p99 {r['p99']:.3f} ms  cpu {r['cpu_us']:.1f} us/req"
                          + ("  ERRORS" if r["errors"] or r["socket_errors"] else ""), flush=True)  # fmt: skip
        print(f"\nmedians over {args.rounds} rounds (wrk -t2 -d{args.duration}s; router on core "
              f"{PROXY_CORE}, backend and wrk on core {OTHER_CORE})")  # fmt: skip
        for conns in conns_list:
            for name in names:
                rs = results[(name, conns)]
                cpus = sorted(round(r["cpu_us"], 1) for r in rs)
                print(f"c{conns:<3} {name:28} {statistics.median(r['rps'] for r in rs):9.0f} req/s  "
                      f"p99 {statistics.median(r['p99'] for r in rs):.3f} ms  "
                      f"cpu {statistics.median(r['cpu_us'] for r in rs):.1f} us/req  {cpus}")  # fmt: skip
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
