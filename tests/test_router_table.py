"""RouteTable lookups (table-driven + a Hypothesis property) and the builder from state."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flynnp2p.router.build import table_from_state
from flynnp2p.router.table import (
    BY_PATH,
    HOST_CACHE,
    Backend,
    RouteSpec,
    RouteTable,
    Target,
    normalize_host,
)
from flynnp2p.state.merge import State
from flynnp2p.state.records import App, Job, Placement, Route
from tests.states import state_of


def http(id: str, domain: str, path: str = "/", app: str = "a") -> RouteSpec:
    return RouteSpec(id=id, app_id=app, type="http", domain=domain, path=path)


TABLE = RouteTable.build(
    [
        http("exact", "api.example.com"),
        http("exact-v2", "api.example.com", "/v2"),
        http("exact-v2-deep", "api.example.com", "/v2/admin/"),
        http("wild", "*.example.com"),
        http("wild-img", "*.example.com", "/img"),
        http("wild-deep", "*.b.example.com"),
        http("apex", "example.com"),
        http("pathonly", "paths.test", "/only"),
        RouteSpec(id="tcp1", app_id="t", type="tcp", port=3001),
    ],
    {("a", "web"): [Backend("j2", "127.0.0.1:2"), Backend("j1", "127.0.0.1:1")]},
)


LOOKUPS = [
        ("api.example.com", "/", "exact"),
        ("API.Example.COM", "/", "exact"),
        ("api.example.com.", "/", "exact"),
        ("api.example.com:8080", "/x", "exact"),
        ("api.example.com", "/v2", "exact-v2"),
        ("api.example.com", "/v2/", "exact-v2"),
        ("api.example.com", "/v2/x", "exact-v2"),
        ("api.example.com", "/v2x", "exact"),  # not on a / boundary
        ("api.example.com", "/v2/admin", "exact-v2"),  # the prefix ends in /: needs it
        ("api.example.com", "/v2/admin/users", "exact-v2-deep"),
        ("www.example.com", "/", "wild"),
        ("www.example.com", "/img/a.png", "wild-img"),
        ("www.example.com", "/imgs", "wild"),
        ("x.y.example.com", "/", "wild"),  # a wildcard spans several labels
        ("c.b.example.com", "/img", "wild-deep"),  # the most specific wildcard wins
        ("example.com", "/", "apex"),  # *.example.com does not match the apex
        ("paths.test", "/only/x", "pathonly"),
        ("paths.test", "/other", None),
        ("nothing.test", "/", None),
        ("", "/", None),
        ("com", "/", None),
]  # fmt: skip


@pytest.mark.parametrize(("host", "path", "want"), LOOKUPS)
def test_http_lookup(host: str, path: str, want: str | None) -> None:
    route = TABLE.route_http(host, path)
    assert (route.id if route else None) == want


@pytest.mark.parametrize(("host", "path", "want"), LOOKUPS)
def test_http_lookup_by_host_agrees_with_the_full_lookup(host: str, path: str, want: str | None) -> None:
    """The fast lane's cached lookup by Host alone: the same answer, or BY_PATH where
    the host's routes depend on the path (and then only there)."""
    table = RouteTable.build(TABLE.routes, TABLE.backends)
    for _ in range(2):  # the first answer is computed, the second cached
        found = table.by_host(host.encode("latin-1"))
        if found is BY_PATH:
            assert host.split(":")[0].rstrip(".").lower() in ("api.example.com", "www.example.com",
                                                              "x.y.example.com", "paths.test")  # fmt: skip
        else:
            assert found is None or isinstance(found, Target)
            assert (found.route.id if found else None) == want
            assert found is None or found.backends == table.lookup_http(host, path).backends  # type: ignore[union-attr]


def test_the_host_cache_is_per_table_and_bounded() -> None:
    old = RouteTable.build([http("r", "a.test")], {("a", "web"): [Backend("j1", "127.0.0.1:1")]})
    found = old.by_host(b"a.test")
    assert isinstance(found, Target) and found.route.id == "r"
    new = RouteTable.build([http("r", "a.test", app="b")], {})  # a swap: the new table answers anew
    found = new.by_host(b"a.test")
    assert isinstance(found, Target) and found.route.app_id == "b" and found.backends == ()
    for i in range(HOST_CACHE + 10):
        assert new.by_host(b"h%d.test" % i) is None
    assert len(new._by_host) <= HOST_CACHE


def test_lookup_carries_the_backends_sorted() -> None:
    target = TABLE.lookup_http("api.example.com", "/")
    assert target is not None
    assert [b.job_id for b in target.backends] == ["j1", "j2"]
    assert TABLE.lookup_http("nothing.test", "/") is None


