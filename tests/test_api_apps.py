"""Component tests of the app API (flynnp2p/api/apps.py).

The blueprint runs in the real quart-trio app (auth, JSON errors) over a real
`StateService` holding a `MemoryStore`, with no peers unless a test adds one.
Two nodes (a follower forwarding to the leader) talk through an
`httpx.MockTransport` that hands the request to the leader's app in-process.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from quart_trio import QuartTrio

from flynnp2p.api.app import FORWARDED, create_app
from flynnp2p.api.apps import apps_blueprint
from flynnp2p.coord.claims import Claims
from flynnp2p.errors import UNTOUCHED_HEADER
from flynnp2p.peering import Peer
from flynnp2p.state.merge import State
from flynnp2p.state.records import (
    App,
    Artifact,
    Certificate,
    ClusterConfig,
    Formation,
    Release,
    Route,
)
from flynnp2p.state.service import StateService
from flynnp2p.state.store import MemoryStore
from flynnp2p.token import ClusterToken
from tests.certs import NOW as CERT_NOW
from tests.certs import make_cert
from tests.fake_etcd import MemoryEtcd

TOKEN = ClusterToken.generate()
AUTH = {"Authorization": f"Bearer {TOKEN.api_key}"}


# -- fakes ------------------------------------------------------------------


class Peers:
    """Membership for the state service: no peers, or ones that never acknowledge."""

    def __init__(self, alive: list[Peer] | None = None) -> None:
        self.alive = alive or []

    def alive_peers(self) -> list[Peer]:
        return list(self.alive)

    async def send_hint(self, payload: bytes) -> None:
        pass

    @asynccontextmanager
    async def hints(self) -> AsyncIterator[AsyncIterator[bytes]]:
        async def never() -> AsyncIterator[bytes]:
            await trio.sleep_forever()
            yield b""  # pragma: no cover

        yield never()


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        self.ms += 1000
        return self.ms


@dataclass
class Ctx:
    state: StateService
    clock: Clock
    leader: bool = True
    leader_addr: str | None = "leader.test:7100"
    peer_key: str = TOKEN.peer_key
    cluster_domain: str = "flynnp2p.localhost"
    etcd: MemoryEtcd = field(default_factory=MemoryEtcd)

    def is_leader(self) -> bool:
        return self.leader

    async def acting_leader(self) -> bool:
        return self.leader

    def leader_api(self) -> str | None:
        return self.leader_addr

    def now_ms(self) -> int:
        return self.clock()

    def claims(self) -> Claims:
        return Claims(self.etcd)


@dataclass
class Node:
    token: ClusterToken = TOKEN
    ready: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        return {}

    def members(self) -> list[dict[str, Any]]:
        return []


async def start_service(nursery: trio.Nursery, peers: Peers | None = None, name: str = "n1") -> StateService:
    clock = Clock()
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    service = StateService(MemoryStore(name), peers or Peers(), http, clock)
    await nursery.start(service.run)
    return service


def make_app(ctx: Ctx, transport: httpx.AsyncBaseTransport | None = None) -> QuartTrio:
    app = create_app(Node())
    app.register_blueprint(apps_blueprint(ctx, transport=transport, rng=random.Random(7)))
    return app


class Api:
    """A test client that sends the bearer and decodes JSON."""

    def __init__(self, app: QuartTrio) -> None:
        self.client = app.test_client()

    async def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"method": method, "headers": {**AUTH, **(headers or {})}}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        resp = await self.client.open(path, **kwargs)
        self.last_headers = resp.headers
        data = await resp.get_data()
        return resp.status_code, json.loads(data) if data else None

    @property
    def untouched(self) -> bool:
        """Whether the last answer says the cluster did nothing (any client may retry)."""
        return self.last_headers.get(UNTOUCHED_HEADER) == "1"


@pytest.fixture
async def node(nursery: trio.Nursery) -> tuple[Ctx, Api]:
    service = await start_service(nursery)
    ctx = Ctx(service, Clock())
    return ctx, Api(make_app(ctx))


async def seed(api: Api, name: str = "myapp") -> dict[str, Any]:
    """An app with a release that has web and worker processes."""
    status, app = await api.call("POST", "/v1/apps", {"name": name})
    assert status == 201, app
    status, rel = await api.call(
        "POST",
        f"/v1/apps/{name}/releases",
        {"processes": {"web": {"command": "python app.py", "ports": [8080]},
                       "worker": {"command": "python worker.py"}},
         "env": {"A": "1"}},
    )  # fmt: skip
    assert status == 201, rel
    return {"app": app["app"], "release": rel["release"]}


def same(a: State, b: State) -> bool:
    return a.vv == b.vv and list(a.entries()) == list(b.entries())


# -- apps -------------------------------------------------------------------


async def test_create_app_writes_app_and_default_route(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    status, body = await api.call("POST", "/v1/apps", {"name": "web-1", "meta": {"team": "a"}})
    assert status == 201
    assert body["replicas"] == 1
    app = body["app"]
    assert app["name"] == "web-1" and app["meta"] == {"team": "a"}
    assert [r["domain"] for r in body["routes"]] == ["web-1.flynnp2p.localhost"]
    state = ctx.state.state
    assert state.record(App, app["id"]) is not None
    assert [r.domain for r in state.records(Route)] == ["web-1.flynnp2p.localhost"]

    for ref in ("web-1", app["id"]):
        status, got = await api.call("GET", f"/v1/apps/{ref}")
        assert status == 200 and got["app"] == app
        assert got["release"] is None and got["formation"] is None and len(got["routes"]) == 1
    status, listed = await api.call("GET", "/v1/apps")
    assert [a["name"] for a in listed["apps"]] == ["web-1"]


async def test_create_app_without_a_name_generates_one(node: tuple[Ctx, Api]) -> None:
    _, api = node
    status, body = await api.call("POST", "/v1/apps")
    assert status == 201
    assert re.fullmatch(r"[a-z]+-[a-z]+-[0-9]{4}", body["app"]["name"])
    status, again = await api.call("POST", "/v1/apps", {})
    assert status == 201 and again["app"]["name"] != body["app"]["name"]


async def test_duplicate_app_name_is_a_409_naming_the_app(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    _, first = await api.call("POST", "/v1/apps", {"name": "dup"})
    before = ctx.state.state
    status, body = await api.call("POST", "/v1/apps", {"name": "dup"})
    assert status == 409
    assert body["error"]["code"] == "conflict"
    assert first["app"]["id"] in body["error"]["message"]
    assert same(before, ctx.state.state)


async def test_concurrent_creates_of_one_name_make_one_app(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    statuses: list[int] = []

    async def create() -> None:
        status, _ = await api.call("POST", "/v1/apps", {"name": "race"})
        statuses.append(status)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(create)
    assert sorted(statuses) == [201] + [409] * 7
    assert [a.name for a in ctx.state.state.records(App)] == ["race"]


async def test_patch_app_merges_meta_and_sets_strategy(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await api.call("POST", "/v1/apps", {"name": "p", "meta": {"a": "1", "b": "2"}})
    status, body = await api.call(
        "PATCH", "/v1/apps/p", {"meta": {"a": None, "c": "3"}, "strategy": "one-by-one"}
    )
    assert status == 200 and body["replicas"] == 1
    assert body["app"]["meta"] == {"b": "2", "c": "3"}
    app = ctx.state.state.records(App)[0]
    assert app.strategy == "one-by-one" and dict(app.meta) == {"b": "2", "c": "3"}
    status, body = await api.call(
        "PATCH", "/v1/apps/p", {"deploy_timeout_s": 30, "build_memory_mb": 2048, "build_timeout_s": 60}
    )
    assert status == 200
    app = ctx.state.state.records(App)[0]
    assert (app.deploy_timeout_s, app.build_memory_mb, app.build_timeout_s) == (30, 2048, 60)
    assert app.strategy == "one-by-one" and dict(app.meta) == {"b": "2", "c": "3"}


async def test_delete_app_deletes_routes_and_formation(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    seeded = await seed(api, "gone")
    await api.call("POST", "/v1/apps/gone/routes", {"type": "tcp", "port": 9000})
    await api.call("PUT", "/v1/apps/gone/formation", {"processes": {"web": 1}})
    await seed(api, "kept")
    status, body = await api.call("DELETE", "/v1/apps/gone")
    assert status == 200
    assert body["deleted"]["formation"] is True and len(body["deleted"]["routes"]) == 2
    state = ctx.state.state
    assert [a.name for a in state.records(App)] == ["kept"]
    assert state.record(Formation, seeded["app"]["id"]) is None
    assert {r.domain for r in state.records(Route)} == {"kept.flynnp2p.localhost"}
    status, _ = await api.call("GET", "/v1/apps/gone")
    assert status == 404
    # The name is free again.
    status, _ = await api.call("POST", "/v1/apps", {"name": "gone"})
    assert status == 201


# -- releases ---------------------------------------------------------------


async def test_releases_are_listed_newest_first_and_immutable(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    seeded = await seed(api)
    status, second = await api.call("POST", "/v1/apps/myapp/releases", {"meta": {"note": "2nd"}})
    assert status == 201 and second["replicas"] == 1
    status, listed = await api.call("GET", "/v1/apps/myapp/releases")
    assert [r["id"] for r in listed["releases"]] == [second["release"]["id"], seeded["release"]["id"]]
    rid = seeded["release"]["id"]
    status, one = await api.call("GET", f"/v1/apps/myapp/releases/{rid}")
    assert status == 200 and one["release"]["processes"]["web"]["ports"] == [8080]
    assert one["release"]["processes"]["web"]["memory_mb"] == 512  # defaults filled in
    before = ctx.state.state
    for method in ("PUT", "DELETE", "PATCH"):
        status, body = await api.call(method, f"/v1/apps/myapp/releases/{rid}", {})
        assert status == 405, body
        assert body["error"]["code"] == "method_not_allowed"
    assert same(before, ctx.state.state)


async def test_release_of_another_app_is_not_found(node: tuple[Ctx, Api]) -> None:
    _, api = node
    seeded = await seed(api, "one")
    await seed(api, "two")
    status, body = await api.call("GET", f"/v1/apps/two/releases/{seeded['release']['id']}")
    assert status == 404 and "two" in body["error"]["message"]


async def test_release_artifacts_must_exist(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await seed(api)
    status, body = await api.call("POST", "/v1/apps/myapp/releases", {"artifacts": ["nope"]})
    assert status == 400 and "release.artifacts[0]" in body["error"]["message"]
    artifact = Artifact(id="img1", type="docker", uri="docker:nginx", created_at=1)
    await ctx.state.write([artifact])
    status, body = await api.call("POST", "/v1/apps/myapp/releases", {"artifacts": ["img1"]})
    assert status == 201 and body["release"]["artifacts"] == ["img1"]


# -- formation --------------------------------------------------------------


async def test_formation_needs_a_release(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await api.call("POST", "/v1/apps", {"name": "bare"})
    status, body = await api.call("GET", "/v1/apps/bare/formation")
    assert status == 200 and body == {"formation": None}
    before = ctx.state.state
    status, body = await api.call("PUT", "/v1/apps/bare/formation", {"processes": {"web": 1}})
    assert status == 400 and "create a release first" in body["error"]["message"]
    assert same(before, ctx.state.state)


async def test_scale_defaults_to_the_newest_release_then_keeps_the_formations(
    node: tuple[Ctx, Api],
) -> None:
    ctx, api = node
    seeded = await seed(api)
    rid = seeded["release"]["id"]
    status, body = await api.call("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 2}})
    assert status == 200 and body["replicas"] == 1
    assert body["formation"]["release_id"] == rid and body["formation"]["processes"] == {"web": 2}
    # A newer release does not move the formation until asked.
    _, newer = await api.call(
        "POST", "/v1/apps/myapp/releases", {"processes": {"web": {"command": "v2"}}}
    )
    status, body = await api.call("PUT", "/v1/apps/myapp/formation", {"processes": {"worker": 1}})
    assert status == 200 and body["formation"]["release_id"] == rid
    new_id = newer["release"]["id"]
    status, body = await api.call(
        "PUT", "/v1/apps/myapp/formation", {"processes": {"web": 3}, "release_id": new_id}
    )
    assert status == 200 and body["formation"]["release_id"] == new_id
    formation = ctx.state.state.record(Formation, seeded["app"]["id"])
    assert formation is not None and dict(formation.processes) == {"web": 3}
    status, got = await api.call("GET", "/v1/apps/myapp/formation")
    assert got["formation"]["processes"] == {"web": 3}


async def test_unknown_process_type_names_the_types_the_release_has(node: tuple[Ctx, Api]) -> None:
    _, api = node
    await seed(api)
    status, body = await api.call("PUT", "/v1/apps/myapp/formation", {"processes": {"clock": 1}})
    assert status == 400
    message = body["error"]["message"]
    assert "'clock'" in message and "web, worker" in message


async def test_formation_constraints_per_type_are_kept_changed_and_checked(
    node: tuple[Ctx, Api],
) -> None:
    _, api = node
    await seed(api)
    path = "/v1/apps/myapp/formation"
    status, body = await api.call(
        "PUT", path, {"processes": {"web": 1}, "constraints": {"web": {"disk": "ssd"}}}
    )
    assert status == 200 and body["formation"]["constraints"] == {"web": {"disk": "ssd"}}
    status, body = await api.call("PUT", path, {"processes": {"web": 2}})  # kept
    assert body["formation"]["constraints"] == {"web": {"disk": "ssd"}}
    status, body = await api.call("PUT", path, {"processes": {"web": 2}, "constraints": {"web": {}}})
    assert body["formation"]["constraints"] == {}  # {} drops them
    for bad, where in (
        ({"web": {"disk": "x" * 129}}, "formation.constraints.web.disk"),
        ({"web": {"Disk": "ssd"}}, "formation.constraints.web"),
        ({"web": "ssd"}, "formation.constraints.web"),
    ):
        status, body = await api.call("PUT", path, {"processes": {"web": 1}, "constraints": bad})
        assert status == 400 and where in body["error"]["message"], body


# -- env --------------------------------------------------------------------


async def test_env_patch_makes_a_release_and_points_the_formation_at_it(
    node: tuple[Ctx, Api],
) -> None:
    ctx, api = node
    seeded = await seed(api)
    await api.call("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 2}})
    status, body = await api.call("GET", "/v1/apps/myapp/env")
    assert status == 200 and body == {"env": {"A": "1"}, "release_id": seeded["release"]["id"]}

    status, body = await api.call("PATCH", "/v1/apps/myapp/env", {"set": {"B": "2"}, "unset": ["A"]})
    assert status == 200 and body["env"] == {"B": "2"} and body["replicas"] == 1
    new = body["release"]
    assert new["id"] != seeded["release"]["id"]
    assert new["processes"] == seeded["release"]["processes"]  # copied
    state = ctx.state.state
    formation = state.record(Formation, seeded["app"]["id"])
    assert formation is not None
    assert formation.release_id == new["id"] and dict(formation.processes) == {"web": 2}
    old = state.record(Release, seeded["release"]["id"])
    assert old is not None and dict(old.env) == {"A": "1"}  # releases are immutable
    status, body = await api.call("GET", "/v1/apps/myapp/env")
    assert body["env"] == {"B": "2"}


async def test_env_on_an_app_without_releases_creates_one(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await api.call("POST", "/v1/apps", {"name": "fresh"})
    status, body = await api.call("PATCH", "/v1/apps/fresh/env", {"set": {"DATABASE_URL": "x"}})
    assert status == 200
    assert body["formation"]["processes"] == {} and body["release"]["env"] == {"DATABASE_URL": "x"}
    assert len(ctx.state.state.records(Release)) == 1


# -- routes -----------------------------------------------------------------


async def test_routes_add_list_remove(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await seed(api)
    status, http_route = await api.call(
        "POST", "/v1/apps/myapp/routes", {"type": "http", "domain": "example.com", "path": "/api"}
    )
    assert status == 201 and http_route["replicas"] == 1
    status, tcp = await api.call("POST", "/v1/apps/myapp/routes", {"type": "tcp", "port": 9000})
    assert status == 201
    status, listed = await api.call("GET", "/v1/apps/myapp/routes")
    kinds = [(r["type"], r.get("domain"), r["path"], r.get("port")) for r in listed["routes"]]
    assert kinds == [
        ("http", "example.com", "/api", None),
        ("http", "myapp.flynnp2p.localhost", "/", None),
        ("tcp", None, "/", 9000),
    ]
    rid = tcp["route"]["id"]
    status, body = await api.call("DELETE", f"/v1/apps/myapp/routes/{rid}")
    assert status == 200 and body["deleted"] == rid
    assert ctx.state.state.record(Route, rid) is None


async def test_a_tcp_route_without_a_port_takes_the_lowest_free_one(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await seed(api)
    await ctx.state.write([ClusterConfig(domain="flynnp2p.localhost", created_at=1, tcp_port_min=4000, tcp_port_max=4002)])
    status, first = await api.call("POST", "/v1/apps/myapp/routes", {"type": "tcp", "port": 4000})
    assert status == 201
    status, picked = await api.call("POST", "/v1/apps/myapp/routes", {"type": "tcp"})
    assert status == 201 and picked["route"]["port"] == 4001
    # A retry with the same Idempotency-Key answers with the port the first attempt took.
    key = {"Idempotency-Key": "k-1"}
    status, made = await api.call("POST", "/v1/apps/myapp/routes", {"type": "tcp"}, headers=key)
    status2, again = await api.call("POST", "/v1/apps/myapp/routes", {"type": "tcp"}, headers=key)
    assert (status, status2) == (201, 201) and made["route"]["port"] == again["route"]["port"] == 4002
    before = ctx.state.state
    status, full = await api.call("POST", "/v1/apps/myapp/routes", {"type": "tcp"})
    assert status == 409 and "no free TCP route port in 4000-4002" in full["error"]["message"]
    assert same(before, ctx.state.state)
    await api.call("DELETE", f"/v1/apps/myapp/routes/{first['route']['id']}")
    status, reused = await api.call("POST", "/v1/apps/myapp/routes", {"type": "tcp"})
    assert status == 201 and reused["route"]["port"] == 4000


@pytest.mark.parametrize(
    ("taken", "again"),
    [
        ({"type": "tcp", "port": 9000}, {"type": "tcp", "port": 9000}),
        ({"type": "http", "domain": "a.example"}, {"type": "http", "domain": "a.example", "path": "/"}),
        ({"type": "http", "domain": "a.example", "path": "/x"}, {"type": "http", "domain": "a.example", "path": "/x"}),
    ],
)  # fmt: skip
async def test_route_clash_is_a_409_naming_the_owner(
    node: tuple[Ctx, Api], taken: dict[str, Any], again: dict[str, Any]
) -> None:
    ctx, api = node
    await seed(api, "owner")
    await seed(api, "other")
    status, _ = await api.call("POST", "/v1/apps/owner/routes", taken)
    assert status == 201
    before = ctx.state.state
    for app in ("owner", "other"):
        status, body = await api.call("POST", f"/v1/apps/{app}/routes", again)
        assert status == 409, body
        assert "owner" in body["error"]["message"]
    assert same(before, ctx.state.state)


async def test_default_route_clash_refuses_the_app(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await seed(api, "first")
    await api.call(
        "POST", "/v1/apps/first/routes", {"type": "http", "domain": "second.flynnp2p.localhost"}
    )
    before = ctx.state.state
    status, body = await api.call("POST", "/v1/apps", {"name": "second"})
    assert status == 409 and "first" in body["error"]["message"]
    assert same(before, ctx.state.state)


async def test_route_of_another_app_cannot_be_removed(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await seed(api, "one")
    await seed(api, "two")
    route = next(r for r in ctx.state.state.records(Route) if r.domain and r.domain.startswith("one."))
    status, _ = await api.call("DELETE", f"/v1/apps/two/routes/{route.id}")
    assert status == 404
    assert ctx.state.state.record(Route, route.id) is not None


# -- hostile input ----------------------------------------------------------

WEB = {"command": "x"}
HOSTILE: list[tuple[str, str, Any, int]] = [
    # (method, path, body: bytes = raw, else JSON, expected status)
    ("POST", "/v1/apps", b"{", 400),
    ("POST", "/v1/apps", b"[]", 400),
    ("POST", "/v1/apps", b"NaN", 400),
    ("POST", "/v1/apps", b'{"name": Infinity}', 400),
    ("POST", "/v1/apps", b"\xff\xfe\x00garbage", 400),
    ("POST", "/v1/apps", b"[" * 100_000, 400),
    ("POST", "/v1/apps", b'{"name": "' + b"a" * (2 << 20) + b'"}', 413),
    ("POST", "/v1/apps", b'{"name": 1' + b"0" * 5000 + b"}", 400),
    ("POST", "/v1/apps", {"name": 5}, 400),
    ("POST", "/v1/apps", {"name": "../etc"}, 400),
    ("POST", "/v1/apps", {"name": "ünïcode"}, 400),
    ("POST", "/v1/apps", {"name": "a" * 64}, 400),
    ("POST", "/v1/apps", {"name": "Upper"}, 400),
    ("POST", "/v1/apps", {"name": "trailing-"}, 400),
    ("POST", "/v1/apps", {"name": "a\x00b"}, 400),
    ("POST", "/v1/apps", {"name": "ok", "id": "mine"}, 400),
    ("POST", "/v1/apps", {"meta": "x"}, 400),
    ("POST", "/v1/apps", {"meta": {"k": 1}}, 400),
    ("POST", "/v1/apps", {"meta": {"bad key": "v"}}, 400),
    ("GET", "/v1/apps/..%2F..%2Fetc", None, 404),  # the router decodes %2F: no such endpoint
    ("GET", "/v1/apps/%C3%BC", None, 400),
    ("GET", "/v1/apps/nope", None, 404),
    ("GET", "/v1/apps/myapp/../../etc/passwd", None, 404),
    ("PATCH", "/v1/apps/myapp", {}, 400),
    ("PATCH", "/v1/apps/myapp", {"strategy": "yolo"}, 400),
    ("PATCH", "/v1/apps/myapp", {"build_memory_mb": 1}, 400),
    ("PATCH", "/v1/apps/myapp", {"deploy_timeout_s": "soon"}, 400),
    ("PATCH", "/v1/apps/myapp", {"meta": []}, 400),
    ("PATCH", "/v1/apps/myapp", {"name": "renamed"}, 400),
    ("DELETE", "/v1/apps/nope", None, 404),
    ("POST", "/v1/apps/nope/releases", {}, 404),
    ("POST", "/v1/apps/myapp/releases", {"id": "mine"}, 400),
    ("POST", "/v1/apps/myapp/releases", {"app_id": "other"}, 400),
    ("POST", "/v1/apps/myapp/releases", {"processes": {"web": {"command": ""}}}, 400),
    ("POST", "/v1/apps/myapp/releases", {"processes": {"../x": WEB}}, 400),
    ("POST", "/v1/apps/myapp/releases", {"processes": {"web": {**WEB, "memory_mb": 1}}}, 400),
    ("POST", "/v1/apps/myapp/releases", {"processes": {"web": {**WEB, "bogus": 1}}}, 400),
    ("POST", "/v1/apps/myapp/releases", {"processes": {"web": {**WEB, "ports": ["80"]}}}, 400),
    ("POST", "/v1/apps/myapp/releases", {"processes": {"web": {**WEB, "omni": "yes"}}}, 400),
    ("POST", "/v1/apps/myapp/releases",
     {"processes": {"web": {**WEB, "health_check": {"type": "http"}}}}, 400),
    ("POST", "/v1/apps/myapp/releases", {"processes": [WEB]}, 400),
    ("POST", "/v1/apps/myapp/releases", {"env": {"1BAD": "x"}}, 400),
    ("POST", "/v1/apps/myapp/releases", {"env": {"A": None}}, 400),
    ("POST", "/v1/apps/myapp/releases", {"artifacts": "abc"}, 400),
    ("GET", "/v1/apps/myapp/releases/nope", None, 404),
    ("PUT", "/v1/apps/myapp/formation", {}, 400),
    ("PUT", "/v1/apps/myapp/formation", {"processes": {"web": -1}}, 400),
    ("PUT", "/v1/apps/myapp/formation", {"processes": {"web": True}}, 400),
    ("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 1.5}}, 400),
    ("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 10**6}}, 400),
    ("PUT", "/v1/apps/myapp/formation", {"processes": {"nope": 1}}, 400),
    ("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 1}, "release_id": "nope"}, 400),
    ("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 1}, "release_id": "../x"}, 400),
    ("PUT", "/v1/apps/myapp/formation", {"processes": "web=1"}, 400),
    ("PATCH", "/v1/apps/myapp/env", {}, 400),
    ("PATCH", "/v1/apps/myapp/env", {"set": {"A B": "x"}}, 400),
    ("PATCH", "/v1/apps/myapp/env", {"set": {"A": 1}}, 400),
    ("PATCH", "/v1/apps/myapp/env", {"set": {"A": "x" * 40_000}}, 400),
    ("PATCH", "/v1/apps/myapp/env", {"unset": "A"}, 400),
    ("PATCH", "/v1/apps/myapp/env", {"set": {"A": "1"}, "unset": ["A"]}, 400),
    ("PATCH", "/v1/apps/myapp/env", {"add": {"A": "1"}}, 400),
    ("POST", "/v1/apps/myapp/routes", {}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "ftp"}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "tcp", "port": 3000.5}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "tcp", "port": 70000}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "tcp", "port": 0}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "tcp", "port": "80"}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "tcp", "port": 80, "domain": "x.com"}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "http"}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "http", "domain": "Bad_Domain"}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "http", "domain": "x.com", "path": "nope"}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "http", "domain": "x.com", "path": "/a b"}, 400),
    ("POST", "/v1/apps/myapp/routes", {"type": "http", "domain": "x.com", "id": "r"}, 400),
    ("DELETE", "/v1/apps/myapp/routes/nope", None, 404),
    ("DELETE", "/v1/apps/myapp/routes/%2E%2E", None, 400),
    ("PUT", "/v1/apps/myapp/releases/x", {}, 405),
    ("POST", "/v1/apps/myapp", {}, 405),
    ("GET", "/v1/events?kinds=bogus", None, 400),
]


@pytest.mark.parametrize(("method", "path", "body", "expected"), HOSTILE)
async def test_hostile_input_is_a_4xx_and_changes_nothing(
    node: tuple[Ctx, Api], method: str, path: str, body: Any, expected: int
) -> None:
    ctx, api = node
    await seed(api)
    before = ctx.state.state
    raw = body if isinstance(body, bytes) else None
    status, answer = await api.call(method, path, None if raw is not None else body, raw=raw)
    assert status == expected, answer
    assert set(answer) == {"error"} and answer["error"]["code"] and answer["error"]["message"]
    assert "Traceback" not in answer["error"]["message"]
    assert same(before, ctx.state.state)


async def test_errors_name_the_field_and_what_is_accepted(node: tuple[Ctx, Api]) -> None:
    _, api = node
    await seed(api)
    cases = [
        ("POST", "/v1/apps", {"name": "Bad"}, ["name", "lowercase letters"]),
        ("POST", "/v1/apps", {"nmae": "x"}, ["nmae", "accepted", "meta", "name"]),
        ("POST", "/v1/apps/myapp/releases", {"processes": {"web": {**WEB, "memory_mb": 1}}},
         ["release.processes.web.memory_mb", "16"]),
        ("PUT", "/v1/apps/myapp/formation", {"processes": {"web": -1}},
         ["formation.processes.web", "from 0 to 10000"]),
        ("PATCH", "/v1/apps/myapp/env", {"set": {"A B": "x"}}, ["env.set", "environment variable"]),
        ("POST", "/v1/apps/myapp/routes", {"type": "tcp", "port": "80"}, ["route.port", "integer"]),
        ("GET", "/v1/events?kinds=apps", None, ["kinds", "app, artifact"]),
    ]  # fmt: skip
    for method, path, body, words in cases:
        status, answer = await api.call(method, path, body)
        assert status == 400, (path, answer)
        for word in words:
            assert word in answer["error"]["message"], (word, answer)


async def test_requests_need_the_bearer(node: tuple[Ctx, Api]) -> None:
    _, api = node
    resp = await api.client.post("/v1/apps", json={"name": "x"})
    assert resp.status_code == 401


# -- the leader allocates names and ports --------------------------------------


@dataclass
class TwoNodes:
    leader: Ctx
    follower: Ctx
    leader_api: Api
    follower_api: Api
    forwarded: list[httpx.Request]


def relay_to(app: QuartTrio, seen: list[httpx.Request]) -> httpx.MockTransport:
    """A transport that delivers the request to `app` in-process."""
    client = app.test_client()

    async def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        request: dict[str, Any] = {"method": req.method, "data": req.content, "headers": dict(req.headers)}
        resp = await client.open(req.url.path, **request)
        return httpx.Response(resp.status_code, content=await resp.get_data(),
                              headers={"content-type": resp.content_type})  # fmt: skip

    return httpx.MockTransport(handler)


@pytest.fixture
async def two(nursery: trio.Nursery) -> TwoNodes:
    leader = Ctx(await start_service(nursery, name="n1"), Clock(), leader=True)
    follower = Ctx(await start_service(nursery, name="n2"), Clock(), leader=False)
    seen: list[httpx.Request] = []
    leader_app = make_app(leader)
    follower_app = make_app(follower, transport=relay_to(leader_app, seen))
    return TwoNodes(leader, follower, Api(leader_app), Api(follower_app), seen)


async def test_a_follower_forwards_app_creation_to_the_leader(two: TwoNodes) -> None:
    status, body = await two.follower_api.call("POST", "/v1/apps", {"name": "fwd"})
    assert status == 201, body
    assert [a.name for a in two.leader.state.state.records(App)] == ["fwd"]
    assert two.follower.state.state.records(App) == []  # written on the leader only
    (req,) = two.forwarded
    assert str(req.url) == "http://leader.test:7100/v1/apps"
    assert req.headers[FORWARDED] == "1"
    assert req.headers["authorization"] == f"Bearer {TOKEN.peer_key}"

    status, body = await two.follower_api.call("POST", "/v1/apps", {"name": "fwd"})
    assert status == 409 and body["error"]["code"] == "conflict"


async def test_a_follower_forwards_tcp_routes_to_the_leader(two: TwoNodes) -> None:
    _, created = await two.leader_api.call("POST", "/v1/apps", {"name": "tcpapp"})
    app = two.leader.state.state.record(App, created["app"]["id"])
    assert app is not None
    await two.follower.state.write([app])  # as replication would
    status, body = await two.follower_api.call(
        "POST", "/v1/apps/tcpapp/routes", {"type": "tcp", "port": 5432}
    )
    assert status == 201, body
    assert [r.port for r in two.leader.state.state.records(Route) if r.type == "tcp"] == [5432]
    status, body = await two.follower_api.call(
        "POST", "/v1/apps/tcpapp/routes", {"type": "tcp", "port": 5432}
    )
    assert status == 409 and "5432" in body["error"]["message"]


async def test_bad_input_is_refused_before_forwarding(two: TwoNodes) -> None:
    status, _ = await two.follower_api.call("POST", "/v1/apps", {"name": "Bad Name"})
    assert status == 400 and two.forwarded == []


async def test_no_leader_is_a_503(two: TwoNodes) -> None:
    two.follower.leader_addr = None
    status, body = await two.follower_api.call("POST", "/v1/apps", {"name": "x"})
    assert status == 503 and "no leader" in body["error"]["message"]
    assert two.follower_api.untouched  # nothing done: even a POST may be sent again
    assert two.leader.state.state.records(App) == []


async def test_a_forwarded_request_is_never_forwarded_again(two: TwoNodes) -> None:
    peer = {FORWARDED: "1", "Authorization": f"Bearer {TOKEN.peer_key}"}  # as a node forwards
    status, body = await two.follower_api.call("POST", "/v1/apps", {"name": "x"}, headers=peer)
    assert status == 503 and "no longer the leader" in body["error"]["message"]
    assert two.follower_api.untouched and two.forwarded == []


async def test_an_unreachable_leader_is_a_503(nursery: trio.Nursery) -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=req)

    ctx = Ctx(await start_service(nursery), Clock(), leader=False)
    api = Api(make_app(ctx, transport=httpx.MockTransport(refuse)))
    status, body = await api.call("POST", "/v1/apps", {"name": "x"})
    assert status == 503 and "leader.test:7100" in body["error"]["message"] and api.untouched


async def test_a_write_no_peer_acknowledges_is_a_503(nursery: trio.Nursery) -> None:
    service = await start_service(nursery, Peers([Peer("n2", "127.0.0.1:1")]))
    api = Api(make_app(Ctx(service, Clock())))
    status, body = await api.call("POST", "/v1/apps", {"name": "x"})
    assert status == 503 and body["error"]["code"] == "unavailable"
    assert not api.untouched  # written here, maybe not elsewhere: not for a blind retry


# -- events -----------------------------------------------------------------


class Stream:
    """Reads an SSE response from the test client, event by event."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.buffer = b""

    async def next_event(self) -> dict[str, Any]:
        with trio.fail_after(5):
            while True:
                block, sep, rest = self.buffer.partition(b"\n\n")
                if sep:
                    self.buffer = rest
                    fields: dict[str, Any] = {}
                    for line in block.decode().splitlines():
                        if line.startswith(":") or line.startswith("retry:"):
                            continue
                        name, _, value = line.partition(": ")
                        fields[name] = json.loads(value) if name == "data" else value
                    if fields:
                        return fields
                    continue
                self.buffer += await self.conn.receive()

    async def events_until(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        out = [await self.next_event()]
        while not done(out[-1]):
            out.append(await self.next_event())
        return out


@asynccontextmanager
async def sse(api: Api, path: str = "/v1/events", headers: dict[str, str] | None = None) -> AsyncIterator[Stream]:
    # Cancelled rather than disconnected: quart's test connection waits for the end of
    # a response that a hung-up event stream never sends.
    with trio.CancelScope() as scope:
        async with api.client.request(path, method="GET", headers={**AUTH, **(headers or {})}) as conn:
            await conn.send_complete()
            yield Stream(conn)
            scope.cancel()


async def test_events_stream_live_changes(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    async with sse(api) as stream:
        await api.call("POST", "/v1/apps", {"name": "live"})
        app_event, route_event = await stream.next_event(), await stream.next_event()
    assert app_event["event"] == "app" and app_event["data"]["op"] == "put"
    assert app_event["data"]["value"]["name"] == "live" and app_event["data"]["kind"] == "app"
    assert route_event["event"] == "route"
    assert int(route_event["id"]) == int(app_event["id"]) + 1 == ctx.state.last_event_id


async def test_events_resume_from_last_event_id(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await api.call("POST", "/v1/apps", {"name": "one"})
    mark = ctx.state.last_event_id
    await api.call("POST", "/v1/apps", {"name": "two"})
    await api.call("DELETE", "/v1/apps/one")
    async with sse(api, headers={"Last-Event-ID": str(mark)}) as stream:
        events = await stream.events_until(lambda e: int(e["id"]) == ctx.state.last_event_id)
        await api.call("POST", "/v1/apps", {"name": "three"})
        live = await stream.next_event()
    assert [(e["event"], e["data"]["op"]) for e in events] == [
        ("app", "put"), ("route", "put"), ("app", "delete"), ("route", "delete"),
    ]  # fmt: skip
    assert [int(e["id"]) for e in events] == list(range(mark + 1, mark + 5))
    assert events[0]["data"]["value"]["name"] == "two"
    assert events[2]["data"]["value"] is None
    assert live["data"]["value"]["name"] == "three"


async def test_an_unknown_last_event_id_gets_a_reset_and_the_records(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await api.call("POST", "/v1/apps", {"name": "kept"})
    async with sse(api, "/v1/events?kinds=app", {"Last-Event-ID": "999999"}) as stream:
        reset = await stream.next_event()
        snapshot = await stream.next_event()
        await api.call("PATCH", "/v1/apps/kept", {"strategy": "one-by-one"})
        live = await stream.next_event()  # the route events are filtered out
    assert reset["event"] == "reset" and "id" not in reset
    assert snapshot["event"] == "app" and snapshot["data"]["value"]["name"] == "kept"
    assert int(snapshot["id"]) == 2
    assert live["event"] == "app" and live["data"]["value"]["strategy"] == "one-by-one"
    assert int(live["id"]) == ctx.state.last_event_id


async def test_a_malformed_last_event_id_is_a_400(node: tuple[Ctx, Api]) -> None:
    _, api = node
    status, body = await api.call("GET", "/v1/events", headers={"Last-Event-ID": "abc"})
    assert status == 400 and "Last-Event-ID" in body["error"]["message"]


async def test_an_idle_stream_sends_a_keep_alive_every_15_s(
    node: tuple[Ctx, Api], autojump_clock: trio.testing.MockClock
) -> None:
    _, api = node
    async with sse(api) as stream:
        assert await stream.conn.receive() == b"retry: 2000\n\n"
        start = trio.current_time()
        assert await stream.conn.receive() == b": keep-alive\n\n"
        assert trio.current_time() - start == pytest.approx(15)


def test_certificate_private_keys_never_leave_in_responses_or_events() -> None:
    from flynnp2p.api.apps import wire
    from flynnp2p.state.records import Certificate

    cert = Certificate(id="c1", domains=("a.example",), cert_pem="-----BEGIN CERTIFICATE-----\npub\n",
                       key_pem="-----BEGIN PRIVATE KEY-----\nsecret\n", created_at=1)  # fmt: skip
    shown = wire(cert)
    assert "secret" not in json.dumps(shown) and "v" not in shown


# -- retried creates (the CLI retries a 503 with one Idempotency-Key) -----------


async def test_a_retried_create_answers_with_the_app_it_made(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    key = {"Idempotency-Key": "3f1c2b9e-retry"}
    status, first = await api.call("POST", "/v1/apps", {"name": "again"}, headers=key)
    assert status == 201, first
    status, second = await api.call("POST", "/v1/apps", {"name": "again"}, headers=key)
    assert status == 201 and second["app"]["id"] == first["app"]["id"]
    assert [a.name for a in ctx.state.state.records(App)] == ["again"]  # one app, not two
    status, body = await api.call("POST", "/v1/apps", {"name": "again"}, headers={"Idempotency-Key": "other"})
    assert status == 409, body
    status, body = await api.call("POST", "/v1/apps", {"name": "x"}, headers={"Idempotency-Key": "bad key!"})
    assert status == 400 and "Idempotency-Key" in body["error"]["message"]


async def test_a_retried_route_create_answers_with_the_route_it_made(node: tuple[Ctx, Api]) -> None:
    _, api = node
    await api.call("POST", "/v1/apps", {"name": "rt"})
    key = {"Idempotency-Key": "route-retry-1"}
    route = {"type": "tcp", "port": 6000}
    status, first = await api.call("POST", "/v1/apps/rt/routes", route, headers=key)
    assert status == 201, first
    status, second = await api.call("POST", "/v1/apps/rt/routes", route, headers=key)
    assert status == 201 and second["route"]["id"] == first["route"]["id"]
    status, body = await api.call("POST", "/v1/apps/rt/routes", route)
    assert status == 409 and "6000" in body["error"]["message"]


async def test_releases_are_numbered_and_each_builds_on_the_last(node: tuple[Ctx, Api]) -> None:
    _, api = node
    await api.call("POST", "/v1/apps", {"name": "nums"})
    for i in range(5):
        status, body = await api.call("PATCH", "/v1/apps/nums/env", {"set": {f"K{i}": "v"}})
        assert status == 200, body
        assert body["release"]["version"] == i + 1
    _, body = await api.call("GET", "/v1/apps/nums/releases")
    versions = [(r["version"], sorted(r["env"])) for r in body["releases"]]
    assert versions == [(5 - i, [f"K{k}" for k in range(5 - i)]) for i in range(5)]


async def test_a_release_number_whose_release_never_committed_is_skipped(
    node: tuple[Ctx, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json as _json

    from flynnp2p.api import allocate
    from flynnp2p.coord.claims import release_key

    ctx, api = node
    monkeypatch.setattr(allocate, "RECORD_WAIT_S", 0.2)
    _, created = await api.call("POST", "/v1/apps", {"name": "orphan"})
    await api.call("PATCH", "/v1/apps/orphan/env", {"set": {"A": "1"}})  # v1
    # A leader advanced the counter to v2 and died before committing v2 anywhere.
    key = release_key(created["app"]["id"])
    ghost = {"n": 2, "id": "ghost-release", "at": ctx.clock.ms}
    ctx.etcd._put(key, _json.dumps(ghost))
    status, body = await api.call("PATCH", "/v1/apps/orphan/env", {"set": {"B": "2"}})
    assert status == 503 and "v2" in body["error"]["message"]  # it may still arrive: refuse, retry
    ctx.etcd._put(key, _json.dumps({**ghost, "at": ctx.clock.ms - 60_000}))
    status, body = await api.call("PATCH", "/v1/apps/orphan/env", {"set": {"B": "2"}})
    assert status == 200, body
    assert body["release"]["version"] == 3 and body["env"] == {"A": "1", "B": "2"}


async def test_an_http_route_with_its_own_certificate(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    ctx.clock.ms = int(CERT_NOW.timestamp() * 1000)
    await seed(api)
    cert, key = make_cert("*.example.com")
    body = {"type": "http", "domain": "shop.example.com", "cert_pem": cert, "key_pem": key}
    status, made = await api.call("POST", "/v1/apps/myapp/routes", body)
    assert status == 201, made
    stored = ctx.state.state.record(Certificate, made["route"]["certificate_id"])
    assert stored is not None and stored.key_pem == key
    assert stored.domains == ("shop.example.com", "*.example.com")
    assert key.splitlines()[1] not in json.dumps(made)
    # Refused, saying which check failed, and nothing is written.
    before = ctx.state.state
    for bad, message in [
        ({**body, "domain": "shop.example.org"}, "cert: is for *.example.com, not for shop.example.org"),
        ({**body, "key_pem": make_cert("x.example.com")[1]}, "key: does not match"),
        ({**body, "cert_pem": "-----BEGIN CERTIFICATE-----\nnope\n"}, "cert: not a PEM certificate"),
        ({"type": "http", "domain": "a.example.com", "cert_pem": cert}, "come together"),
        ({"type": "tcp", "cert_pem": cert, "key_pem": key}, "only http routes"),
    ]:
        status, answer = await api.call("POST", "/v1/apps/myapp/routes", bad)
        assert status == 400 and message in answer["error"]["message"], answer
    assert same(before, ctx.state.state)
    # The certificate goes with its route.
    status, _ = await api.call("DELETE", f"/v1/apps/myapp/routes/{made['route']['id']}")
    assert status == 200 and ctx.state.state.record(Certificate, stored.id) is None


async def test_https_only_and_sticky_are_http_route_settings(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await seed(api)
    body = {"type": "http", "domain": "secure.example.com", "https_only": True, "sticky": True}
    status, made = await api.call("POST", "/v1/apps/myapp/routes", body)
    assert status == 201 and made["route"]["https_only"] is True and made["route"]["sticky"] is True
    stored = ctx.state.state.record(Route, made["route"]["id"])
    assert stored is not None and stored.https_only and stored.sticky
    status, answer = await api.call("POST", "/v1/apps/myapp/routes", {"type": "tcp", "https_only": True})
    assert status == 400 and "tcp routes are neither https_only nor sticky" in answer["error"]["message"]
