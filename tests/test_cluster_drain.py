"""Draining, with real agents, real jobs and steady load through one node's router:
scaling web down (3 → 1) and stopping a node that hosts a web job (SIGTERM, a
clean leave) lose no request, and requests are answered throughout.

The load is 20 keep-alive clients, each sending one request after another to
node A's router, turn about a GET and a POST whose handler works for 0.2 s (the
router retries a bodiless GET on another backend when one resets, but never a
POST: an in-flight POST is what a stop without draining loses). The app dies
at SIGTERM, as many do. Every request counts as sent; a 200 counts as answered;
any other status or a transport error is a failure.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import Cluster, wait_for
from tests.jobs_app import deploy, jobs, scale, wait_up

pytestmark = pytest.mark.slow

HOST = "shop.flynnp2p.localhost"
CLIENTS = 20
GAP_S = 5.0  # the longest stretch without an answer that still counts as "throughout"
WORK_S = 0.2  # how long a POST is in flight at the job

SERVER = f"""\
import http.server, os, threading, time
job, port = os.environ["JOB_ID"], int(os.environ["PORT"])
# A thread per connection: with 8 MB stacks, the job's address-space limit
# (memory_mb) runs out at ~60 of them when the load moves onto one job.
threading.stack_size(256 * 1024)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        body = job.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        time.sleep({WORK_S})
        self.answer()

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # (socketserver's 5 overflows when the load moves over at once)
    daemon_threads = True

Server(("0.0.0.0", port), Handler).serve_forever()
""".encode()


def make_slug(path: Path) -> tuple[Path, str]:
    """A slug (Heroku's layout) whose web process is `SERVER`; (path, digest)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("./app/Procfile", b"web: python3 server.py\n"), ("./app/server.py", SERVER)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path, "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()


@dataclass
class Load:
    sent: int = 0
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)

    def longest_gap(self, start: float, end: float) -> float:
        times = [start, *sorted(t for t in self.answered_at if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))


async def _client(url: str, load: Load, stop: trio.Event) -> None:
    async with httpx.AsyncClient(timeout=10) as c:  # keep-alive to the router
        post = False
        while not stop.is_set():
            load.sent += 1
            post = not post
            try:
                if post:
                    r = await c.post(url + "work", headers={"Host": HOST}, content=b"x" * 100)
                else:
                    r = await c.get(url, headers={"Host": HOST})
            except httpx.TransportError as exc:
                load.failures.append(f"{type(exc).__name__}: {exc}")
            else:
                if r.status_code == 200:
                    load.answered += 1
                    load.answered_at.append(trio.current_time())
                else:
                    load.failures.append(f"{r.status_code}: {r.text[:100]}")
            await trio.sleep(0.005)


async def test_scale_down_and_a_node_leaving_lose_no_request(cluster: Cluster, tmp_path: Path) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    front = agents[0]
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with front.client() as c:
        await deploy(c, "shop", slug, digest)
        await scale(c, "shop", web=3)
        await wait_up(c, "shop", 3, timeout=60)
    url = f"http://{front.addr}:8080/"

    async def serves() -> bool:
        async with httpx.AsyncClient(timeout=5) as h:
            return (await h.get(url, headers={"Host": HOST})).status_code == 200

    await wait_for(serves, 10, "node A's router to serve shop")

    async def no_stopping_jobs(c: httpx.AsyncClient) -> bool:
        body = await jobs(c, "shop")
        return not [j for j in body["jobs"] if j["state"] in ("stopping", "lost")]

    load, stop = Load(), trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(CLIENTS):
            nursery.start_soon(_client, url, load, stop)
        await trio.sleep(1.0)
        # (a) scale down 3 → 1, under load.
        t0 = trio.current_time()
        async with front.client() as c:
            await scale(c, "shop", web=1)
            await wait_up(c, "shop", 1, timeout=30)
            await wait_for(lambda: no_stopping_jobs(c), 30, "the stopped jobs to be down")
            scaled = (load.sent, load.answered, len(load.failures))
            # (b) a node hosting a web job leaves, under load: back to 2 first, so
            # one runs on a node other than A.
            await scale(c, "shop", web=2)
            up = await wait_up(c, "shop", 2, timeout=30)
        await trio.sleep(1.0)  # every router has both
        victim = next(a for a in agents[1:] if any(j["host"] == a.name for j in up))
        t1 = trio.current_time()
        assert await trio.to_thread.run_sync(victim.stop, 30) == 0
        async with front.client() as c:
            await wait_up(c, "shop", 2, timeout=30, check=lambda js: victim.name not in {j["host"] for j in js})
        await trio.sleep(1.0)
        t2 = trio.current_time()
        stop.set()

    print(
        f"\n{CLIENTS} clients, scale 3->1: sent {scaled[0]}, answered {scaled[1]}, failed {scaled[2]}; "
        f"in all (with {victim.name} leaving): sent {load.sent}, answered {load.answered}, "
        f"failed {len(load.failures)}; longest gap {load.longest_gap(t0, t2):.2f} s"
    )
    for failure in sorted(set(load.failures))[:10]:
        print("  failed:", failure.strip())
    assert not load.failures, (len(load.failures), load.failures[:10])
    assert load.answered == load.sent and load.sent > 200
    assert load.longest_gap(t0, t1) < GAP_S and load.longest_gap(t1, t2) < GAP_S
