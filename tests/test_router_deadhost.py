"""Routers stop choosing backends on hosts that stopped answering this node's
heartbeats, and choose them again as soon as they answer; what is in flight to
them is left to finish.

Unit tests of the pure choice (`table_from_state` with ``silent_hosts``, then the
`Balancer`: a Hypothesis property), of the pool, of the worker handover and of
the heartbeats' `silent` set (virtual time); a feed test with a real state
service; and component tests of a real router with real loopback backends on
both of its paths (fast lane, task per connection).
"""

from __future__ import annotations

import random
import socket
from functools import partial

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from flynnp2p.gossip.heartbeat import Heartbeats
from flynnp2p.router.balance import Balancer
from flynnp2p.router.build import prefer_answering, table_from_state
from flynnp2p.router.feed import feed_routes
from flynnp2p.router.handover import WorkerView, decode_table, encode_table, merge_status
from flynnp2p.router.proxy import Pool, ProxyConfig
from flynnp2p.router.service import Router
from flynnp2p.router.sock import Sock
from flynnp2p.router.table import Backend, RouteTable
from flynnp2p.state.merge import State
from flynnp2p.state.records import App, Job, Placement, Route
from flynnp2p.state.service import StateService
from flynnp2p.state.store import MemoryStore
from flynnp2p.watch import Watched
from tests.states import state_of
from tests.test_heartbeat import SETTINGS, FakeNodes
from tests.test_router_helpers import LOCAL, HttpBackend, serve, wait_for
from tests.test_router_lost import GET, Silent, response
from tests.test_scheduler_service import T0_MS, LonePeers, virtual_ms

SVC = ("app1", "web")
HOSTS = ("n1", "n2", "n3", "n4")


def job(id: str, host: str, address: str) -> Job:
    return Job(id, "app1", "r1", "web", host, "up", 1, 1, address=address)


def start(id: str, host: str) -> Placement:
    return Placement(id, "app1", "r1", "web", host, "start", 1, 1)


def state_with(jobs: list[tuple[str, str, str]]) -> State:
    """App ``app1`` routed at ``a.test``, with `jobs` (id, host, address) up."""
    records: list[App | Route | Job | Placement] = [
        App("app1", "hello", 1), Route("rt1", "app1", "http", 1, domain="a.test")
    ]  # fmt: skip
    for id, host, address in jobs:
        records += [start(id, host), job(id, host, address)]
    return state_of(*records)


# -- the choice (pure) -------------------------------------------------------------------


def test_backends_on_silent_hosts_are_skipped_while_another_answers() -> None:
    state = state_with([("j1", "n1", "127.0.0.2:5000"), ("j2", "n2", "127.0.0.3:5000"),
                        ("j3", "n2", "127.0.0.3:5001")])  # fmt: skip
    built = table_from_state(state, silent_hosts={"n2"})
    assert [b.job_id for b in built.backends[SVC]] == ["j1"]
    assert [b.job_id for b in built.skipped[SVC]] == ["j2", "j3"]
    assert built.silent == frozenset({"127.0.0.3:5000", "127.0.0.3:5001"})
    assert built.lost == frozenset()  # silence is not loss: nothing in flight is given up
    everyone = table_from_state(state)
    assert [b.job_id for b in everyone.backends[SVC]] == ["j1", "j2", "j3"]
    assert dict(everyone.skipped) == {} and everyone.silent == frozenset()
    assert built != everyone  # a change of silent hosts alone is a new table for the router
    # All on silent hosts: all stay listed (a try beats a 503), and all are silent.
    all_silent = table_from_state(state, silent_hosts={"n1", "n2"})
    assert [b.job_id for b in all_silent.backends[SVC]] == ["j1", "j2", "j3"]
    assert dict(all_silent.skipped) == {} and len(all_silent.silent) == 3
    assert all_silent != everyone


@settings(deadline=None)  # (a noisy 2-core machine: the state snapshot's cost varies)
@given(
    hosts=st.lists(st.sampled_from(HOSTS), min_size=1, max_size=8),
    silent=st.frozensets(st.sampled_from(HOSTS)),
    seed=st.integers(0, 2**32),
    loads=st.lists(st.integers(0, 3), min_size=8, max_size=8),
)
def test_a_silent_hosts_backend_is_never_chosen_while_one_that_answers_exists(
    hosts: list[str], silent: frozenset[str], seed: int, loads: list[int]
) -> None:
    jobs = [(f"j{i}", host, f"127.0.0.{2 + i}:5000") for i, host in enumerate(hosts)]
    on_host = {address: host for _, host, address in jobs}
    table = table_from_state(state_with(jobs), silent_hosts=silent)
    target = table.lookup_http("a.test", "/")
    assert target is not None
    balancer = Balancer(random.Random(seed))
    for (_, _, address), load in zip(jobs, loads, strict=False):
        for _ in range(load):  # whatever is in flight, however unevenly
            balancer.acquire(address)
    answering = [h for h in hosts if h not in silent]
    for _ in range(20):
        chosen = balancer.choose(target.backends, now=0.0)
        assert chosen is not None  # never a 503 while a job is up
        if answering:
            assert on_host[chosen.address] not in silent
    listed = {b.job_id for b in target.backends} | {b.job_id for bs in table.skipped.values() for b in bs}
    assert listed == {j for j, _, _ in jobs}  # each job is listed or skipped, none lost
    assert table.silent == {a for _, h, a in jobs if h in silent}


