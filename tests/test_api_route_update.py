"""`PATCH /v1/apps/<app>/routes/<id>` (`route update ID`): what can change, what
cannot (said so), a new path claimed like a new route's, certificates replaced."""

from __future__ import annotations

import pytest

from flynnp2p.api import ops
from flynnp2p.coord.claims import http_key
from flynnp2p.errors import UserError
from flynnp2p.state.errors import RecordError
from flynnp2p.state.merge import Delete
from flynnp2p.state.records import Certificate, Route
from tests.certs import NOW as CERT_NOW
from tests.certs import make_cert
from tests.states import state_of
from tests.test_api_apps import Api, Ctx, node, same, seed

__all__ = ["node"]  # the fixture


def http_route(**kw: object) -> Route:
    fields = {
        "id": "r" * 32,
        "app_id": "a" * 32,
        "type": "http",
        "created_at": 1,
        "domain": "x.example.com",
    }
    return Route.decode_fields("route", {**fields, **kw})


def test_route_update_applies_the_changes_and_checks_the_record() -> None:
    r = http_route()
    got = ops.route_update(
        r, {"sticky": True, "https_only": True, "path": "/api", "process_type": "api"}
    )
    assert (got.sticky, got.https_only, got.path, got.process_type) == (True, True, "/api", "api")
    assert (got.id, got.domain, got.created_at) == (r.id, r.domain, r.created_at)
    assert ops.route_update(r, {}, certificate_id="c" * 32).certificate_id == "c" * 32
    with pytest.raises(RecordError):
        ops.route_update(r, {"path": "no-slash"})
    tcp = Route.decode_fields("route", {"id": "t" * 32, "app_id": "a" * 32, "type": "tcp",
                                        "created_at": 1, "port": 3000})  # fmt: skip
    with pytest.raises(RecordError, match="neither https_only nor sticky"):
        ops.route_update(tcp, {"sticky": True})
    assert ops.route_update(tcp, {"process_type": "echo"}).process_type == "echo"


@pytest.mark.parametrize("field", ["type", "domain", "port"])
def test_route_update_refuses_identity_changes_and_says_what_can_change(field: str) -> None:
    with pytest.raises(
        UserError, match=f"body.{field}: a route's type, domain and port cannot change"
    ) as e:
        ops.route_update(http_route(), {field: "tcp" if field == "type" else 1, "sticky": True})
    assert "what can: sticky, https_only, path, process_type, cert_pem+key_pem" in str(e.value)
    with pytest.raises(UserError, match="nothing to change"):
        ops.route_update(http_route(), {})


def test_a_replaced_certificate_goes_unless_another_route_uses_it() -> None:
    cert = Certificate(id="c" * 32, domains=("x.example.com",), cert_pem="-----BEGIN CERTIFICATE-----\np\n",
                       key_pem="-----BEGIN PRIVATE KEY-----\nk\n", created_at=1)  # fmt: skip
    r = http_route(certificate_id=cert.id)
    other = http_route(id="o" * 32, domain="y.example.com", certificate_id=cert.id)
    state = state_of(cert, r)
    assert ops.route_certificate_left(state, r, "d" * 32) == [Delete(Certificate.KIND, cert.id)]
    assert ops.route_certificate_left(state, r, cert.id) == []
    assert ops.route_certificate_left(state_of(cert, r, other), r, "d" * 32) == []


async def test_patch_a_route(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await seed(api)
    status, made = await api.call(
        "POST", "/v1/apps/myapp/routes", {"type": "http", "domain": "shop.example.com"}
    )
    assert status == 201
    rid = made["route"]["id"]
    status, body = await api.call(
        "PATCH", f"/v1/apps/myapp/routes/{rid}",
        {"sticky": True, "https_only": True, "process_type": "worker"},
    )  # fmt: skip
    assert status == 200, body
    assert (body["route"]["sticky"], body["route"]["https_only"], body["route"]["process_type"]) == (
        True, True, "worker"
    )  # fmt: skip
    stored = ctx.state.state.record(Route, rid)
    assert (
        stored is not None
        and stored.sticky
        and stored.https_only
        and stored.process_type == "worker"
    )
    # Refused with what can change, and nothing written.
    before = ctx.state.state
    for bad, message in [
        ({"domain": "other.example.com"}, "a route's type, domain and port cannot change"),
        ({"type": "tcp"}, "what can: sticky, https_only, path, process_type"),
        ({}, "body: nothing to change"),
        ({"color": "red"}, "unknown field"),
        ({"path": "api"}, "route.path"),
        ({"cert_pem": "x"}, "come together"),
    ]:
        status, answer = await api.call("PATCH", f"/v1/apps/myapp/routes/{rid}", bad)
        assert status == 400 and message in answer["error"]["message"], (bad, answer)
    assert same(before, ctx.state.state)
    status, answer = await api.call("PATCH", "/v1/apps/myapp/routes/" + "f" * 32, {"sticky": False})
    assert status == 404


async def test_a_new_path_is_claimed_and_the_old_one_freed(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await seed(api)
    await seed(api, "other")
    status, a = await api.call(
        "POST", "/v1/apps/myapp/routes", {"type": "http", "domain": "s.example.com"}
    )
    status, _b = await api.call(
        "POST", "/v1/apps/other/routes", {"type": "http", "domain": "s.example.com", "path": "/b"}
    )
    assert status == 201
    rid = a["route"]["id"]
    status, answer = await api.call("PATCH", f"/v1/apps/myapp/routes/{rid}", {"path": "/b"})
    assert status == 409 and "is taken by app 'other'" in answer["error"]["message"], answer
    status, body = await api.call("PATCH", f"/v1/apps/myapp/routes/{rid}", {"path": "/a"})
    assert status == 200 and body["route"]["path"] == "/a", body
    claims = ctx.claims()
    owner = await claims.owner(http_key("s.example.com", "/a"))
    assert owner is not None and owner.app_id == a["route"]["app_id"]
    assert await claims.owner(http_key("s.example.com", "/")) is None
    # The old path is free for another route now.
    status, _ = await api.call(
        "POST", "/v1/apps/other/routes", {"type": "http", "domain": "s.example.com"}
    )
    assert status == 201


async def test_a_certificate_is_replaced_and_the_old_one_deleted(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    ctx.clock.ms = int(CERT_NOW.timestamp() * 1000)
    await seed(api)
    cert, key = make_cert("shop.example.com")
    body = {"type": "http", "domain": "shop.example.com", "cert_pem": cert, "key_pem": key}
    status, made = await api.call("POST", "/v1/apps/myapp/routes", body)
    assert status == 201
    rid, old = made["route"]["id"], made["route"]["certificate_id"]
    status, answer = await api.call(
        "PATCH",
        f"/v1/apps/myapp/routes/{rid}",
        {"cert_pem": cert, "key_pem": make_cert("x.example.com")[1]},
    )
    assert status == 400 and "key: does not match" in answer["error"]["message"]
    cert2, key2 = make_cert("*.example.com")
    status, body = await api.call(
        "PATCH", f"/v1/apps/myapp/routes/{rid}", {"cert_pem": cert2, "key_pem": key2}
    )
    assert status == 200, body
    new = body["route"]["certificate_id"]
    assert new != old and ctx.state.state.record(Certificate, old) is None
    stored = ctx.state.state.record(Certificate, new)
    assert stored is not None and stored.cert_pem == cert2
    assert key2.splitlines()[1] not in str(body)
