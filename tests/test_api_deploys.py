"""Component tests of the deployments API and rollback (flynnp2p/api/deploys.py),
on the app API's real quart-trio app and state service (see tests/test_api_apps.py)."""

from __future__ import annotations

from typing import Any

from flynnp2p.state.records import Deployment, Formation
from tests.test_api_apps import Api, Ctx, node, seed

__all__ = ["node"]  # the fixture, imported for pytest


async def deployments(api: Api, app: str = "myapp") -> list[dict[str, Any]]:
    status, body = await api.call("GET", f"/v1/apps/{app}/deployments")
    assert status == 200, body
    return list(body["deployments"])


async def test_every_release_move_is_a_deployment_and_rollback_goes_back(
    node: tuple[Ctx, Api],
) -> None:
    ctx, api = node
    seeded = await seed(api)
    v1 = seeded["release"]["id"]
    status, body = await api.call("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 2}})
    assert status == 200, body
    [first] = await deployments(api)
    assert (first["new_release_id"], first["old_release_id"], first["status"]) == (
        v1,
        None,
        "running",
    )
    assert first["strategy"] == "one-by-one"  # "auto" with web=2

    status, body = await api.call("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 3}})
    assert status == 200 and len(await deployments(api)) == 1  # a scale is no deploy

    status, body = await api.call("PATCH", "/v1/apps/myapp/env", {"set": {"B": "2"}})
    assert status == 200, body
    v2 = body["release"]["id"]
    second, first = await deployments(api)  # newest first
    assert (second["old_release_id"], second["new_release_id"]) == (v1, v2)
    assert first["status"] == "failed" and second["id"] in first["reason"]  # replaced

    status, body = await api.call("POST", "/v1/apps/myapp/rollback")
    assert status == 201, body
    assert body["formation"]["release_id"] == v1 and body["formation"]["processes"] == {"web": 3}
    assert body["release"]["version"] == 1
    dep = body["deployment"]
    assert (dep["old_release_id"], dep["new_release_id"], dep["status"]) == (v2, v1, "running")
    formation = ctx.state.state.record(Formation, seeded["app"]["id"])
    assert formation is not None and formation.release_id == v1
    assert ctx.state.state.record(Deployment, dep["id"]) is not None
    status, got = await api.call("GET", f"/v1/apps/myapp/deployments/{dep['id']}")
    assert status == 200 and got["deployment"] == dep

    status, body = await api.call("POST", "/v1/apps/myapp/rollback", {})
    assert status == 409 and "no release before v1" in body["error"]["message"]
    for ref in ("v2", 2, v2):
        status, body = await api.call("POST", "/v1/apps/myapp/rollback", {"release": ref})
        if ref == "v2":
            assert status == 201 and body["formation"]["release_id"] == v2
        else:
            assert status == 409 and "already runs release v2" in body["error"]["message"]


async def test_rollback_and_deployment_errors_are_clear(node: tuple[Ctx, Api]) -> None:
    _, api = node
    await seed(api)
    status, body = await api.call("POST", "/v1/apps/myapp/rollback")
    assert status == 409 and "nothing is deployed" in body["error"]["message"]
    await api.call("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 1}})
    status, body = await api.call("POST", "/v1/apps/myapp/rollback", {"release": "v9"})
    assert status == 404 and "no release 'v9'" in body["error"]["message"]
    status, body = await api.call("POST", "/v1/apps/myapp/rollback", {"release": [1]})
    assert status == 400 and "a version such as 'v2'" in body["error"]["message"]
    status, body = await api.call("POST", "/v1/apps/myapp/rollback", {"to": "v1"})
    assert status == 400 and "accepted" in body["error"]["message"]
    status, body = await api.call("GET", "/v1/apps/myapp/deployments/nope")
    assert status == 404 and "/deployments" in body["error"]["message"]
    status, body = await api.call("GET", "/v1/apps/ghost/deployments")
    assert status == 404


async def test_deleting_the_app_deletes_its_deployments(node: tuple[Ctx, Api]) -> None:
    ctx, api = node
    await seed(api)
    await api.call("PUT", "/v1/apps/myapp/formation", {"processes": {"web": 1}})
    assert list(ctx.state.state.records(Deployment))
    status, _ = await api.call("DELETE", "/v1/apps/myapp")
    assert status == 200 and not list(ctx.state.state.records(Deployment))
