"""The HTTP API: a quart-trio app over the node's components.

Every route but ``/healthz`` needs ``Authorization: Bearer <credential>``.  Every
error is JSON ``{"error": {"code", "message"}}``: a `flynnp2p.errors.FlynnError`
answers with its ``status`` (4xx for the user's mistakes); an unexpected failure,
or a FlynnError whose status is 500, is a logged 500 whose body names no internals.

Two kinds of caller
-------------------
Users present the API key (or the whole cluster token); nodes present the peer
credential (`ClusterToken.peer_key`, which users are never given).

    path                  user key / token        peer credential
    /healthz              (no auth)               (no auth)
    /git/*                HTTP basic too: any user, the token or API key as password
    /v1/internal/*        403                     yes
    everything else       yes                     yes

Some headers are marks one node puts on a request to another (`PEER_HEADERS`:
"already forwarded", "this blob is a replica"). They are trusted only from a
peer: on a user's request they are removed before any view sees it, so a user
who sets one gets exactly the answer they would get without it.
`is_peer_request()` says which kind of caller the current request came from.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any, Protocol

from quart import Response, g, jsonify, request
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import HTTPException

from flynnp2p.build.blobs import REPLICA_HEADER
from flynnp2p.build.githttp import GIT_PREFIX
from flynnp2p.coord.ca import ClusterCA
from flynnp2p.errors import UNTOUCHED_HEADER, FlynnError, Forbidden, Unauthorized, Untouched
from flynnp2p.token import ClusterToken

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_PEER_BODY = 256 << 20
PEER_PREFIX = "/v1/internal/"
# Slugs and images are streamed to disk, never held in memory whole.
MAX_BLOB_BODY = 4 << 30
BLOB_PREFIX = "/v1/blobs/"
# A push streams its pack to git, never held whole.
MAX_GIT_BODY = 4 << 30
# /v1/cluster/ca: the cluster CA certificate is public; a client checks it against a
# fingerprint it was given before it trusts it (`flynnp2p cluster add --ca-fingerprint`).
PUBLIC_PATHS = frozenset({"/healthz", "/v1/cluster/ca"})
# Marks only nodes may set: a request forwarded to the leader (never forwarded
# again), and a blob copy to a replica (not replicated again).
FORWARDED = "X-Flynnp2p-Forwarded"
PEER_HEADERS = (FORWARDED, REPLICA_HEADER)


def is_peer_request() -> bool:
    """True if the current request presented the peer credential (it comes from a node)."""
    return bool(g.get("peer", False))


class _Request(TrioRequest):
    """Users' bodies are capped at 1 MiB; peers' state deltas and blobs may be larger."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        path = args[2] if len(args) > 2 else kwargs.get("path", "")
        if str(path).startswith(PEER_PREFIX):
            kwargs["max_content_length"] = MAX_PEER_BODY
        elif str(path).startswith(BLOB_PREFIX):
            kwargs["max_content_length"] = MAX_BLOB_BODY
        elif str(path).startswith(GIT_PREFIX):
            kwargs["max_content_length"] = MAX_GIT_BODY
        super().__init__(*args, **kwargs)


class NodeStatus(Protocol):
    """What the API needs from the agent."""

    token: ClusterToken
    ready: bool

    def status(self) -> dict[str, Any]: ...

    def members(self) -> list[dict[str, Any]]: ...


def basic_password(header: str) -> str | None:
    """The password of an ``Authorization: Basic`` header, or None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon else None


def git_unauthorized() -> Response:
    """git asks its credential helper (then the user) only after this answer."""
    resp = error_response(401, "unauthorized", "git needs the cluster token (or API key) as password")
    resp.headers["WWW-Authenticate"] = 'Basic realm="flynnp2p"'
    return resp


def error_response(status: int, code: str, message: str) -> Response:
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    return resp


def create_app(node: NodeStatus) -> QuartTrio:
    app = QuartTrio("flynnp2p")
    app.request_class = _Request
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["JSON_SORT_KEYS"] = False

    @app.before_request
    async def authenticate() -> Response | None:
        g.peer = False
        if request.path in PUBLIC_PATHS:
            return None
        header = request.headers.get("Authorization", "")
        if request.path.startswith(GIT_PREFIX):
            password = basic_password(header)
            if password is None and header.lower().startswith("bearer "):
                password = header[7:]
            if password is None or not node.token.accepts_bearer(password):
                return git_unauthorized()
            return None
        scheme, _, presented = header.partition(" ")
        if not header:
            raise Unauthorized("missing 'Authorization: Bearer <token>' header")
        bearer = scheme.lower() == "bearer"
        if bearer and node.token.accepts_peer(presented):
            g.peer = True
            return None
        if not bearer or not node.token.accepts_bearer(presented):
            raise Unauthorized("invalid API token (give the cluster token or its API key)")
        if request.path.startswith(PEER_PREFIX):
            raise Forbidden(
                f"{request.path} is for the cluster's nodes only: they authenticate with "
                "the peer credential, not with the user's API key or cluster token"
            )
        for name in PEER_HEADERS:
            if name in request.headers:
                del request.headers[name]
        return None

    @app.errorhandler(FlynnError)
    async def flynn_error(exc: FlynnError) -> Response:
        # The whole tree (state's and serf's errors too): ``status`` says the answer.
        if exc.status == FlynnError.status:
            return await internal_error(exc)
        resp = error_response(exc.status, exc.code, exc.message)
        if isinstance(exc, Untouched):
            resp.headers[UNTOUCHED_HEADER] = "1"
        return resp

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name or "error"
        if exc.code == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.code == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        resp = error_response(exc.code or 400, code, message)
        if exc.code == 413:
            # The rest of the body is still on its way: this connection cannot
            # carry another request, so say so (a client reusing it would hang).
            resp.headers["Connection"] = "close"
        return resp

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error (see the node's log)")

    @app.get("/healthz")
    async def healthz() -> Response:
        resp = jsonify({"ok": node.ready})
        resp.status_code = 200 if node.ready else 503
        return resp

    ca_pem = ClusterCA(node.token.cluster_id, node.token.admin_secret).cert_pem

    @app.get("/v1/cluster/ca")
    async def cluster_ca() -> Response:
        return Response(ca_pem, content_type="application/x-pem-file")

    @app.get("/v1/status")
    async def status() -> Response:
        return jsonify(node.status())

    @app.get("/v1/members")
    async def members() -> Response:
        return jsonify({"members": node.members()})

    return app
