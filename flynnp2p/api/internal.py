"""Peer-to-peer endpoints of the state replication (msgpack, cluster secret).

    POST /v1/internal/state/push   {"v": 1, "delta"}: a peer's incomplete delta; 200 once committed here
    POST /v1/internal/state/sync   {"v": 1, "vv", "node"} → streamed {"v": 1, "delta"} chunks of
                                   what it lacks, the last one complete

The messages are `flynnp2p.state.wire`'s; serving them is the replication's
(`Replicator.accept_push`, `Replicator.serve_sync`): this edge only decodes the
body and maps errors to HTTP answers.
"""

from __future__ import annotations

from typing import Any

import msgpack
from quart import Blueprint, Response, request

from flynnp2p.errors import UserError
from flynnp2p.state.errors import RecordError, StaleReplicaError
from flynnp2p.state.replication import Replicator
from flynnp2p.state.wire import MSGPACK, pack


async def _msgpack_body() -> Any:
    data = await request.get_data(cache=False)
    try:
        return msgpack.unpackb(data, raw=False)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        # Some unpack errors carry no message (an empty body, "garbage"):
        # the reason is never empty.
        raise UserError(f"body is not msgpack: {str(exc) or type(exc).__name__}") from None


def internal_blueprint(replication: Replicator) -> Blueprint:
    bp = Blueprint("internal", __name__, url_prefix="/v1/internal")

    @bp.post("/state/push")
    async def push() -> Response:
        wire = await _msgpack_body()
        try:
            applied = await replication.accept_push(wire)
        except RecordError as exc:
            raise UserError(f"bad delta: {exc}") from None
        except StaleReplicaError:
            return Response(pack({"stale": True}), status=409, content_type=MSGPACK)
        return Response(pack({"applied": applied}), content_type=MSGPACK)

    @bp.post("/state/sync")
    async def sync() -> Response:
        body = await _msgpack_body()
        try:
            chunks = replication.serve_sync(body)
        except RecordError as exc:
            raise UserError(str(exc)) from None
        return Response(chunks, content_type=MSGPACK)

    return bp
