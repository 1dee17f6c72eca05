"""The router's table follows the replicated state: a job that comes up is a
backend on the next table, one the leader stops leaves it at once, a new route
and a deleted app are seen too (a real state service, virtual time)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import httpx
import trio
import trio.testing

from flynnp2p.router.feed import feed_routes
from flynnp2p.router.table import RouteTable
from flynnp2p.state.merge import Delete
from flynnp2p.state.records import App, Job, Placement, Route
from flynnp2p.state.service import StateService
from flynnp2p.state.store import MemoryStore
from flynnp2p.watch import Watched
from tests.test_scheduler_service import T0_MS, LonePeers, virtual_ms

APP = App(id="a1", name="shop", created_at=T0_MS)
ROUTE = Route(id="r1", app_id="a1", type="http", created_at=T0_MS, domain="shop.test")


def job(state: str) -> Job:
    return Job("web-1", "a1", "rel1", "web", "n1", state, T0_MS, T0_MS, address="127.0.0.2:5000")


def placement(action: str) -> Placement:
    return Placement(id="web-1", app_id="a1", release_id="rel1", process_type="web", host="n1",
                     action=action, epoch=1, created_at=T0_MS)  # fmt: skip


async def test_the_table_follows_routes_jobs_and_placements(autojump_clock: trio.testing.MockClock) -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    async with trio.open_nursery() as nursery:
        state = StateService(MemoryStore("n1"), LonePeers(), http, virtual_ms)
        await nursery.start(state.run)
        routes: Watched[RouteTable] = Watched(RouteTable.build([], {}))
        await nursery.start(feed_routes, state, routes)

        async def table_where(check: Callable[[RouteTable], bool]) -> None:
            with trio.fail_after(5):  # virtual seconds: the debounce is 20 ms
                version, table = routes.version, routes.value
                while not check(table):
                    version, table = await routes.wait_change(version)

        def backends(table: RouteTable) -> list[str]:
            found = table.lookup_http("shop.test", "/")
            return [] if found is None else [b.job_id for b in found.backends]

        await state.write([APP, ROUTE, placement("start"), job("starting")])
        await table_where(lambda t: t.lookup_http("shop.test", "/") is not None)
        assert backends(routes.value) == []  # starting: no traffic yet
        await state.write([job("up")])
        await table_where(lambda t: backends(t) == ["web-1"])
        await state.write([placement("stop")])  # draining: out before its host acts
        await table_where(lambda t: backends(t) == [])
        await state.write([Delete(App.KIND, "a1")])
        await table_where(lambda t: t.lookup_http("shop.test", "/") is None)
        nursery.cancel_scope.cancel()


async def test_the_api_route_and_certificates_follow_the_cluster_config(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from flynnp2p.coord.ca import ClusterCA
    from flynnp2p.router.tls import CertStore
    from flynnp2p.state.records import Certificate, ClusterConfig
    from flynnp2p.token import ClusterToken
    from tests.certs import make_cert

    token = ClusterToken.generate()
    certs = CertStore(ClusterCA(token.cluster_id, token.admin_secret), "flynnp2p.localhost")
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    async with trio.open_nursery() as nursery:
        state = StateService(MemoryStore("n1"), LonePeers(), http, virtual_ms)
        await nursery.start(state.run)
        routes: Watched[RouteTable] = Watched(RouteTable.build([], {}))
        await nursery.start(
            partial(feed_routes, state, routes, api_address="127.0.0.9:7100", certs=certs)
        )

        async def api_backends(domain: str) -> list[str]:
            with trio.fail_after(5):
                version = routes.version
                while (found := routes.value.lookup_http(f"api.{domain}", "/v1/status")) is None:
                    version, _ = await routes.wait_change(version)
            return [b.address for b in found.backends]

        assert await api_backends("flynnp2p.localhost") == ["127.0.0.9:7100"]
        cert_pem, key_pem = make_cert("shop.test")
        await state.write([
            ClusterConfig(domain="cluster.test", created_at=T0_MS),
            Certificate(id="c1", domains=("shop.test",), cert_pem=cert_pem, key_pem=key_pem, created_at=T0_MS),
        ])  # fmt: skip
        assert await api_backends("cluster.test") == ["127.0.0.9:7100"]
        assert routes.value.lookup_http("api.flynnp2p.localhost", "/") is None
        assert certs.domain == "cluster.test" and set(certs.by_id) == {"c1"}
        nursery.cancel_scope.cancel()
