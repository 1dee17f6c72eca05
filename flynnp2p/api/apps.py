"""Apps, releases, formations, routes and the event stream, over the replicated state.

    POST   /v1/apps                          {"name"?, "meta"?}: the app and its default route
    GET    /v1/apps
    GET    /v1/apps/<app>                    the app, its current release, formation, routes
    PATCH  /v1/apps/<app>                    {"meta"?: {k: v | null}, "strategy"?,
                                              "deploy_timeout_s"?, "build_memory_mb"?,
                                              "build_timeout_s"?}
    DELETE /v1/apps/<app>                    the app, its routes and formation, in one batch
    POST   /v1/apps/<app>/releases           {"artifacts", "env", "processes", "meta"}
    GET    /v1/apps/<app>/releases[/<id>]    newest first (releases are immutable)
    GET    /v1/apps/<app>/formation
    PUT    /v1/apps/<app>/formation          {"processes": {type: count}, "release_id"?}
    GET    /v1/apps/<app>/env
    PATCH  /v1/apps/<app>/env                {"set"?: {K: V}, "unset"?: [K]}: a new release
    GET    /v1/apps/<app>/routes
    POST   /v1/apps/<app>/routes             {"type": "http", "domain", "path"?} | {"type": "tcp", "port"?}
    DELETE /v1/apps/<app>/routes/<id>
    GET    /v1/apps/<app>/deployments[/<id>] newest first (`flynnp2p.api.deploys`)
    POST   /v1/apps/<app>/rollback           {"release"?}: back to an earlier release
    GET    /v1/events[?kinds=app,route]      Server-Sent Events of record changes (resume:
                                             Last-Event-ID header or ?last_event_id=)

``<app>`` is an app's name or id. Every write answers with ``"replicas"``: how many
nodes hold it (this one included).

Theory of operation
-------------------
The handlers are thin; each rule has one home:

* the request is decoded and checked at the edge (`flynnp2p.api.edge`, names from
  `flynnp2p.vocab`);
* a change is sent to the leader (`flynnp2p.api.forward`): the replicated map
  resolves concurrent writes last-writer-wins, which cannot keep app names, TCP
  ports or HTTP domain+path unique, nor serialise an app's releases;
* on the leader, names and routes are claimed in etcd, and releases and
  formation writes numbered by an etcd compare-and-swap (`flynnp2p.api.allocate`),
  under the app's lock, so even two nodes that both believe they lead cannot both
  win, and no formation write is built on counts older than the last acknowledged;
* what the change is, is a plain function (`flynnp2p.api.ops`), and its records
  are written as one atomic batch (`ReplicatedState.write`), so a reader never
  sees an app without its default route, or a new env release that the formation
  does not point at yet.

Reads come from this node's snapshot of the replicated state. The event stream
lives in `flynnp2p.api.events`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from quart import Blueprint, Response

from flynnp2p.api import edge, ops
from flynnp2p.api.allocate import Allocator
from flynnp2p.api.context import ClusterContext
from flynnp2p.api.deploys import DeploysApi
from flynnp2p.api.events import events
from flynnp2p.api.forward import Forwarder
from flynnp2p.api.render import wire
from flynnp2p.api.routes import RoutesApi
from flynnp2p.build.procfile import parse_procfile, read_slug_procfile
from flynnp2p.build.push import forget_repo
from flynnp2p.coord.claims import app_key, route_keys
from flynnp2p.coord.client import CoordError
from flynnp2p.errors import ClusterError, Conflict, NotFound, UserError
from flynnp2p.state.merge import Change, State
from flynnp2p.state.records import ID, META, App, Artifact, Formation, Release
from flynnp2p.state.replica import WriteOutcome
from flynnp2p.vocab import show

log = logging.getLogger(__name__)


class AppsApi:
    """The request handlers; one instance per node (it holds the allocation lock)."""

    def __init__(
        self,
        ctx: ClusterContext,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        slug_path: Callable[[str], Awaitable[Path]] | None = None,
        http: httpx.AsyncClient | None = None,
        slug_size: Callable[[str], Awaitable[int]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.slug_path = slug_path
        self.slug_size = slug_size
        self.forwarder = Forwarder(ctx, http, transport)
        self.rng = rng or secrets.SystemRandom()
        self.alloc = Allocator(ctx.state, ctx.claims, ctx.now_ms)

    @property
    def state(self) -> State:
        return self.ctx.state.state

    def app(self, app: str) -> App:
        return ops.find_app(self.state, edge.ref("app", app))

    # apps

    async def create_app(self) -> Response:
        body = await edge.json_body({"name", "meta"}, empty_ok=True)
        name = None if body.get("name") is None else edge.app_name(body["name"])
        meta = META.decode("app.meta", body.get("meta", {}))
        idem = edge.idempotency_key()
        relayed = await self.forwarder.via_leader()
        if relayed is not None:
            return relayed
        for _ in range(1 if name is not None else 5):
            chosen = name or ops.fresh_name(self.rng, {a.name for a in self.state.records(App)})
            try:
                return await self._create_app(chosen, meta, idem)
            except Conflict:
                if name is not None:
                    raise
        raise ClusterError("could not find a free app name; pass one")

    async def _create_app(self, name: str, meta: Mapping[str, str], idem: str | None) -> Response:
        state = self.state
        taken = next((a for a in state.records(App) if a.name == name), None)
        if taken is not None and not await self.is_replay(app_key(name), idem):
            raise Conflict(f"an app named {name!r} already exists (id {taken.id})")
        app, route = ops.new_app(name, meta, self.ctx.cluster_domain, self.ctx.now_ms())
        clash = ops.route_clash(state, route)
        if clash is not None and taken is None:
            raise Conflict(f"cannot create app {name!r}: its default {clash}")
        result = await self.alloc.claim_and_write(
            app.id, [app_key(name), *route_keys(route)], [app, route], idem,
            f"an app named {name!r} already exists (or its domain {route.domain} is taken)",
        )  # fmt: skip
        if result is None:  # a retry of a create that was made: answer with that app
            return await self._replayed_app(name)
        return edge.answer({"app": wire(app), "routes": [wire(route)], "replicas": result.replicas}, 201)

    async def is_replay(self, key: str, idem: str | None) -> bool:
        if idem is None:
            return False
        owner = await self.ctx.claims().owner(key)
        return owner is not None and owner.idem == idem

    async def _replayed_app(self, name: str) -> Response:
        owner = await self.ctx.claims().owner(app_key(name))
        found = None if owner is None else await self.alloc.wait_record(App, owner.app_id)
        if not isinstance(found, App):
            raise ClusterError(f"app {name!r} was created but has not reached this node yet; retry")
        routes = ops.routes_of(self.state, found)
        return edge.answer({"app": wire(found), "routes": [wire(r) for r in routes], "replicas": 1}, 201)

    async def list_apps(self) -> Response:
        apps = sorted(self.state.records(App), key=lambda a: a.name)
        return edge.answer({"apps": [wire(a) for a in apps]})

    async def get_app(self, app: str) -> Response:
        state = self.state
        found = self.app(app)
        release = ops.current_release(state, found)
        formation = state.record(Formation, found.id)
        return edge.answer(
            {
                "app": wire(found),
                "release": None if release is None else wire(release),
                "formation": None if formation is None else wire(formation),
                "routes": [wire(r) for r in ops.routes_of(state, found)],
            }
        )

    async def patch_app(self, app: str) -> Response:
        body = await edge.json_body({"meta", *ops.APP_SETTINGS})
        if not body:
            raise UserError(
                f"body: nothing to change; accepted fields: meta, {', '.join(ops.APP_SETTINGS)}"
            )
        found = self.app(app)
        patch = body.get("meta", {})
        if not isinstance(patch, dict):
            raise UserError(f"app.meta: expected a map of label to string or null, got {show(patch)}")
        relayed = await self.forwarder.via_leader()
        if relayed is not None:
            return relayed
        async with self.alloc.app_lock(found.id):  # per key: each patch on the last one
            found = ops.find_app(self.state, found.id)
            settings = {k: v for k, v in body.items() if k in ops.APP_SETTINGS}
            updated = ops.patched_app(found, patch, settings)
            result = await self.ctx.state.write([updated])
        return edge.answer({"app": wire(updated), "replicas": result.replicas})

    async def delete_app(self, app: str) -> Response:
        found = self.app(app)
        relayed = await self.forwarder.via_leader()
        if relayed is not None:
            return relayed
        async with self.alloc.app_lock(found.id):
            state = self.state
            routes = ops.routes_of(state, found)
            had_formation = state.record(Formation, found.id) is not None
            result = await self.ctx.state.write(ops.app_deletion(state, found))
            await self.drop_claims(found.id, Allocator.claims_of_app(found, routes), forget=True)
        deleted = {
            "app": found.id,
            "name": found.name,
            "routes": [r.id for r in routes],
            "formation": had_formation,
        }
        return edge.answer({"deleted": deleted, "replicas": result.replicas})

    # releases

    async def create_release(self, app: str) -> Response:
        body = await edge.json_body({"artifacts", "env", "processes", "meta", "slug", "process_types"})
        state = self.state
        found = self.app(app)
        if "slug" in body:
            return await self._release_from_slug(found, body)
        fields = {"id": uuid.uuid4().hex, "app_id": found.id, "created_at": self.ctx.now_ms()}
        release = Release.decode_fields("release", {**fields, **body})
        for i, artifact in enumerate(release.artifacts):
            if state.record(Artifact, artifact) is None:
                raise UserError(f"release.artifacts[{i}]: no artifact {artifact!r} in the cluster")
        relayed = await self.forwarder.via_leader()
        if relayed is not None:
            return relayed
        made, _, result = await self.next_release(
            found, lambda _base, n: (dataclasses.replace(release, version=n), [])
        )
        return edge.answer({"release": wire(made), "replicas": result.replicas}, 201)

    async def next_release(
        self, app: App, build: Callable[[Release | None, int], tuple[Release, list[Change]]]
    ) -> tuple[Release, list[Change], WriteOutcome]:
        return await self.alloc.next_release(
            app, build, lambda: ops.current_release(self.state, app),
            len(ops.releases_of(self.state, app)),
        )  # fmt: skip

    async def _release_from_slug(self, app: App, body: dict[str, Any]) -> Response:
        """A release of an uploaded slug: its Procfile gives the process types; the
        app's env carries over, and the formation moves to it (a deploy).

        ``process_types`` (optional) are the slug's Procfile as its builder read it
        (`flynnp2p.build.deploy.BuildStep`, which wrote them into the slug): given,
        the slug is not decompressed again here, nor fetched to the leader to be
        read there; it only has to be held by some node."""
        if "artifacts" in body or "processes" in body:
            raise UserError("body: 'slug' comes with neither 'artifacts' nor 'processes' (the Procfile gives them)")
        digest = edge.DIGEST.decode("release.slug", body["slug"])
        env_given = edge.ENV_SET.decode("release.env", body.get("env", {}))
        meta = META.decode("release.meta", body.get("meta", {}))
        given = None if "process_types" not in body else _process_types(body["process_types"])
        if given is not None and self.slug_size is not None:
            types = given
            try:
                size = await self.slug_size(digest)
            except NotFound:
                raise _no_slug(digest) from None
        else:
            types, size = await self._read_slug(digest)
            types = types if given is None else given
        if not types:
            raise UserError("release.slug: the slug has no ./app/Procfile (need lines 'TYPE: COMMAND')")
        relayed = await self.forwarder.via_leader()
        if relayed is not None:
            return relayed
        now = self.ctx.now_ms()
        artifact = Artifact(
            id=uuid.uuid4().hex, type="slug", uri=f"blob:{digest}", created_at=now,
            digest=digest, size=size,
        )  # fmt: skip

        def build(base: Release | None, number: int) -> tuple[Release, list[Change]]:
            formation = self.state.record(Formation, app.id)
            release, moved = ops.slug_release(
                app, base, formation, number, artifact=artifact, types=types, env=env_given,
                meta=meta, now=now,
            )  # fmt: skip
            return release, [artifact, moved, *ops.deployment_changes(self.state, app, moved, now)]

        release, extra, result = await self.next_release(app, build)
        formation = _formation_in(extra)
        return edge.answer(
            {"release": wire(release), "formation": wire(formation), "replicas": result.replicas}, 201
        )

    async def _read_slug(self, digest: str) -> tuple[dict[str, str], int]:
        """(the Procfile's types, the size) of slug `digest`, read on this node."""
        if self.slug_path is None:
            raise ClusterError("this node cannot read slugs")
        try:
            path = await self.slug_path(digest)
        except NotFound:
            raise _no_slug(digest) from None
        types = await trio.to_thread.run_sync(read_slug_procfile, path)
        return types, (await trio.to_thread.run_sync(path.stat)).st_size

    async def list_releases(self, app: str) -> Response:
        return edge.answer({"releases": [wire(r) for r in ops.releases_of(self.state, self.app(app))]})

    async def get_release(self, app: str, release_id: str) -> Response:
        release = ops.of_app(self.state, self.app(app), Release, edge.ref("release", release_id))
        return edge.answer({"release": wire(release)})

    # formation

    async def get_formation(self, app: str) -> Response:
        formation = self.state.record(Formation, self.app(app).id)
        return edge.answer({"formation": None if formation is None else wire(formation)})

    async def put_formation(self, app: str) -> Response:
        body = await edge.json_body({"processes", "release_id", "constraints"}, required={"processes"})
        found = self.app(app)
        counts = edge.COUNTS.decode("formation.processes", body["processes"])
        given = edge.CONSTRAINTS.decode("formation.constraints", body.get("constraints", {}))
        release_id = None
        if body.get("release_id") is not None:
            release_id = ID.decode("formation.release_id", body["release_id"])
        relayed = await self.forwarder.via_leader()
        if relayed is not None:
            return relayed

        def build(state: State) -> list[Change]:
            now = self.ctx.now_ms()
            formation = ops.new_formation(state, found, counts, given, release_id, now)
            return [formation, *ops.deployment_changes(state, found, formation, now)]

        changes, result = await self.alloc.write_formation(found, build)
        assert result is not None  # (build always has the formation)
        return edge.answer({"formation": wire(_formation_in(changes)), "replicas": result.replicas})

    # env

    async def get_env(self, app: str) -> Response:
        release = ops.current_release(self.state, self.app(app))
        env = {} if release is None else dict(release.env)
        return edge.answer({"env": env, "release_id": None if release is None else release.id})

    async def patch_env(self, app: str) -> Response:
        body = await edge.json_body({"set", "unset"})
        found = self.app(app)
        to_set = edge.ENV_SET.decode("env.set", body.get("set", {}))
        to_unset = edge.ENV_UNSET.decode("env.unset", body.get("unset", []))
        ops.check_env_change(to_set, to_unset)
        relayed = await self.forwarder.via_leader()
        if relayed is not None:
            return relayed

        def build(base: Release | None, number: int) -> tuple[Release, list[Change]]:
            formation = self.state.record(Formation, found.id)
            now = self.ctx.now_ms()
            release, moved = ops.env_release(
                found, base, formation, number, set_=to_set, unset=to_unset, now=now
            )
            return release, [moved, *ops.deployment_changes(self.state, found, moved, now)]

        release, extra, result = await self.next_release(found, build)
        return edge.answer(
            {
                "env": dict(release.env),
                "release": wire(release),
                "formation": wire(_formation_in(extra)),
                "replicas": result.replicas,
            }
        )

    async def drop_claims(self, app_id: str, keys: Sequence[str], *, forget: bool = False) -> None:
        """Best effort: a claim left behind is dropped by the leader's claim sweep."""
        try:
            with trio.move_on_after(3):
                claims = self.ctx.claims()
                await claims.drop_owned_by(keys, app_id)
                if forget:
                    await claims.forget_app(app_id)
                    await forget_repo(claims.client, app_id)  # its saved git repository
        except (CoordError, ClusterError) as exc:
            log.warning("could not drop the claims of app %s (the sweep will): %s", app_id, exc)


def _formation_in(changes: Sequence[Change]) -> Formation:
    return next(c for c in changes if isinstance(c, Formation))


def apps_blueprint(
    ctx: ClusterContext,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    rng: random.Random | None = None,
    api: AppsApi | None = None,
) -> Blueprint:
    """The app API; `transport` replaces the network when forwarding (tests)."""
    api = api or AppsApi(ctx, transport, rng)
    routes = RoutesApi(api)
    deploys = DeploysApi(api)
    bp = Blueprint("apps", __name__)
    rules: Iterable[tuple[str, str, Any]] = (
        ("POST", "/v1/apps", api.create_app),
        ("GET", "/v1/apps", api.list_apps),
        ("GET", "/v1/apps/<app>", api.get_app),
        ("PATCH", "/v1/apps/<app>", api.patch_app),
        ("DELETE", "/v1/apps/<app>", api.delete_app),
        ("POST", "/v1/apps/<app>/releases", api.create_release),
        ("GET", "/v1/apps/<app>/releases", api.list_releases),
        ("GET", "/v1/apps/<app>/releases/<release_id>", api.get_release),
        ("GET", "/v1/apps/<app>/formation", api.get_formation),
        ("PUT", "/v1/apps/<app>/formation", api.put_formation),
        ("GET", "/v1/apps/<app>/env", api.get_env),
        ("PATCH", "/v1/apps/<app>/env", api.patch_env),
        ("GET", "/v1/apps/<app>/routes", routes.list_routes),
        ("POST", "/v1/apps/<app>/routes", routes.create_route),
        ("PATCH", "/v1/apps/<app>/routes/<route_id>", routes.update_route),
        ("DELETE", "/v1/apps/<app>/routes/<route_id>", routes.delete_route),
        ("GET", "/v1/apps/<app>/deployments", deploys.list_deployments),
        ("GET", "/v1/apps/<app>/deployments/<deployment_id>", deploys.get_deployment),
        ("POST", "/v1/apps/<app>/rollback", deploys.rollback),
    )
    for method, rule, view in rules:
        bp.add_url_rule(rule, f"{view.__name__}", view, methods=[method])
    bp.add_url_rule("/v1/events", "events", partial(events, ctx.state), methods=["GET"])

    return bp


def _no_slug(digest: str) -> UserError:
    return UserError(f"release.slug: no node holds blob {digest}; upload it first (PUT /v1/blobs/{digest})")


def _process_types(value: object) -> dict[str, str]:
    """``release.process_types``: ``{TYPE: COMMAND}``, checked by the Procfile's own
    rules (`parse_procfile` of the lines they make, which must give them back)."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "\n" not in k + v and "\r" not in k + v
        for k, v in value.items()
    ):
        raise UserError("release.process_types: expected an object of TYPE: COMMAND strings")
    try:
        types = parse_procfile("".join(f"{k}: {v}\n" for k, v in value.items()))
    except UserError as exc:
        raise UserError(f"release.process_types: {exc.message}") from None
    if types != value:
        raise UserError("release.process_types: commands must not start or end with spaces")
    return types
