"""One forwarder: the request being served, sent on to the node that must answer it.

Changes to an app are made on the leader (names, ports and release numbers are
allocated there, `flynnp2p.api.allocate`); a host's tags are set by that host. Any
other node sends the request on, unchanged (method, the path as the client sent
it, query, body, ``Idempotency-Key``), on the agent's pooled HTTP client with the
peer credential and the forwarded mark, and relays the answer. The mark means a
request is forwarded at most once: a node that gets a forwarded change while no
longer leading answers 503 (retry), never forwards it again.
"""

from __future__ import annotations

from typing import Protocol

import httpx
from quart import Response, request

from flynnp2p.api.app import FORWARDED
from flynnp2p.api.edge import IDEMPOTENCY_HEADER
from flynnp2p.errors import UNTOUCHED_HEADER, ClusterError, Untouched

FORWARD_TIMEOUT = httpx.Timeout(15.0, connect=2.0)


class Leading(Protocol):
    @property
    def peer_key(self) -> str: ...

    async def acting_leader(self) -> bool: ...

    def leader_api(self) -> str | None: ...


class Forwarder:
    """`http` is the agent's shared client (a client per request cost ~50 ms);
    `transport` (tests) replaces the network with a client of its own."""

    def __init__(
        self, ctx: Leading, http: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:  # fmt: skip
        self.ctx = ctx
        self.http = http
        self.transport = transport

    async def via_leader(self) -> Response | None:
        """None if this node is the leader (act here); else the leader's answer."""
        if await self.ctx.acting_leader():
            return None
        if request.headers.get(FORWARDED):
            raise Untouched("this node is no longer the leader (leadership moved); retry")
        leader = self.ctx.leader_api()
        if leader is None:
            raise Untouched(
                "the cluster has no leader right now (no quorum?); app names, TCP ports and "
                "HTTP domains are allocated by the leader: retry later "
                "(see 'flynnp2p cluster status')"
            )
        return await self.to(leader, "the leader")

    async def to(self, api: str, who: str) -> Response:
        """This request, as sent to the node whose API is `api`, and its answer."""
        data = await request.get_data(cache=True, as_text=False, parse_form_data=False)
        headers = {
            "Authorization": f"Bearer {self.ctx.peer_key}",
            "Content-Type": "application/json",
            FORWARDED: "1",
        }
        idem = request.headers.get(IDEMPOTENCY_HEADER)
        if idem:
            headers[IDEMPOTENCY_HEADER] = idem
        # The path as the client sent it (still percent-encoded), and its query.
        raw = request.scope.get("raw_path") or request.path.encode()
        query = request.scope.get("query_string") or b""
        url = f"http://{api}{raw.decode('latin-1')}" + (f"?{query.decode('latin-1')}" if query else "")
        try:
            if self.http is not None and self.transport is None:
                resp = await self.http.request(
                    request.method, url, content=data, headers=headers, timeout=FORWARD_TIMEOUT
                )
            else:
                async with httpx.AsyncClient(transport=self.transport, timeout=FORWARD_TIMEOUT) as http:
                    resp = await http.request(request.method, url, content=data, headers=headers)
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            # Not connected: the request never left. Else it may have been acted on.
            error = Untouched if isinstance(exc, httpx.ConnectError) else ClusterError
            raise error(f"cannot reach {who} at {api}: {reason}; retry") from None
        answer = Response(
            resp.content,
            status=resp.status_code,
            content_type=resp.headers.get("content-type", "application/json"),
        )
        if resp.status_code == 503 and resp.headers.get(UNTOUCHED_HEADER):
            answer.headers[UNTOUCHED_HEADER] = "1"
        return answer
