"""Router worker processes (`flynnp2p.router.workers`): real worker processes on
shared SO_REUSEPORT ports, the table handed over on change, status and app-log
lines sent back, a killed worker replaced while requests keep being answered."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

import httpx
import trio

from flynnp2p.host.logs import LogLine
from flynnp2p.router.handover import decode_table, encode_table
from flynnp2p.router.workers import RouterWorkers
from flynnp2p.watch import Watched
from tests.test_router_helpers import LOCAL, HttpBackend, route, table_of, wait_for


class Lines:
    def __init__(self) -> None:
        self.got: list[tuple[str, str, LogLine]] = []

    async def write(self, app: str, job_id: str, lines: Sequence[LogLine]) -> None:
        self.got.extend((app, job_id, ln) for ln in lines)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()  # a zombie counts as gone
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_table_crosses_the_pipe_unchanged() -> None:
    table = table_of([route("r1", "a.test", sticky=True), route("r2", "*.b.test", path="/x")],
                     {("app1", "web"): ["127.0.0.1:1", "127.0.0.2:2"]})  # fmt: skip
    assert decode_table(encode_table(table)) == table
    assert decode_table(encode_table(table)).route_http("q.b.test", "/x/y") == table.routes[1]


async def test_workers_serve_follow_the_table_report_and_are_replaced_when_killed() -> None:
    lines = Lines()
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b1")
        addr = await backend.start(nursery)
        watched = Watched(table_of([route("r1", "a.test")], {("app1", "web"): [addr]}))
        workers = RouterWorkers(2, watched, address=LOCAL, http_port=0, log_writer=lines,
                                sticky_key=b"k" * 32)  # fmt: skip
        port = await nursery.start(workers.run)
        pids = [s.pid for s in workers.slots]
        assert port and all(pids) and len(set(pids)) == 2
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", timeout=5) as c:
            for _ in range(20):  # new connections: the kernel spreads them over both workers
                r = await c.get("/", headers={"Host": "a.test", "Connection": "close"})
                assert r.text == "hello from b1"
            # A change reaches every worker: a new domain answers through all of them.
            watched.set(table_of([route("r1", "a.test"), route("r2", "new.test")],
                                 {("app1", "web"): [addr]}))  # fmt: skip

            async def everywhere(host: str, want: int) -> bool:
                codes = set()
                for _ in range(20):
                    r = await c.get("/", headers={"Host": host, "Connection": "close"})
                    codes.add(r.status_code)
                return codes == {want}

            async def until_everywhere(host: str, want: int) -> None:
                with trio.fail_after(5):
                    while not await everywhere(host, want):  # noqa: ASYNC110 - polls the routers
                        await trio.sleep(0.05)

            await until_everywhere("new.test", 200)
            # A router error is a line in the app's log, written by the agent's side.
            watched.set(table_of([route("r1", "a.test")], {}))
            await until_everywhere("a.test", 503)
            await wait_for(
                lambda: any(app == "app1" and "code=H10" in ln.text for app, _, ln in lines.got)
            )
            status = await workers.current_status()
            assert [w["answered"] for w in status["workers"]] == [True, True]  # type: ignore[index]
            requests = status["apps"]["app1"]["requests"]  # type: ignore[index]
            assert requests["2xx"] >= 40 and requests["5xx"] >= 20  # both workers' counters

            # Kill one worker: it is replaced, and every request is answered meanwhile
            # (a connection the dying worker had accepted may be reset: tried again once).
            watched.set(table_of([route("r1", "a.test")], {("app1", "web"): [addr]}))
            await until_everywhere("a.test", 200)
            victim = workers.slots[0].pid
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            answered = 0
            with trio.fail_after(20):
                while workers.slots[0].pid in (None, victim) or workers.slots[0].channel is None:
                    for attempt in range(2):
                        try:
                            r = await c.get("/", headers={"Host": "a.test", "Connection": "close"})
                        except httpx.TransportError:
                            assert attempt == 0, "a request failed twice while a worker restarted"
                            continue
                        assert r.status_code == 200
                        answered += 1
                        break
                    await trio.sleep(0.01)
            assert answered > 0 and not alive(victim)
            assert workers.slots[0].restarts == 1
            assert await everywhere("a.test", 200)
        survivors = [s.pid for s in workers.slots]
        nursery.cancel_scope.cancel()
    # Stopped with their supervisor: no orphans.
    assert all(p is not None and not alive(p) for p in survivors)


async def test_a_busy_port_at_start_is_the_agents_error_naming_the_listener() -> None:
    import errno
    import socket

    import pytest

    from flynnp2p.coord.ca import ClusterCA
    from flynnp2p.router.tls import CertStore
    from flynnp2p.token import ClusterToken

    token = ClusterToken.generate()
    certs = CertStore(ClusterCA(token.cluster_id, token.admin_secret), "flynnp2p.localhost")
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for http_port, https_port, which in ((busy, 0, "http"), (0, busy, "https")):
            workers = RouterWorkers(1, Watched(table_of([], {})), address=LOCAL, http_port=http_port,
                                    https_port=https_port, certs=certs, log_writer=Lines(),
                                    sticky_key=b"k" * 32)  # fmt: skip
            async with trio.open_nursery() as nursery:
                with pytest.raises(OSError) as e:
                    await nursery.start(workers.run)
            assert e.value.errno == errno.EADDRINUSE and workers.failed == which
            assert workers.slots[0].pid is None  # the worker that could not bind is reaped