def test_prefer_answering_keeps_order_and_all_when_none_answers() -> None:
    a, b, c = Backend("a", "127.0.0.2:1"), Backend("b", "127.0.0.3:1"), Backend("c", "127.0.0.4:1")
    hosted = [(a, "n1"), (b, "n2"), (c, "n1")]
    assert prefer_answering(hosted, {"n1"}) == ([b], [a, c])
    assert prefer_answering(hosted, set()) == ([a, b, c], [])
    assert prefer_answering(hosted, {"n1", "n2"}) == ([a, b, c], [])
    assert prefer_answering([], {"n1"}) == ([], [])


def test_a_router_worker_gets_the_skipped_and_silent_backends_and_shows_them() -> None:
    table = table_from_state(
        state_with([("j1", "n1", "127.0.0.2:5000"), ("j2", "n2", "127.0.0.3:5000")]), silent_hosts={"n2"}
    )
    decoded = decode_table(encode_table(table))
    assert decoded == table and dict(decoded.skipped) == {SVC: (Backend("j2", "127.0.0.3:5000"),)}
    assert decoded.silent == frozenset({"127.0.0.3:5000"})
    shown = merge_status([WorkerView(0, 1, 0, None)], decoded, {}, {})
    assert shown["backends"] == {"app1/web": ["127.0.0.2:5000"]}
    assert shown["unresponsive"] == {"skipped": {"app1/web": ["127.0.0.3:5000"]}, "addresses": ["127.0.0.3:5000"]}


# -- the pool ----------------------------------------------------------------------------


async def test_the_pool_reuses_no_connection_to_a_silent_address() -> None:
    pairs = [socket.socketpair() for _ in range(5)]  # (ours, the backend's)
    try:
        pool = Pool(ProxyConfig())
        quiet, fine = "127.0.0.3:5000", "127.0.0.2:5000"
        socks = [Sock(ours) for ours, _ in pairs]
        pool.put(quiet, socks[0], 0.0)
        pool.put(quiet, socks[1], 0.0)
        pool.put(fine, socks[2], 0.0)
        pool.prune({quiet, fine}, frozenset({quiet}))  # listed (all silent) or not: closed
        assert pool.counts() == {fine: 1} and socks[0].closed and socks[1].closed
        assert pairs[0][1].recv(1) == b""  # the backend sees the connection end
        pool.put(quiet, socks[3], 0.0)  # a request in flight to it came back
        assert pool.take_nowait(quiet, 0.0) is None and socks[3].closed
        assert pool.take_nowait(fine, 0.0) is socks[2]
        pool.put(fine, socks[2], 0.0)
        pool.prune({quiet, fine})  # the host answers again: its connections are reused
        pool.put(quiet, socks[4], 0.0)
        assert pool.take_nowait(quiet, 0.0) is socks[4]
        assert pool.take_nowait(fine, 0.0) is socks[2]
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


# -- the heartbeats' silent set (virtual time) -------------------------------------------


