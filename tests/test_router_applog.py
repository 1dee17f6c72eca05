"""The router's lines in apps' logs, through a real router, real loopback backends
and a real `LogHub` writing the app's file: a refused backend makes a retry line,
and the router's own 503, 504 and 502 each make an error line with their code."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from flynnp2p.host.loghub import Line, LogHub
from flynnp2p.router.applog import RouterLog
from flynnp2p.router.logline import parse_line
from flynnp2p.router.proxy import ProxyConfig
from flynnp2p.router.service import Router
from flynnp2p.router.table import RouteTable
from flynnp2p.watch import Watched
from tests.test_router_helpers import LOCAL, HttpBackend, route, serve, table_of, wait_for

SVC = ("app1", "web")


async def start_logged_router(
    nursery: trio.Nursery, table: RouteTable, logs: Path, config: ProxyConfig | None = None
) -> tuple[Router, LogHub, int]:
    hub = LogHub(logs)
    router = Router(Watched(table), address=LOCAL, http_port=0, config=config, seed=1,
                    log=RouterLog(hub))  # fmt: skip
    port = await nursery.start(router.run)
    return router, hub, port


async def router_lines(router: Router, hub: LogHub, app: str, n: int) -> list[dict[str, str]]:
    """The router lines of `app`'s log file, once `n` lines have been written."""
    await wait_for(lambda: router.shared.log.written >= n)
    lines: list[Line] = await hub.history(app, 100)
    assert all(line.job_id == "router" for line in lines)
    return [parse_line(line.text) for line in lines]


async def test_a_refused_backend_makes_a_retry_line_naming_both_backends(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        dead = trio.socket.socket()
        await dead.bind((LOCAL, 0))  # bound, never listening: refused
        dead_addr = f"{LOCAL}:{dead.getsockname()[1]}"
        good = await HttpBackend("good").start(nursery)
        table = table_of([route("r1", "h.test")], {SVC: [dead_addr, good]})
        router, hub, port = await start_logged_router(nursery, table, tmp_path / "logs")
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "h.test"}) as c:
            for _ in range(40):  # until the balancer has tried the dead one first (then skips it)
                assert (await c.get("/")).status_code == 200
                if router.shared.stats.app("app1").retries:
                    break
        [line] = await router_lines(router, hub, "app1", 1)
        assert (line["at"], line["code"], line["desc"]) == ("warning", "H21", "Backend connection refused, retrying")
        assert line["backend"] == f"job-0-{dead_addr}@{dead_addr}"
        assert line["retry"] == f"job-1-{good}@{good}"
        assert (line["method"], line["path"], line["host"], line["fwd"]) == ("GET", "/", "h.test", LOCAL)
        assert router.status()["apps"]["app1"]["codes"] == {"H21": 1}  # type: ignore[index]
        dead.close()
        nursery.cancel_scope.cancel()


async def test_the_routers_503_504_and_502_each_make_a_line_with_their_code(tmp_path: Path) -> None:
    async def close_unanswered(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    cfg = ProxyConfig(response_header_timeout=0.3, timer_tick=0.05)
    async with trio.open_nursery() as nursery:
        slow = await HttpBackend("slow").start(nursery)
        closer = f"{LOCAL}:{await serve(nursery, close_unanswered)}"
        table = table_of(
            [route("r1", "slow.test"), route("r2", "closer.test", app="app2"),
             route("r3", "down.test", app="app3")],
            {SVC: [slow], ("app2", "web"): [closer]},
        )  # fmt: skip
        router, hub, port = await start_logged_router(nursery, table, tmp_path / "logs", cfg)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}") as c:
            r503 = await c.get("/nothing", headers={"Host": "down.test"})
            r504 = await c.get("/slow/2", headers={"Host": "slow.test"})
            r502 = await c.get("/", headers={"Host": "closer.test", "X-Forwarded-For": "10.9.9.9"})
            r404 = await c.get("/", headers={"Host": "unknown.test"})
        assert [r.status_code for r in (r503, r504, r502, r404)] == [503, 504, 502, 404]

        [h10] = await router_lines(router, hub, "app3", 3)
        assert (h10["at"], h10["code"], h10["status"], h10["backend"]) == ("error", "H10", "503", "")
        assert h10["path"] == "/nothing" and h10["request_id"] == r503.headers["x-request-id"]
        assert int(h10["bytes"]) == len(r503.content)

        [h12] = await router_lines(router, hub, "app1", 3)
        assert (h12["code"], h12["desc"], h12["status"]) == ("H12", "Request timeout", "504")
        assert h12["backend"] == f"job-0-{slow}@{slow}"
        assert 250 <= int(h12["service"].removesuffix("ms")) < 2000  # the response-head timeout
        assert h12["request_id"] == r504.headers["x-request-id"]

        [h13] = await router_lines(router, hub, "app2", 3)  # one backend: nothing to retry on
        assert (h13["code"], h13["desc"], h13["status"]) == ("H13", "Connection closed without response", "502")
        assert h13["backend"] == f"job-0-{closer}@{closer}" and h13["fwd"] == LOCAL

        assert sorted(p.name for p in (tmp_path / "logs").glob("*.log")) == ["app1.log", "app2.log", "app3.log"]
        assert router.status()["log"] == {"written": 3, "dropped": 0, "write_errors": 0, "queued": 0}
        nursery.cancel_scope.cancel()


async def test_a_full_queue_drops_and_counts_and_never_blocks_the_request(tmp_path: Path) -> None:
    class Stuck:
        """A writer whose disk never answers."""

        async def write(self, app: str, job_id: str, lines: object) -> None:
            await trio.sleep_forever()

    log = RouterLog(Stuck(), capacity=2)
    async with trio.open_nursery() as nursery:
        table = table_of([route("r1", "down.test")], {})
        router = Router(Watched(table), address=LOCAL, http_port=0, seed=1, log=log)
        port = await nursery.start(router.run)
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}", headers={"Host": "down.test"}) as c:
            with trio.fail_after(5):
                codes = [(await c.get("/")).status_code for _ in range(10)]
        assert codes == [503] * 10
        # one line is in the stuck writer, two wait in the queue, the rest were dropped
        assert log.status() == {"written": 0, "dropped": 7, "write_errors": 0, "queued": 2}
        nursery.cancel_scope.cancel()
