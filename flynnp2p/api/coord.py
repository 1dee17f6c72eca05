"""etcd membership between nodes, and the operator's recovery.

    GET  /v1/internal/coord/members        this node's view of etcd's members
    POST /v1/internal/coord/members        {"name", "peer_url"}: add a joining node as a learner;
                                           → {"initial_cluster"} for its etcd's flags
    POST /v1/cluster/recover               restart this node's etcd as a one-member cluster
                                           from its data (quorum lost for good); the leader then
                                           re-derives every claim from the replicated state
"""

from __future__ import annotations

import json
import re

from quart import Blueprint, Response, jsonify, request

from flynnp2p import vocab
from flynnp2p.coord.service import Coord
from flynnp2p.errors import ClusterError, UserError

_PEER_URL = re.compile(r"https://(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]{1,5}")


def coord_blueprint(coord: Coord) -> Blueprint:
    bp = Blueprint("coord", __name__)

    @bp.get("/v1/internal/coord/members")
    async def members() -> Response:
        if not coord.has_member():
            raise ClusterError(f"this node has no etcd member ({coord.role})")
        return jsonify({"members": await coord.member_list()})

    @bp.post("/v1/internal/coord/members")
    async def add_member() -> Response:
        try:
            body = json.loads(await request.get_data(cache=False, as_text=False))
        except ValueError as exc:
            raise UserError(f"body: not valid JSON ({exc or 'empty'})") from None
        if not isinstance(body, dict):
            raise UserError("body: expected a JSON object with 'name' and 'peer_url'")
        name, url = body.get("name"), body.get("peer_url")
        name = vocab.NODE_NAME.check("name", name)
        if not isinstance(url, str) or _PEER_URL.fullmatch(url) is None:
            raise UserError("peer_url: expected https://ADDRESS:PORT")
        if not coord.is_voter():
            raise ClusterError(f"this node's etcd member cannot add members ({coord.role}); ask another")
        return jsonify({"initial_cluster": await coord.add_learner(name, url)})

    @bp.post("/v1/cluster/recover")
    async def recover() -> Response:
        if not coord.enabled:
            raise UserError("this node runs no etcd member (it lacks the scheduler role)")
        coord.recover()
        return jsonify(
            {
                "recovering": True,
                "message": "etcd restarts here as a one-member cluster; other nodes join it again "
                "as learners, and the leader re-creates the claims from the replicated state",
            }
        )

    return bp
