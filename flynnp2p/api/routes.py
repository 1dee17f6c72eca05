"""Routes of an app: how requests reach it through the router.

    GET    /v1/apps/<app>/routes
    POST   /v1/apps/<app>/routes             {"type": "http", "domain", "path"?, "sticky"?,
                                             "https_only"?, "cert_pem"?, "key_pem"?}
                                             | {"type": "tcp", "port"?}
    PATCH  /v1/apps/<app>/routes/<id>        {"sticky"?, "https_only"?, "path"?, "process_type"?,
                                             "cert_pem"?, "key_pem"?}
    DELETE /v1/apps/<app>/routes/<id>

A TCP route given no port takes the lowest free one of the cluster's range
(``--tcp-route-ports`` of its first leader, 3000-3500 by default). A route's
HTTP domain+path, or its TCP port, is unique in the cluster: the leader
claims it in etcd before the route is written (`flynnp2p.api.allocate`), under the
app's lock, and a retry with the same ``Idempotency-Key`` answers with the route
the first attempt made. An HTTP route may bring its own certificate (PEM): it is
checked at once (`flynnp2p.tls`) and stored as a `Certificate` record with the
route, and goes with its last route. An update (`flynnp2p.api.ops.route_update`)
keeps the route's type, domain and port; a new path is claimed like a new route's
domain+path before the write, and the old claim is dropped after it. The handlers
share the app API's allocator and forwarder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any

from quart import Response

from flynnp2p import vocab
from flynnp2p.api import ops
from flynnp2p.api.edge import answer, idempotency_key, json_body, ref
from flynnp2p.api.render import wire
from flynnp2p.coord.claims import route_keys
from flynnp2p.errors import ClusterError, Conflict, NotFound, UserError
from flynnp2p.state.merge import Change
from flynnp2p.state.records import DOMAIN, PEM, App, Certificate, Route
from flynnp2p.tls import check_certificate

PORT_TRIES = 8  # ports claimed in etcd but missing from the state, skipped before giving up

if TYPE_CHECKING:
    from flynnp2p.api.apps import AppsApi


class RoutesApi:
    def __init__(self, apps: AppsApi) -> None:
        self.apps = apps

    async def list_routes(self, app: str) -> Response:
        return answer({"routes": [wire(r) for r in ops.routes_of(self.apps.state, self.apps.app(app))]})

    async def create_route(self, app: str) -> Response:
        body = await json_body(
            {"type", "domain", "path", "port", "process_type", "sticky", "https_only", "cert_pem",
             "key_pem"},
            required={"type"},
        )
        found = self.apps.app(app)
        now = self.apps.ctx.now_ms()
        cert = self._certificate(body, now)
        fields = {"id": uuid.uuid4().hex, "app_id": found.id, "created_at": now}
        if cert is not None:
            fields["certificate_id"] = cert.id
        # A TCP route without a port gets one on the leader; checked here with a stand-in.
        pick_port = body.get("type") == "tcp" and body.get("port") is None
        route = Route.decode_fields("route", {**fields, **body, **({"port": 1} if pick_port else {})})
        idem = idempotency_key()
        relayed = await self.apps.forwarder.via_leader()
        if relayed is not None:
            return relayed
        async with self.apps.alloc.app_lock(found.id):
            if self.apps.state.record(App, found.id) is None:
                raise NotFound(f"app {found.name!r} was deleted meanwhile")
            if pick_port:
                made, result = await self._add_on_a_free_port(found, route, idem)
            else:
                made, result = await self._add(found, route, idem, cert)
        return answer({"route": wire(made), "replicas": result}, 201)

    @staticmethod
    def _certificate(body: dict[str, Any], now_ms: int) -> Certificate | None:
        """The route's own certificate, checked (parses, matches its key, valid now,
        names the domain); taken out of `body`."""
        cert_pem, key_pem = body.pop("cert_pem", None), body.pop("key_pem", None)
        if cert_pem is None and key_pem is None:
            return None
        if cert_pem is None or key_pem is None:
            raise UserError("body: 'cert_pem' and 'key_pem' come together")
        if body.get("type") != "http":
            raise UserError("body: only http routes take a certificate")
        cert_pem = PEM.decode("route.cert_pem", cert_pem)
        key_pem = PEM.decode("route.key_pem", key_pem)
        domain = DOMAIN.decode("route.domain", body.get("domain"))
        now = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
        info = check_certificate(cert_pem, key_pem, domain, now)
        names = [n for n in info.domains if vocab.DOMAIN.ok(n)][:99]
        domains = (domain, *(n for n in names if n != domain))
        return Certificate(
            id=uuid.uuid4().hex, domains=domains, cert_pem=cert_pem, key_pem=key_pem, created_at=now_ms
        )

    async def _add(
        self, app: App, route: Route, idem: str | None, cert: Certificate | None = None
    ) -> tuple[Route, int]:
        keys = route_keys(route)
        clash = ops.route_clash(self.apps.state, route)
        if clash is not None and not (keys and await self.apps.is_replay(keys[0], idem)):
            raise Conflict(clash)
        if clash is None:
            taken = f"{ops.describe_route(route)} is taken"
            changes = [route] if cert is None else [cert, route]
            result = await self.apps.alloc.claim_and_write(app.id, keys, changes, idem, taken)
            if result is not None:
                return route, result.replicas
        # A retry of a create that was made: answer with that route.
        made = next((r for r in ops.routes_of(self.apps.state, app) if route_keys(r) == keys), None)
        if made is None:
            raise ClusterError("the route was added but has not reached this node yet; retry")
        return made, 1

    async def _add_on_a_free_port(self, app: App, route: Route, idem: str | None) -> tuple[Route, int]:
        """The lowest free port of the cluster's range; a port claimed in etcd by a
        route the state lost (the sweep frees it) is skipped."""
        if idem is not None:  # a retry: the port the first attempt took
            for mine in ops.routes_of(self.apps.state, app):
                if mine.type == "tcp" and await self.apps.is_replay(route_keys(mine)[0], idem):
                    return mine, 1
        skipped: list[int] = []
        for port in ops.free_tcp_ports(self.apps.state):
            candidate = dataclasses.replace(route, port=port)
            try:
                return await self._add(app, candidate, idem)
            except Conflict:
                skipped.append(port)
                if len(skipped) >= PORT_TRIES:
                    break
        lo, hi = ops.tcp_port_range(self.apps.state)
        raise Conflict(
            f"no free TCP route port in {lo}-{hi}"
            + (f" (claimed but not in the state: {skipped})" if skipped else "")
            + "; remove a TCP route or give a port"
        )

    async def delete_route(self, app: str, route_id: str) -> Response:
        found = self.apps.app(app)
        route = ops.of_app(self.apps.state, found, Route, ref("route", route_id))
        relayed = await self.apps.forwarder.via_leader()
        if relayed is not None:
            return relayed
        result = await self.apps.ctx.state.write(ops.route_deletion(self.apps.state, route))
        await self.apps.drop_claims(found.id, route_keys(route))
        return answer({"deleted": route.id, "replicas": result.replicas})

    async def update_route(self, app: str, route_id: str) -> Response:
        body = await json_body({*ops.ROUTE_UPDATABLE, *ops.ROUTE_FIXED})
        found = self.apps.app(app)
        route = ops.of_app(self.apps.state, found, Route, ref("route", route_id))
        self._updated(route, body)  # refused here already, before any forwarding
        idem = idempotency_key()
        relayed = await self.apps.forwarder.via_leader()
        if relayed is not None:
            return relayed
        async with self.apps.alloc.app_lock(found.id):
            route = ops.of_app(self.apps.state, found, Route, route.id)  # as it is now, on the leader
            updated, cert = self._updated(route, body)
            changes: list[Change] = [*([cert] if cert is not None else []), updated]
            changes += ops.route_certificate_left(self.apps.state, route, updated.certificate_id)
            old_keys, new_keys = route_keys(route), route_keys(updated)
            if new_keys == old_keys:
                result = await self.apps.ctx.state.write(changes)
                replicas = result.replicas
            else:  # a new path: claim its domain+path first, like a new route's
                clash = ops.route_clash(self.apps.state, updated)
                if clash is not None:
                    raise Conflict(clash)
                taken = f"{ops.describe_route(updated)} is taken"
                outcome = await self.apps.alloc.claim_and_write(found.id, new_keys, changes, idem, taken)
                replicas = outcome.replicas if outcome is not None else 1
                await self.apps.drop_claims(found.id, old_keys)
        return answer({"route": wire(updated), "replicas": replicas})

    def _updated(self, route: Route, body: dict[str, Any]) -> tuple[Route, Certificate | None]:
        """The route as `body` changes it, and its new certificate (checked) if it brings one."""
        fields = {**body, "type": route.type, "domain": route.domain}  # a copy: `_certificate` pops
        cert = self._certificate(fields, self.apps.ctx.now_ms())
        return ops.route_update(route, body, cert.id if cert is not None else None), cert