def test_tcp_lookup() -> None:
    target = TABLE.lookup_tcp(3001)
    assert target is not None and target.route.id == "tcp1" and target.backends == ()
    assert TABLE.lookup_tcp(3002) is None
    assert TABLE.tcp_ports == frozenset({3001})


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("Example.COM:80", "example.com"),
        ("example.com.", "example.com"),
        ("[::1]:8080", "[::1]"),
        ("127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_normalize_host(raw: str, want: str) -> None:
    assert normalize_host(raw) == want


def test_tables_compare_by_value() -> None:
    a = RouteTable.build([http("r", "x.test")], {("a", "web"): [Backend("j", "h:1")]})
    b = RouteTable.build([http("r", "x.test")], {("a", "web"): [Backend("j", "h:1")]})
    c = RouteTable.build([http("r", "x.test")], {("a", "web"): [Backend("j", "h:2")]})
    assert a == b and a != c


# -- property: the answer is a match and no matching route is more specific ---------

LABELS = st.sampled_from(["a", "b", "c"])
DOMAINS = st.builds(
    lambda wild, labels: ("*." if wild else "") + ".".join(labels),
    st.booleans(),
    st.lists(LABELS, min_size=1, max_size=3),
)
PATHS = st.builds(
    lambda segs, slash: "/" + "/".join(segs) + ("/" if slash and segs else ""),
    st.lists(st.sampled_from(["x", "y", "xy"]), max_size=3),
    st.booleans(),
)


def matches(r: RouteSpec, host: str, path: str) -> bool:
    assert r.domain is not None
    wild = r.domain.startswith("*.")
    ok = host.endswith("." + r.domain[2:]) if wild else host == r.domain
    p = r.path
    return ok and (p == "/" or path == p or path.startswith(p if p.endswith("/") else p + "/"))


def specificity(r: RouteSpec) -> tuple[int, int, int]:
    assert r.domain is not None
    wild = r.domain.startswith("*.")
    return (0 if wild else 1, len(r.domain), len(r.path))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(DOMAINS, PATHS), max_size=8, unique=True),
    st.lists(LABELS, min_size=1, max_size=4).map(".".join),
    PATHS,
)
def test_chosen_route_is_the_most_specific_match(
    specs: list[tuple[str, str]], host: str, path: str
) -> None:
    routes = [http(f"r{i}", d, p) for i, (d, p) in enumerate(specs)]
    chosen = RouteTable.build(routes, {}).route_http(host, path)
    matching = [r for r in routes if matches(r, host, path)]
    if chosen is None:
        assert matching == []
        return
    assert matches(chosen, host, path)
    assert all(specificity(r) <= specificity(chosen) for r in matching)


# -- the builder ---------------------------------------------------------------------


def job(id: str, state: str, ptype: str = "web", address: str | None = "127.0.0.2:5000",
        one_off: bool = False) -> Job:  # fmt: skip
    return Job(id, "app1", "r1", ptype, "n1", state, 1, 1, address=address, one_off=one_off)


def placement(id: str, action: str) -> Placement:
    return Placement(id, "app1", "r1", "web", "n1", action, 1, 1)


def test_builder_keeps_up_jobs_of_routed_types_that_are_not_stopping() -> None:
    state = state_of(
        App("app1", "hello", 1),
        Route("rt1", "app1", "http", 1, domain="hello.test"),
        Route("rt2", "app1", "tcp", 1, port=3005, process_type="worker"),
        Route("rt3", "gone-app", "http", 1, domain="gone.test"),
        job("up1", "up"), placement("up1", "start"),
        job("up2", "up", address="127.0.0.3:5001"),  # no placement seen yet: still up
        job("stop1", "up"), placement("stop1", "stop"),  # stopping: drained at once
        job("start1", "starting"), job("crash1", "crashed"),
        job("noaddr", "up", address=None),
        job("oneoff", "up", one_off=True),
        job("w1", "up", ptype="worker", address="127.0.0.2:6000"),
        job("other", "up", ptype="clock"),  # no route targets it
    )  # fmt: skip
    table = table_from_state(state)
    target = table.lookup_http("hello.test", "/")
    assert target is not None and target.route.app_name == "hello"
    assert [b.job_id for b in target.backends] == ["up1", "up2"]
    assert target.backends[1].host_port == ("127.0.0.3", 5001)
    tcp = table.lookup_tcp(3005)
    assert tcp is not None and [b.job_id for b in tcp.backends] == ["w1"]
    assert table.lookup_http("gone.test", "/") is None  # the app is gone
    assert ("app1", "clock") not in table.backends


def test_builder_is_deterministic_and_empty_state_gives_empty_table() -> None:
    assert table_from_state(State()) == RouteTable()
    s = state_of(App("app1", "hello", 1), Route("rt1", "app1", "http", 1, domain="h.test"),
                 job("a", "up"), job("b", "up"))  # fmt: skip
    assert table_from_state(s) == table_from_state(s)


def test_a_job_address_that_is_not_ip_and_port_is_no_backend() -> None:
    app = App(id="app1", name="shop", created_at=1)
    r = Route(id="r1", app_id="app1", type="http", created_at=1, domain="shop.test")
    good = job("j1", "up", address="127.0.0.2:5000")
    named = job("j2", "up", address="backend.example:5000")  # a hostname: DNS in the data path
    table = table_from_state(state_of(app, r, good, named))
    assert [b.job_id for b in table.backends[("app1", "web")]] == ["j1"]
