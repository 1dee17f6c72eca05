"""The content-addressed blobstore over HTTP.

    PUT  /v1/blobs/<digest>    the raw bytes (streamed; up to 4 GiB) → 201 {"digest", "size", "replicas"}
                               once at least two alive nodes hold it; 400 if the bytes do not
                               hash to <digest>
    GET  /v1/blobs/<digest>    the bytes (streamed, Content-Length); fetched from a peer first
                               if this node lacks it; 404 if no node has it
    HEAD /v1/blobs/<digest>    the same headers, no body (no fetch)
    GET  /v1/blobs/<digest>/locations
                               {"digest", "locations": [{"node", "size", "created_at", "alive"}]}
                               from this node's replica of the state
    GET  /v1/blobs             {"blobs": [{"digest", "size", "stored_at"}]} held by this node

``<digest>`` is ``sha256:`` and 64 lowercase hex digits.  Requests marked
``X-Flynnp2p-Replica: 1`` are peers': a PUT is stored without replicating
further, a GET is served from this node's disk only.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from quart import Blueprint, Response, jsonify, request

from flynnp2p.api.app import error_response
from flynnp2p.build.blobs import REPLICA_HEADER, BlobService
from flynnp2p.build.blobstore import check_digest
from flynnp2p.errors import FlynnError

OCTETS = "application/octet-stream"


def blobs_blueprint(blobs: BlobService) -> Blueprint:
    bp = Blueprint("blobs", __name__)

    def from_peer() -> bool:
        return request.headers.get(REPLICA_HEADER) == "1"

    @bp.put("/v1/blobs/<digest>")
    async def put_blob(digest: str) -> Response:
        body = _Drained(request.body)
        try:
            check_digest(digest)
            size, replicas = await blobs.put(digest, body, replicate=not from_peer())
        except FlynnError as exc:
            resp = error_response(exc.status, exc.code, exc.message)
            if not body.done:
                # The rest of the body is still on its way: this connection cannot
                # carry another request (a client reusing it would hang).
                resp.headers["Connection"] = "close"
            return resp
        resp = jsonify({"digest": digest, "size": size, "replicas": replicas})
        resp.status_code = 201
        return resp

    @bp.get("/v1/blobs/<digest>")  # werkzeug routes HEAD here too
    async def get_blob(digest: str) -> Response:
        check_digest(digest)
        if request.method == "HEAD":
            size = await blobs.size(digest, local_only=from_peer())
            resp = Response(b"", content_type=OCTETS)
        else:
            size, chunks = await blobs.open(digest, local_only=from_peer())
            resp = Response(chunks, content_type=OCTETS)
            resp.timeout = None  # a big blob takes longer than quart's RESPONSE_TIMEOUT
        resp.content_length = size
        resp.headers["ETag"] = f'"{digest}"'
        resp.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        return resp

    @bp.get("/v1/blobs/<digest>/locations")
    async def blob_locations(digest: str) -> Response:
        check_digest(digest)
        alive = {p.name for p, _ in blobs.alive_holders(digest)} | {blobs.node}
        wire = [
            {"node": loc.node, "size": loc.size, "created_at": loc.created_at, "alive": loc.node in alive}
            for loc in blobs.locations(digest)
        ]
        return jsonify({"digest": digest, "locations": wire})

    @bp.get("/v1/blobs")
    async def list_blobs() -> Response:
        held = await blobs.list_local()
        return jsonify(
            {"blobs": [{"digest": b.digest, "size": b.size, "stored_at": b.mtime_ms} for b in held]}
        )

    return bp


class _Drained:
    """The request body's chunks; `done` once all of it was read."""

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self.body = body
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.body:
            yield chunk
        self.done = True
