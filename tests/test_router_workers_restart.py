"""Router workers on listeners the agent holds (`flynnp2p.router.workers`): real
worker processes, real sockets. The only worker SIGKILLed under a request loop
refuses no connection (they wait in the agent's listen queue); TCP route
listeners added and removed while no worker runs are right once one is back;
counters survive the worker that counted them. Plus the pure parts: the
descriptors' channel, `tcp_handover`, counters merged with the retired ones."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from flynnp2p.router.handover import (
    MAX_FDS,
    WorkerView,
    add_counters,
    batches,
    counters,
    merge_status,
    no_counters,
    tcp_handover,
)
from flynnp2p.router.stats import Stats
from flynnp2p.router.table import Backend, RouteSpec, RouteTable
from flynnp2p.router.workers import Channel, RouterWorkers
from flynnp2p.watch import Watched
from tests.restart_probe import Tally, hammer, request_once
from tests.test_router_helpers import LOCAL, HttpBackend, route, table_of
from tests.test_router_workers import Lines, alive

KEY = b"k" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def with_tcp(http: RouteTable, ports: list[int], addr: str) -> RouteTable:
    routes = [*http.routes, *(RouteSpec(id=f"t{p}", app_id="app1", type="tcp", port=p) for p in ports)]
    return RouteTable.build(routes, {**http.backends, ("app1", "web"): (Backend("j1", addr),)})


async def until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0) -> None:
    """Poll `predicate` (plain or async) until it holds; fail after `timeout`."""
    with trio.fail_after(timeout):
        while True:
            result = predicate()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return
            await trio.sleep(0.01)


async def replaced(workers: RouterWorkers, victim: int) -> bool:
    slot = workers.slots[0]
    return slot.pid not in (None, victim) and slot.channel is not None


# -- the pure parts ----------------------------------------------------------------------


def test_tcp_handover_compares_listeners_by_identity() -> None:
    a, b, b2, c = object(), object(), object(), object()
    assert tcp_handover({}, {1: a}) == ([], [1])
    assert tcp_handover({1: a, 2: b}, {1: a, 2: b}) == ([], [])
    # 2 went and came back (a new socket), 3 went, 4 came.
    assert tcp_handover({1: a, 2: b, 3: c}, {1: a, 2: b2, 4: c}) == ([2, 3], [2, 4])
    assert batches(list(range(2 * MAX_FDS + 1))) == [
        list(range(MAX_FDS)), list(range(MAX_FDS, 2 * MAX_FDS)), [2 * MAX_FDS]
    ]  # fmt: skip


def test_status_adds_the_retired_counters_and_keeps_latencies_of_the_living() -> None:
    old, new = Stats(), Stats()
    for _ in range(7):
        old.record("app1", 200, 0.5)
    old.record("app1", 503, 0.5, by_router=True)
    old.logged("app1", "H10")
    new.record("app1", 204, 0.001)
    new.record("app2", 404, 0.002)
    retired = add_counters(no_counters(), counters(old, 2, {"written": 1, "dropped": 3, "queued": 9}))
    now = counters(new, 1, {"written": 4})
    live = {"connections": 2, "log": {"queued": 1}, "pool": {}, "latencies": {"app1": [0.001], "app2": [0.002]},
            "balancer": {"in_flight": {}, "skipped": {}}}  # fmt: skip
    st = merge_status([WorkerView(0, 42, 1, live, now)], table_of([], {}), {}, {"http": 1},
                      tcp_errors={3001: "busy"}, retired=retired)  # fmt: skip
    app1: Any = st["apps"]["app1"]  # type: ignore[index]
    assert app1["requests"] == {"1xx": 0, "2xx": 8, "3xx": 0, "4xx": 0, "5xx": 1}
    assert app1["router_errors"] == 1 and app1["codes"] == {"H10": 1}
    assert app1["latency_ms"]["p99"] == 1.0  # the dead worker's 500 ms are not kept
    assert st["apps"]["app2"]["requests"]["4xx"] == 1  # type: ignore[index]
    assert st["tls"] == {"handshake_failures": 3}
    assert st["log"] == {"written": 5, "dropped": 3, "write_errors": 0, "queued": 1}
    assert st["tcp_errors"] == {"3001": "busy"} and st["connections"] == 2
    # A worker that did not answer still counts with its latest report.
    silent = merge_status([WorkerView(0, 42, 1, None, now)], table_of([], {}), {}, {}, retired=retired)
    assert silent["apps"]["app1"]["requests"]["2xx"] == 8  # type: ignore[index]


async def test_the_channel_carries_descriptors_with_their_message() -> None:
    a, b = socket.socketpair()
    listeners = [socket.socket() for _ in range(3)]
    try:
        for s in listeners:
            s.bind((LOCAL, 0))
        async with Channel(trio.socket.from_stdlib_socket(a)) as tx, \
                Channel(trio.socket.from_stdlib_socket(b)) as rx:  # fmt: skip

            async def sender() -> None:
                await tx.send({"t": "one"})
                await tx.send({"t": "two"}, [s.fileno() for s in listeners[:2]])
                # Larger than the socket's buffer: sent in parts, its descriptor with the first.
                await tx.send({"t": "three", "big": b"x" * 300_000}, [listeners[2].fileno()])

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender)
                    got = [await rx.receive() for _ in range(3)]
            assert [m["t"] for m in got if m] == ["one", "two", "three"]
            assert got[0] is not None and "fds" not in got[0]
            names = [socket.socket(fileno=fd).getsockname() for m in got[1:] if m for fd in m["fds"]]
            assert names == [s.getsockname() for s in listeners]
    finally:
        for s in listeners:
            s.close()


# -- real workers -----------------------------------------------------------------------


async def test_the_only_worker_killed_under_load_refuses_no_connection() -> None:
    async with trio.open_nursery() as nursery:
        addr = await HttpBackend("b1").start(nursery)
        tcp_port = free_port()
        http = table_of([route("r1", "a.test")], {("app1", "web"): [addr]})
        workers = RouterWorkers(1, Watched(with_tcp(http, [tcp_port], addr)), address=LOCAL,
                                http_port=0, log_writer=Lines(), sticky_key=KEY)  # fmt: skip
        port = await nursery.start(workers.run)

        async def tcp_served() -> bool:
            return await request_once(LOCAL, tcp_port, "a.test") == "ok"

        await until(tcp_served)
        tally = {"http": Tally(), "tcp": Tally()}
        victim = workers.slots[0].pid
        assert victim is not None
        async with trio.open_nursery() as load:
            load.start_soon(hammer, LOCAL, port, "a.test", tally["http"])
            load.start_soon(hammer, LOCAL, tcp_port, "a.test", tally["tcp"])
            await until(lambda: (all(t.count("ok") >= 20 for t in tally.values())))
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            await until(lambda: replaced(workers, victim))
            back = time.monotonic() - killed
            await until(lambda: (all(t.count("ok", since=killed + back) >= 20 for t in tally.values())))
            load.cancel_scope.cancel()
        for t in tally.values():
            assert t.count("refused") == 0 and t.count("other") == 0, t.counts()
            assert t.count("failed") <= 4, t.counts()  # at most one in flight per client loop
            assert t.count("failed", since=killed) == 0  # (a new connection waits in the queue)
            gap = t.first_ok_after(killed)
            assert gap is not None and gap < 15, gap
        assert not alive(victim) and workers.slots[0].restarts == 1
        nursery.cancel_scope.cancel()


async def test_tcp_listeners_changed_while_no_worker_runs_are_right_once_one_is_back() -> None:
    async with trio.open_nursery() as nursery:
        addr = await HttpBackend("b1").start(nursery)
        http = table_of([route("r1", "a.test")], {("app1", "web"): [addr]})
        kept, gone, new = free_port(), free_port(), free_port()
        table = Watched(with_tcp(http, [kept, gone], addr))
        workers = RouterWorkers(1, table, address=LOCAL, http_port=0, log_writer=Lines(),
                                sticky_key=KEY, backoff_s=2.0)  # fmt: skip
        await nursery.start(workers.run)
        for p in (kept, gone):
            assert await request_once(LOCAL, p, "a.test") == "ok"
        victim = workers.slots[0].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        # Reaped, and its replacement not yet spawned (a 2 s back-off: it died young).
        await until(lambda: (workers.slots[0].pid is None))
        table.set(with_tcp(http, [kept, new], addr))  # nothing awaited since: no worker runs

        async def held(port: int) -> bool:
            st: Any = await workers.current_status()
            return port in st["listeners"]["tcp"]

        await until(lambda: held(new))
        assert workers.slots[0].pid is None, "the change was meant to land while no worker ran"
        results: dict[int, str] = {}

        async def ask(p: int) -> None:
            results[p] = await request_once(LOCAL, p, "a.test")

        async with trio.open_nursery() as clients:  # queued until the next worker accepts
            for p in (kept, gone, new):
                clients.start_soon(ask, p)
        assert results == {kept: "ok", gone: "refused", new: "ok"}
        assert workers.slots[0].restarts == 1
        status: Any = await workers.current_status()
        assert status["listeners"]["tcp"] == sorted([kept, new])
        # And removed while the worker runs: it stops serving it.
        table.set(with_tcp(http, [new], addr))

        async def kept_refused() -> bool:
            return await request_once(LOCAL, kept, "a.test") == "refused"

        await until(kept_refused, 5)
        assert await request_once(LOCAL, new, "a.test") == "ok"
        nursery.cancel_scope.cancel()


async def test_counters_survive_the_worker_that_counted_them() -> None:
    async with trio.open_nursery() as nursery:
        addr = await HttpBackend("b1").start(nursery)
        table = table_of([route("r1", "a.test"), route("r2", "none.test", app="app2")],
                         {("app1", "web"): [addr]})  # fmt: skip
        workers = RouterWorkers(1, Watched(table), address=LOCAL, http_port=0, log_writer=Lines(),
                                sticky_key=KEY)  # fmt: skip
        port = await nursery.start(workers.run)

        async def requests() -> dict[str, int]:
            st: Any = await workers.current_status()
            app1, app2 = st["apps"]["app1"], st["apps"]["app2"]
            return {"2xx": app1["requests"]["2xx"], "5xx": app2["requests"]["5xx"],
                    "router_errors": app2["router_errors"], "H10": app2["codes"].get("H10", 0)}  # fmt: skip

        async def send(host: str, n: int) -> None:
            for _ in range(n):
                await request_once(LOCAL, port, host)

        await send("a.test", 20)
        await send("none.test", 3)  # app2 has no backend: 503 from the router (H10)
        before = await requests()
        assert before == {"2xx": 20, "5xx": 3, "router_errors": 3, "H10": 3}, before
        # Four more, counted only by the worker's own report (no status asked before the kill).
        await send("a.test", 4)

        async def reported() -> bool:
            c = workers.slots[0].counters
            return bool(c and c["apps"]["app1"][0][2] == 24)

        await until(reported, 5)
        victim = workers.slots[0].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        await until(lambda: replaced(workers, victim))
        after = await requests()
        assert after == {**before, "2xx": 24}, after
        await send("a.test", 1)
        assert (await requests())["2xx"] == 25  # the new worker's count on top
        st: Any = await workers.current_status()
        assert st["workers"][0]["restarts"] == 1 and st["log"]["written"] >= 0
        nursery.cancel_scope.cancel()
