"""Deployments of an app, and rollback.

    GET  /v1/apps/<app>/deployments          newest first
    GET  /v1/apps/<app>/deployments/<id>
    POST /v1/apps/<app>/rollback             {"release"?: id | "vN" | N}: the formation
                                             moves back (default: to the release before
                                             the current one; 409 when there is none)

A `Deployment` is written with every formation write that names a new release
(`flynnp2p.api.ops.deployment_changes`); the leader's deploy watcher
(`flynnp2p.scheduler.watcher`) finishes it. A rollback is such a write, so it is a
deployment too, with the same health gate: when the release rolled back to fails,
the formation returns to the release it left. The handlers share the app API's
allocator (the app's lock and formation generation) and forwarder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Response

from flynnp2p.api import ops
from flynnp2p.api.edge import answer, json_body, ref
from flynnp2p.api.render import wire
from flynnp2p.errors import NotFound, UserError
from flynnp2p.state.merge import Change, State
from flynnp2p.state.records import Deployment, Formation, Release
from flynnp2p.vocab import show

if TYPE_CHECKING:
    from flynnp2p.api.apps import AppsApi


class DeploysApi:
    def __init__(self, apps: AppsApi) -> None:
        self.apps = apps

    async def list_deployments(self, app: str) -> Response:
        found = self.apps.app(app)
        return answer(
            {"deployments": [wire(d) for d in ops.deployments_of(self.apps.state, found)]}
        )

    async def get_deployment(self, app: str, deployment_id: str) -> Response:
        found = self.apps.app(app)
        key = ref("deployment", deployment_id)
        dep = next((d for d in ops.deployments_of(self.apps.state, found) if d.id == key), None)
        if dep is None:
            raise NotFound(
                f"app {found.name!r} has no deployment {key!r} (see GET /v1/apps/{found.name}/deployments)"
            )
        return answer({"deployment": wire(dep)})

    async def rollback(self, app: str) -> Response:
        body = await json_body({"release"}, empty_ok=True)
        target = body.get("release")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (str, int))):
            raise UserError(
                f"rollback.release: expected a release id, a version such as 'v2' or a number, "
                f"got {show(target)}"
            )
        if isinstance(target, str):
            target = ref("release", target)
        found = self.apps.app(app)
        relayed = await self.apps.forwarder.via_leader()
        if relayed is not None:
            return relayed

        def build(state: State) -> list[Change]:
            now = self.apps.ctx.now_ms()
            current = ops.find_app(state, found.id)
            formation = ops.rollback_formation(state, current, target, now)
            return [formation, *ops.deployment_changes(state, current, formation, now)]

        changes, result = await self.apps.alloc.write_formation(found, build)
        assert result is not None  # (build always has the formation)
        formation = next(c for c in changes if isinstance(c, Formation))
        dep = next(c for c in changes if isinstance(c, Deployment) and c.status == "running")
        release = self.apps.state.record(Release, formation.release_id)
        return answer(
            {
                "deployment": wire(dep),
                "formation": wire(formation),
                "release": None if release is None else wire(release),
                "replicas": result.replicas,
            },
            201,
        )
