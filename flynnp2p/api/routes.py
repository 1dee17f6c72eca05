"""Routes of an app: how requests reach it through the router.

    GET    /v1/apps/<app>/routes
    POST   /v1/apps/<app>/routes             {"type": "http", "domain", "path"?} | {"type": "tcp", "port"}
    DELETE /v1/apps/<app>/routes/<id>

A route's HTTP domain+path, or its TCP port, is unique in the cluster: the leader
claims it in etcd before the route is written (`flynnp2p.api.allocate`), under the
app's lock, and a retry with the same ``Idempotency-Key`` answers with the route
the first attempt made. The handlers share the app API's allocator and forwarder.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from quart import Response

from flynnp2p.api import ops
from flynnp2p.api.edge import answer, idempotency_key, json_body, ref
from flynnp2p.api.render import wire
from flynnp2p.coord.claims import route_keys
from flynnp2p.errors import ClusterError, Conflict, NotFound
from flynnp2p.state.merge import Delete
from flynnp2p.state.records import App, Route

if TYPE_CHECKING:
    from flynnp2p.api.apps import AppsApi


class RoutesApi:
    def __init__(self, apps: AppsApi) -> None:
        self.apps = apps

    async def list_routes(self, app: str) -> Response:
        return answer({"routes": [wire(r) for r in ops.routes_of(self.apps.state, self.apps.app(app))]})

    async def create_route(self, app: str) -> Response:
        body = await json_body(
            {"type", "domain", "path", "port", "process_type", "sticky"}, required={"type"}
        )
        found = self.apps.app(app)
        fields = {"id": uuid.uuid4().hex, "app_id": found.id, "created_at": self.apps.ctx.now_ms()}
        route = Route.decode_fields("route", {**fields, **body})
        idem = idempotency_key()
        relayed = await self.apps.forwarder.via_leader()
        if relayed is not None:
            return relayed
        keys = route_keys(route)
        async with self.apps.alloc.app_lock(found.id):
            state = self.apps.state
            if state.record(App, found.id) is None:
                raise NotFound(f"app {found.name!r} was deleted meanwhile")
            clash = ops.route_clash(state, route)
            if clash is not None and not (keys and await self.apps.is_replay(keys[0], idem)):
                raise Conflict(clash)
            result = None
            if clash is None:
                taken = f"{ops.describe_route(route)} is taken"
                result = await self.apps.alloc.claim_and_write(found.id, keys, [route], idem, taken)
        if result is None:  # a retry of a create that was made: answer with that route
            made = next((r for r in ops.routes_of(self.apps.state, found) if route_keys(r) == keys), None)
            if made is None:
                raise ClusterError("the route was added but has not reached this node yet; retry")
            return answer({"route": wire(made), "replicas": 1}, 201)
        return answer({"route": wire(route), "replicas": result.replicas}, 201)

    async def delete_route(self, app: str, route_id: str) -> Response:
        found = self.apps.app(app)
        route = ops.of_app(self.apps.state, found, Route, ref("route", route_id))
        relayed = await self.apps.forwarder.via_leader()
        if relayed is not None:
            return relayed
        result = await self.apps.ctx.state.write([Delete(Route.KIND, route.id)])
        await self.apps.drop_claims(found.id, route_keys(route))
        return answer({"deleted": route.id, "replicas": result.replicas})
