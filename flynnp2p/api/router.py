"""``GET /v1/router/status``: this node's router (listeners, routes, backends with
in-flight counts and passive-health marks, per-app counters and latencies)."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify

from flynnp2p.router.service import Router


def router_blueprint(router: Router) -> Blueprint:
    bp = Blueprint("router", __name__)

    @bp.get("/v1/router/status")
    async def status() -> Response:
        return jsonify(router.status())

    return bp
