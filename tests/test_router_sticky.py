"""Sticky sessions: a signed cookie keeps a client on one job, from any node's router;
a forged or stale cookie falls back to another job (pure parts and a real router)."""

from __future__ import annotations

import httpx
import trio
from hypothesis import given
from hypothesis import strategies as st

from flynnp2p.router import sticky
from flynnp2p.router.table import RouteTable
from tests.test_router_helpers import LOCAL, HttpBackend, route, start_router, table_of

KEY = sticky.derive_key(b"cluster secret")


def test_a_cookie_names_its_job_for_its_route_only() -> None:
    line = sticky.set_cookie(KEY, "r1", "job-7", secure=True)
    assert line.startswith(b"Set-Cookie: flynnp2p-sticky=job-7.") and line.endswith(b"; Secure\r\n")
    value = line.split(b": ", 1)[1].split(b";")[0]
    cookie = [b"Cookie: a=1; " + value + b"; b=2\r\n"]
    assert sticky.job_of(cookie, KEY, "r1") == "job-7"
    assert sticky.job_of(cookie, KEY, "r2") is None  # another route's
    assert sticky.job_of(cookie, sticky.derive_key(b"other"), "r1") is None  # another cluster's
    forged = [b"Cookie: flynnp2p-sticky=job-8." + value.split(b".")[-1] + b"\r\n"]
    assert sticky.job_of(forged, KEY, "r1") is None
    assert sticky.derive_key(b"cluster secret") == KEY  # every router derives the same key


@given(st.lists(st.binary(max_size=300), max_size=5))
def test_hostile_cookies_are_ignored_never_an_error(lines: list[bytes]) -> None:
    assert sticky.job_of([b"Cookie: " + line for line in lines], KEY, "r1") is None


async def test_a_client_stays_on_its_job_and_moves_when_it_is_gone() -> None:
    async with trio.open_nursery() as nursery:
        web1, web2 = HttpBackend("web1"), HttpBackend("web2")
        a1, a2 = await web1.start(nursery), await web2.start(nursery)
        both = table_of([route("r1", "s.test", sticky=True)], {("app1", "web"): [a1, a2]})
        router, watched, port = await start_router(nursery, both)
        router.shared.sticky_key = KEY
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}") as client:
            r = await client.get("/", headers={"Host": "s.test"})
            first = r.text.split()[-1]
            assert r.status_code == 200 and "flynnp2p-sticky" in r.headers["set-cookie"]
            for _ in range(20):  # the client (httpx keeps cookies) stays on its job
                r = await client.get("/", headers={"Host": "s.test"})
                assert r.text.split()[-1] == first and "set-cookie" not in r.headers
            # Its job leaves the table: another one serves and the cookie moves to it.
            other = a2 if first == "web1" else a1
            gone = next(b for b in both.backends[("app1", "web")] if b.address != other)
            kept = tuple(b for b in both.backends[("app1", "web")] if b is not gone)
            watched.set(RouteTable.build(both.routes, {("app1", "web"): kept}))
            r = await client.get("/", headers={"Host": "s.test"})
            assert r.text.split()[-1] != first and "flynnp2p-sticky" in r.headers["set-cookie"]
        async with httpx.AsyncClient(base_url=f"http://{LOCAL}:{port}") as plain:
            r = await plain.get("/", headers={"Host": "s.test", "Cookie": "flynnp2p-sticky=job-0-x.forged"})
            assert r.status_code == 200 and "flynnp2p-sticky" in r.headers["set-cookie"]
        nursery.cancel_scope.cancel()
