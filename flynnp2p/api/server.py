"""Serves the API app with hypercorn inside the agent's nursery.

Every HTTP request passes `FramingGuard` first: a body length that can be read
two ways, or one over the endpoint's limit, is answered here (see
`flynnp2p.api.framing`) and the app never sees the request.

A response that starts before the app has read the whole request body (an
early 4xx, most often) says ``Connection: close``, and the last send of every
response is shielded (bounded, like any cleanup).  quart-trio cancels a
request's tasks as soon as hypercorn reports the stream closed, which hypercorn
does from *inside* that last send, before it has either recycled the connection
or closed it; cancelled there, the connection is left open and the next request
on it is never answered (measured: a 404 to a DELETE whose body arrived 200 ms
after its headers, then a GET on the same connection that hung until the
client gave up).
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from flynnp2p.api.app import (
    BLOB_PREFIX,
    MAX_BLOB_BODY,
    MAX_BODY,
    MAX_GIT_BODY,
    MAX_PEER_BODY,
    PEER_PREFIX,
)
from flynnp2p.api.framing import Refusal, framing_problem, target_problem
from flynnp2p.build.githttp import GIT_PREFIX
from flynnp2p.errors import ConfigError
from flynnp2p.netaddr import url_host

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def body_limit(path: str) -> int:
    """The largest body an endpoint takes (as `flynnp2p.api.app._Request` enforces)."""
    if path.startswith(PEER_PREFIX):
        return MAX_PEER_BODY
    if path.startswith(BLOB_PREFIX):
        return MAX_BLOB_BODY
    if path.startswith(GIT_PREFIX):
        return MAX_GIT_BODY
    return MAX_BODY


class FramingGuard:
    """ASGI middleware: refuses ambiguous or oversized framing, and paths with control
    characters, before the app runs."""

    def __init__(self, app: Asgi, limit: Callable[[str], int] = body_limit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        refusal = framing_problem(scope["headers"], self.limit(path)) or target_problem(path)
        if refusal is not None:
            await _refuse(send, refusal)
            return
        body = _BodyTracker(scope["headers"], receive)
        await self.app(scope, body.receive, _shield_last_send(body.mark_close(send)))


class _BodyTracker:
    """Knows whether the app read the request body to its end.

    A response that starts before that says ``Connection: close``: hypercorn
    closes such a connection after the response (the rest of the body is still
    on its way), and a client told so opens a new one instead of reusing it just
    as it closes (which httpx reports as "Server disconnected")."""

    def __init__(self, headers: list[tuple[bytes, bytes]], receive: Receive) -> None:
        length = b"0"
        chunked = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                length = value.strip()
            elif lower == b"transfer-encoding":
                chunked = True
        self.done = not chunked and length == b"0"
        self._receive = receive

    async def receive(self) -> dict[str, Any]:
        message = await self._receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self.done = True
        return message

    def mark_close(self, send: Send) -> Send:
        async def marked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and not self.done:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return marked


FINAL_SEND_S = 3.0  # quart's last send is the empty end of the body; a stuck client cannot hold shutdown long


def _shield_last_send(send: Send) -> Send:
    async def shielded(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FINAL_SEND_S
                await send(message)
        else:
            await send(message)

    return shielded


async def _refuse(send: Send, refusal: Refusal) -> None:
    body = json.dumps({"error": {"code": refusal.code, "message": refusal.message}}).encode()
    try:
        await send({
            "type": "http.response.start",
            "status": refusal.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The unread body is still on its way: the connection is done.
                (b"connection", b"close"),
            ],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": body})
    except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
        # The client closed as the answer went out: hypercorn's reader task is
        # closing the socket at the same moment.  Nothing is left to tell anyone.
        pass


class ApiServer:
    def __init__(self, app: Any, addr: str, port: int) -> None:
        guarded: Any = FramingGuard(app)  # hypercorn's ASGI types are TypedDicts; ours plain dicts
        self.app = wrap_app(guarded, 1 << 20, None)
        self.config = Config()
        host = url_host(addr)
        self.config.bind = [f"{host}:{port}"]
        self.config.accesslog = None
        self.config.errorlog = logging.getLogger("flynnp2p.api.server")
        self.config.graceful_timeout = 2.0
        self.config.keep_alive_timeout = 30.0

    def bind(self) -> Sockets:
        """Bind now, so a taken port fails the agent before it joins anything."""
        bind = self.config.bind[0]
        try:
            sockets = self.config.create_sockets()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"API port {bind} is already in use (choose --api-port)") from None
            raise ConfigError(f"cannot listen on {bind}: {exc.strerror}") from None
        for sock in sockets.insecure_sockets:
            sock.listen(self.config.backlog)
        return sockets

    async def run(
        self, sockets: Sockets, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # worker_serve reports its binds when its listeners are up.
        await worker_serve(self.app, self.config, sockets=sockets, task_status=_first(task_status))


class _first:
    """Adapts hypercorn's ``started(list_of_urls)`` to ours (one URL)."""

    def __init__(self, status: trio.TaskStatus[str]) -> None:
        self.status = status

    def started(self, value: list[str] | None = None) -> None:
        self.status.started(value[0] if value else "")