async def test_silent_names_the_unresponsive_and_those_serf_no_longer_calls_alive(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = FakeNodes("a", "b")
    failed: list[str] = []
    beats = Heartbeats(nodes.alive, nodes.probe, SETTINGS, not_alive=lambda: failed)
    t0 = trio.current_time()
    await nursery.start(beats.run)
    await trio.sleep_until(t0 + 3.0)
    assert beats.silent.value == frozenset()
    cut = trio.current_time()
    nodes.hanging.add("b")
    version, silent = await beats.silent.wait_change(beats.silent.version)
    # Last heard at the round before the cut (<= 0.4 s before), silent once over 2 s,
    # seen at the end of a round (every 0.5 s).
    assert silent == frozenset({"b"}) and 1.6 < trio.current_time() - cut <= 2.5
    nodes.members = [m for m in nodes.members if m.name != "b"]  # serf calls b failed
    failed.append("b")
    await trio.sleep(1.0)
    assert beats.silent.value == frozenset({"b"}) and beats.silent.version == version
    failed.clear()
    nodes.members.append(type(nodes.members[0])("b", "b:7100"))  # b is back
    nodes.hanging.clear()
    version, silent = await beats.silent.wait_change(version)
    assert silent == frozenset()


# -- the feed ----------------------------------------------------------------------------


async def test_the_feed_rebuilds_the_table_when_the_silent_hosts_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    async with trio.open_nursery() as nursery:
        state = StateService(MemoryStore("n1"), LonePeers(), http, virtual_ms)
        await nursery.start(state.run)
        routes: Watched[RouteTable] = Watched(RouteTable.build([], {}))
        silent: Watched[frozenset[str]] = Watched(frozenset())
        await nursery.start(partial(feed_routes, state, routes, silent=silent))
        app = App("app1", "hello", T0_MS)
        await state.write([app, Route("rt1", "app1", "http", T0_MS, domain="a.test"),
                           start("j1", "n1"), job("j1", "n1", "127.0.0.2:5000"),
                           start("j2", "n2"), job("j2", "n2", "127.0.0.3:5000")])  # fmt: skip

        async def listed() -> list[str]:
            with trio.fail_after(5):
                version = routes.version
                while (t := routes.value.lookup_http("a.test", "/")) is None or not t.backends:
                    version, _ = await routes.wait_change(version)
            return [b.job_id for b in t.backends]

        assert await listed() == ["j1", "j2"]
        before = trio.current_time()
        silent.set(frozenset({"n2"}))
        version, table = await routes.wait_change(routes.version)
        assert trio.current_time() - before < 0.001  # at once: no debounce on silence
        assert [b.job_id for b in table.backends[SVC]] == ["j1"] and table.silent == {"127.0.0.3:5000"}
        silent.set(frozenset())
        version, table = await routes.wait_change(version)
        assert [b.job_id for b in table.backends[SVC]] == ["j1", "j2"] and not table.silent
        nursery.cancel_scope.cancel()


# -- a real router -----------------------------------------------------------------------


async def answer(port: int, request: bytes = GET) -> bytes:
    """A request on a new client connection, and its response."""
    stream = await trio.open_tcp_stream(LOCAL, port)
    try:
        await stream.send_all(request)
        return await response(stream)
    finally:
        await stream.aclose()


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_router_sends_nothing_new_to_a_silent_host_and_lets_in_flight_finish(
    fast_lane: bool,
) -> None:
    """`quiet` (on host n2) answers the first request of each connection, then holds
    the next until released; `good` (on n1) answers everything."""
    async with trio.open_nursery() as nursery:
        silent = Silent()
        quiet = f"{LOCAL}:{await serve(nursery, silent.handle)}"
        good_backend = HttpBackend("good")
        good = await good_backend.start(nursery)

        def table(*jobs: tuple[str, str, str], silent_hosts: frozenset[str] = frozenset()) -> RouteTable:
            return table_from_state(state_with(list(jobs)), silent_hosts=silent_hosts)

        on_quiet, on_good = ("jq", "n2", quiet), ("jg", "n1", good)
        watched = Watched(table(on_quiet))
        router = Router(watched, address=LOCAL, http_port=0, seed=1, fast_lane=fast_lane)
        port = await nursery.start(router.run)
        with trio.fail_after(20):
            assert (await answer(port)).endswith(b"first")  # upstream connection 1, pooled
            held = await trio.open_tcp_stream(LOCAL, port)
            await held.send_all(GET)  # on connection 1: quiet holds it
            await wait_for(lambda: silent.waiting == 1)
            assert (await answer(port)).endswith(b"first")  # connection 2, pooled idle
            assert router.shared.pool.counts() == {quiet: 1}

            watched.set(table(on_quiet, on_good, silent_hosts=frozenset({"n2"})))
            await wait_for(lambda: router.shared.pool.counts() == {})  # connection 2 closed
            bodies = [await answer(port) for _ in range(20)]
            assert all(b.startswith(b"HTTP/1.1 200 ") and b.endswith(b"hello from good") for b in bodies)
            assert good_backend.hits == 20
            status = router.status()
            assert status["backends"] == {"app1/web": [good]}
            assert status["unresponsive"] == {"skipped": {"app1/web": [quiet]}, "addresses": [quiet]}
            # The request held on the silent host is neither aborted nor retried.
            assert silent.waiting == 1 and router.shared.inflight.count == 1
            assert router.shared.log.written == 0 and status["apps"]["hello"]["retries"] == 0  # type: ignore[index]

            # Every host silent: both stay listed, a request is still answered.
            watched.set(table(on_quiet, on_good, silent_hosts=frozenset({"n1", "n2"})))
            assert (await answer(port)).startswith(b"HTTP/1.1 200 ")

            # n2 answers again: its job is chosen again at once, and the held request
            # gets its (late) answer.
            watched.set(table(on_quiet, on_good))
            silent.release.set()
            late = await response(held)
            assert late.startswith(b"HTTP/1.1 200 ") and late.endswith(b"late"), late
            bodies = [await answer(port) for _ in range(20)]
            assert all(b.startswith(b"HTTP/1.1 200 ") for b in bodies)
            assert any(b.endswith((b"first", b"late")) for b in bodies)  # quiet's again
            await held.aclose()
        nursery.cancel_scope.cancel()
