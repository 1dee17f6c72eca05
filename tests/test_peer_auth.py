"""Who may call what: the user's key versus the nodes' peer credential.

Unit tests of `ClusterToken.peer_key`, and component tests of the real quart-trio
app (`create_app`) with a probe blueprint that reports what a view sees, plus the
real apps API forwarding between two in-process nodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from quart import Blueprint, Response, jsonify, request
from quart_trio import QuartTrio

from flynnp2p.api.app import FORWARDED, PEER_HEADERS, create_app, is_peer_request
from flynnp2p.build.blobs import REPLICA_HEADER
from flynnp2p.state.records import App
from flynnp2p.token import ClusterToken
from tests.test_api_apps import TOKEN, Clock, Ctx, make_app, relay_to, start_service


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


USER = bearer(TOKEN.api_key)
WHOLE_TOKEN = bearer(TOKEN.encode())
PEER = bearer(TOKEN.peer_key)


# -- the credential --------------------------------------------------------------


def test_the_peer_key_is_derived_from_the_token_and_is_none_of_the_user_credentials() -> None:
    again = ClusterToken.parse(TOKEN.encode())
    assert again.peer_key == TOKEN.peer_key  # every node derives the same one
    assert TOKEN.peer_key not in (TOKEN.api_key, TOKEN.encode())
    assert ClusterToken.generate().peer_key != TOKEN.peer_key
    assert TOKEN.accepts_peer(TOKEN.peer_key)
    assert not TOKEN.accepts_peer(TOKEN.api_key) and not TOKEN.accepts_peer(TOKEN.encode())
    assert not TOKEN.accepts_peer(ClusterToken.generate().peer_key)
    assert not TOKEN.accepts_bearer(TOKEN.peer_key)  # and it is not a user key either
    assert TOKEN.peer_key not in repr(TOKEN)


# -- the app's authentication -------------------------------------------------------


@dataclass
class Node:
    token: ClusterToken = TOKEN
    ready: bool = True

    def status(self) -> dict[str, Any]:
        return {}

    def members(self) -> list[dict[str, Any]]:
        return []


def probe_app() -> QuartTrio:
    """The real app with one user path and one peer path that echo what they see."""
    app = create_app(Node())
    bp = Blueprint("probe", __name__)

    async def seen() -> Response:
        return jsonify({
            "peer": is_peer_request(),
            "marks": sorted(h for h in PEER_HEADERS if h in request.headers),
        })  # fmt: skip

    bp.add_url_rule("/v1/probe", "user_probe", seen, methods=["GET"])
    bp.add_url_rule("/v1/internal/probe", "peer_probe", seen, methods=["GET", "POST"])
    app.register_blueprint(bp)
    return app


async def call(app: QuartTrio, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await app.test_client().open(path, method=method, headers=headers)
    return resp.status_code, json.loads(await resp.get_data())


async def test_internal_paths_take_only_the_peer_credential() -> None:
    app = probe_app()
    assert await call(app, "POST", "/v1/internal/probe", PEER) == (200, {"peer": True, "marks": []})
    for user in (USER, WHOLE_TOKEN):
        status, body = await call(app, "POST", "/v1/internal/probe", user)
        assert status == 403 and body["error"]["code"] == "forbidden"
        assert "peer credential" in body["error"]["message"]
    status, body = await call(app, "GET", "/v1/internal/probe", bearer(ClusterToken.generate().peer_key))
    assert status == 401
    status, body = await call(app, "GET", "/v1/internal/probe", {})
    assert status == 401


async def test_other_paths_take_every_credential_and_record_which() -> None:
    app = probe_app()
    assert await call(app, "GET", "/v1/probe", USER) == (200, {"peer": False, "marks": []})
    assert await call(app, "GET", "/v1/probe", WHOLE_TOKEN) == (200, {"peer": False, "marks": []})
    assert await call(app, "GET", "/v1/probe", PEER) == (200, {"peer": True, "marks": []})
    status, _ = await call(app, "GET", "/v1/probe", bearer(ClusterToken.generate().api_key))
    assert status == 401


async def test_peer_marks_reach_a_view_only_from_a_peer() -> None:
    app = probe_app()
    marks = {FORWARDED: "1", REPLICA_HEADER: "1"}
    assert set(PEER_HEADERS) == set(marks)  # the app's copy of the names is the real one
    status, body = await call(app, "GET", "/v1/probe", {**USER, **marks})
    assert (status, body) == (200, {"peer": False, "marks": []})
    status, body = await call(app, "GET", "/v1/probe", {**PEER, **marks})
    assert (status, body) == (200, {"peer": True, "marks": sorted(marks)})


# -- forwarding between two nodes ------------------------------------------------------


async def test_a_user_cannot_fake_the_forwarded_mark(nursery: trio.Nursery) -> None:
    """A user's request marked forwarded is forwarded like any other (no bogus 503);
    a peer's forwarded request is still never forwarded twice."""
    leader = Ctx(await start_service(nursery, name="n1"), Clock(), leader=True)
    follower = Ctx(await start_service(nursery, name="n2"), Clock(), leader=False)
    seen: list[httpx.Request] = []
    follower_app = make_app(follower, transport=relay_to(make_app(leader), seen))
    client = follower_app.test_client()

    resp = await client.post("/v1/apps", json={"name": "faked"}, headers={**USER, FORWARDED: "1"})
    assert resp.status_code == 201, await resp.get_data()
    assert [a.name for a in leader.state.state.records(App)] == ["faked"]
    assert len(seen) == 1

    resp = await client.post("/v1/apps", json={"name": "other"}, headers={**PEER, FORWARDED: "1"})
    assert resp.status_code == 503
    assert len(seen) == 1  # not forwarded again
