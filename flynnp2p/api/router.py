"""``GET /v1/router/status``: this node's router (listeners, routes, backends with
in-flight counts and passive-health marks, per-app counters and latencies)."""

from __future__ import annotations

from typing import Protocol

from quart import Blueprint, Response, jsonify


class RouterStatus(Protocol):
    """The in-process `router.service.Router`, or `router.workers.RouterWorkers`
    (which asks its workers and merges their answers)."""

    async def current_status(self) -> dict[str, object]: ...


def router_blueprint(router: RouterStatus) -> Blueprint:
    bp = Blueprint("router", __name__)

    @bp.get("/v1/router/status")
    async def status() -> Response:
        return jsonify(await router.current_status())

    return bp
