"""Apps, releases, formations, routes and the event stream, over the replicated state.

    POST   /v1/apps                          {"name"?, "meta"?}: the app and its default route
    GET    /v1/apps
    GET    /v1/apps/<app>                    the app, its current release, formation, routes
    PATCH  /v1/apps/<app>                    {"meta"?: {k: v | null}, "strategy"?}
    DELETE /v1/apps/<app>                    the app, its routes and formation, in one batch
    POST   /v1/apps/<app>/releases           {"artifacts", "env", "processes", "meta"}
    GET    /v1/apps/<app>/releases[/<id>]    newest first (releases are immutable)
    GET    /v1/apps/<app>/formation
    PUT    /v1/apps/<app>/formation          {"processes": {type: count}, "release_id"?}
    GET    /v1/apps/<app>/env
    PATCH  /v1/apps/<app>/env                {"set"?: {K: V}, "unset"?: [K]}: a new release
    GET    /v1/apps/<app>/routes
    POST   /v1/apps/<app>/routes             {"type": "http", "domain", "path"?} | {"type": "tcp", "port"}
    DELETE /v1/apps/<app>/routes/<id>
    GET    /v1/events[?kinds=app,route]      Server-Sent Events of record changes (resume:
                                             Last-Event-ID header or ?last_event_id=)

``<app>`` is an app's name or id. Every write answers with ``"replicas"``: how many
nodes hold it (this one included).

Theory of operation
-------------------
Any node answers: reads come from this node's snapshot of the replicated state, and
each request's writes are one atomic batch (`ReplicatedState.write`), so a reader
never sees an app without its default route, or a new env release that the
formation does not point at yet.

Uniqueness and order. The replicated map resolves concurrent writes
last-writer-wins, which cannot keep app names, TCP ports or HTTP domain+path
unique, nor serialise an app's releases. So every write to an app goes to the
leader: any other node forwards the request to the leader's API (marked
``X-Flynnp2p-Forwarded: 1``, so it is never forwarded twice) and relays the
answer. On the leader, names and routes are claimed in etcd first and releases
are numbered by an etcd compare-and-swap (`flynnp2p.api.allocate`), so even two
nodes that both believe they lead cannot both win.

The event stream lives in `flynnp2p.api.events`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import trio
from quart import Blueprint, Response, jsonify, request

from flynnp2p.api.allocate import Allocator, idempotency_key
from flynnp2p.api.app import FORWARDED, error_response
from flynnp2p.api.events import events
from flynnp2p.api.render import show as _show
from flynnp2p.api.render import wire
from flynnp2p.build.procfile import process_specs, read_slug_procfile
from flynnp2p.coord.claims import Claims, app_key, route_keys
from flynnp2p.coord.client import CoordError
from flynnp2p.errors import ClusterError, Conflict, NotFound, UserError
from flynnp2p.state.errors import RecordError
from flynnp2p.state.merge import Change, Delete, State
from flynnp2p.state.records import (
    APP_NAME_RE,
    DIGEST_RE,
    ENV_NAME_RE,
    ID,
    ID_RE,
    META,
    PROCESS_TYPE,
    App,
    Artifact,
    Formation,
    Release,
    Route,
)
from flynnp2p.state.replica import ReplicatedState, WriteOutcome
from flynnp2p.state.schema import Dict, Int, Seq, Str

log = logging.getLogger(__name__)

FORWARD_TIMEOUT = httpx.Timeout(15.0, connect=2.0)
IDEMPOTENCY_HEADER = "Idempotency-Key"

_REF = re.compile(ID_RE)
_REF_ACCEPTED = "1-128 letters, digits and _.:@-, starting with a letter or digit"
_NAME = re.compile(APP_NAME_RE)
_NAME_ACCEPTED = (
    "1 to 63 lowercase letters, digits and single dashes, starting with a letter "
    "and not ending with a dash"
)
_COUNTS = Dict(PROCESS_TYPE, Int(0, 10_000), max_items=64)
_CONSTRAINTS = Dict(
    PROCESS_TYPE,
    Dict(
        Str(r"[a-z][a-z0-9_.-]{0,30}", "a host tag name: lowercase letters, digits and _.-"),
        Str(r"[A-Za-z0-9_.:/-]{0,128}", "a host tag value: up to 128 letters, digits and _.:/-"),
        max_items=16,
    ),
    max_items=64,
)
_DIGEST = Str(DIGEST_RE, "'sha256:' and 64 lowercase hex digits")
_ENV_NAME = Str(ENV_NAME_RE, "an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
_ENV_SET = Dict(_ENV_NAME, Str(None, "a string of up to 32768 characters", 32768, 0))
_ENV_UNSET = Seq(_ENV_NAME, max_items=256)

_ADJECTIVES = (
    "amber", "autumn", "bold", "brave", "bright", "calm", "crimson", "dawn", "eager", "fancy",
    "gentle", "golden", "happy", "hidden", "icy", "jolly", "lively", "lucky", "misty", "nimble",
    "proud", "quiet", "rapid", "silent", "snowy", "sunny", "swift",
)
_NOUNS = (
    "badger", "bay", "brook", "canyon", "cloud", "comet", "creek", "dune", "falcon", "fern",
    "field", "forest", "harbor", "heron", "lake", "meadow", "moon", "otter", "pine", "river",
    "sky", "sparrow", "star", "stone", "wave", "willow",
)


# -- the seams --------------------------------------------------------------


class ClusterContext(Protocol):
    """What the agent hands to `apps_blueprint`."""

    @property
    def state(self) -> ReplicatedState: ...

    @property
    def peer_key(self) -> str:
        """The peer credential this node presents when it forwards a request."""
        ...

    @property
    def cluster_domain(self) -> str:
        """Apps get the default route ``<name>.<cluster_domain>``."""
        ...

    def is_leader(self) -> bool: ...

    async def acting_leader(self) -> bool:
        """Whether this node acts as the leader; a node just elected first waits
        (bounded) until it has caught up, rather than refusing."""
        ...

    def leader_api(self) -> str | None:
        """The leader's API as ``host:port``, or None while there is no leader."""
        ...

    def now_ms(self) -> int: ...

    def claims(self) -> Claims:
        """The etcd claims (on the leader, whose etcd member is a voter)."""
        ...


# -- input at the edge ------------------------------------------------------


def _ref(what: str, value: str) -> str:
    """A name or id taken from the URL path."""
    if _REF.fullmatch(value) is None:
        raise UserError(f"{what}: expected a name or id of {_REF_ACCEPTED}, got {_show(value)}")
    return value


def app_name(value: object) -> str:
    if type(value) is not str or len(value) > 63 or _NAME.fullmatch(value) is None:
        raise UserError(f"name: expected {_NAME_ACCEPTED}, got {_show(value)}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _json_body(
    allowed: Collection[str], required: Collection[str] = (), *, empty_ok: bool = False
) -> dict[str, Any]:
    """The request's JSON object; only `allowed` fields, all `required` ones present.

    Bodies over MAX_CONTENT_LENGTH never get here (quart answers 413).
    """
    data = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    if not data.strip():
        if empty_ok:
            return {}
        raise UserError("body: expected a JSON object, got an empty body")
    try:
        body = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise UserError("body: JSON nested too deeply") from None
    except ValueError as exc:
        raise UserError(f"body: not valid JSON ({_show(str(exc), 120)})") from None
    if not isinstance(body, dict):
        raise UserError(f"body: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise UserError(
            f"body: unknown field(s) {_show(unknown, 200)}; accepted: {sorted(allowed)}"
        )
    for name in required:
        if name not in body:
            raise UserError(f"body.{name}: missing (required)")
    return body


# -- output -----------------------------------------------------------------


def _json(body: Mapping[str, object], status: int = 200) -> Response:
    resp = jsonify(body)
    resp.status_code = status
    return resp


# -- reads of the state -----------------------------------------------------


def find_app(state: State, ref: str) -> App:
    app = state.record(App, ref)
    if app is None:
        app = next((a for a in state.records(App) if a.name == ref), None)
    if app is None:
        raise NotFound(f"no app named {ref!r} (see GET /v1/apps)")
    return app


def releases_of(state: State, app: App) -> list[Release]:
    """The app's releases, newest first."""
    mine = [r for r in state.records(Release) if r.app_id == app.id]
    return sorted(mine, key=lambda r: (r.created_at, r.id), reverse=True)


def current_release(state: State, app: App) -> Release | None:
    """The formation's release, else the app's newest release."""
    formation = state.record(Formation, app.id)
    if formation is not None:
        release = state.record(Release, formation.release_id)
        if release is not None:
            return release
    newest = releases_of(state, app)
    return newest[0] if newest else None


def routes_of(state: State, app: App) -> list[Route]:
    mine = [r for r in state.records(Route) if r.app_id == app.id]
    return sorted(mine, key=lambda r: (r.type, r.domain or "", r.path, r.port or 0, r.id))


def route_clash(state: State, route: Route) -> str | None:
    """Why `route` cannot be added (its domain+path or port is taken), or None."""
    for other in state.records(Route):
        if other.type != route.type or other.id == route.id:
            continue
        if route.type == "tcp" and other.port == route.port:
            what = f"tcp port {route.port}"
        elif route.type == "http" and (other.domain, other.path) == (route.domain, route.path):
            what = f"http route {route.domain}{'' if route.path == '/' else route.path}"
        else:
            continue
        owner = state.record(App, other.app_id)
        return f"{what} is taken by app {owner.name if owner else other.app_id!r} (route {other.id})"
    return None


# -- the API ----------------------------------------------------------------


class AppsApi:
    """The request handlers; one instance per node (it holds the allocation lock)."""

    def __init__(
        self,
        ctx: ClusterContext,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        slug_path: Callable[[str], Awaitable[Path]] | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.ctx = ctx
        self.slug_path = slug_path
        self.transport = transport
        # Forwarding reuses the node's pooled client (a client per request cost
        # ~50 ms here); `transport` (tests) gets a client of its own.
        self.http = http
        self.rng = rng or secrets.SystemRandom()
        self.alloc = Allocator(ctx.state, ctx.claims, ctx.now_ms)

    # apps

    async def create_app(self) -> Response:
        body = await _json_body({"name", "meta"}, empty_ok=True)
        name = None if body.get("name") is None else app_name(body["name"])
        meta = META.decode("app.meta", body.get("meta", {}))
        idem = idempotency_key(request.headers.get(IDEMPOTENCY_HEADER))
        relayed = await self._via_leader()
        if relayed is not None:
            return relayed
        for _ in range(1 if name is not None else 5):
            chosen = name or self._fresh_name({a.name for a in self.ctx.state.state.records(App)})
            try:
                return await self._create_app(chosen, meta, idem)
            except Conflict:
                if name is not None:
                    raise
        raise ClusterError("could not find a free app name; pass one")

    async def _create_app(self, name: str, meta: Mapping[str, str], idem: str | None) -> Response:
        state = self.ctx.state.state
        taken = next((a for a in state.records(App) if a.name == name), None)
        if taken is not None and not await self._is_replay(app_key(name), idem):
            raise Conflict(f"an app named {name!r} already exists (id {taken.id})")
        now = self.ctx.now_ms()
        app = App(id=uuid.uuid4().hex, name=name, created_at=now, meta=meta)
        route = Route(
            id=uuid.uuid4().hex,
            app_id=app.id,
            type="http",
            created_at=now,
            domain=f"{name}.{self.ctx.cluster_domain}",
        )
        clash = route_clash(state, route)
        if clash is not None and taken is None:
            raise Conflict(f"cannot create app {name!r}: its default {clash}")
        result = await self.alloc.claim_and_write(
            app.id, [app_key(name), *route_keys(route)], [app, route], idem,
            f"an app named {name!r} already exists (or its domain {route.domain} is taken)",
        )  # fmt: skip
        if result is None:  # a retry of a create that was made: answer with that app
            return await self._replayed_app(name)
        return _json({"app": wire(app), "routes": [wire(route)], "replicas": result.replicas}, 201)

    async def _is_replay(self, key: str, idem: str | None) -> bool:
        if idem is None:
            return False
        owner = await self.ctx.claims().owner(key)
        return owner is not None and owner.idem == idem

    async def _replayed_app(self, name: str) -> Response:
        owner = await self.ctx.claims().owner(app_key(name))
        found = None if owner is None else await self.alloc.wait_record(App, owner.app_id)
        if not isinstance(found, App):
            raise ClusterError(f"app {name!r} was created but has not reached this node yet; retry")
        routes = routes_of(self.ctx.state.state, found)
        return _json({"app": wire(found), "routes": [wire(r) for r in routes], "replicas": 1}, 201)

    def _fresh_name(self, taken: Collection[str]) -> str:
        for _ in range(100):
            name = (
                f"{self.rng.choice(_ADJECTIVES)}-{self.rng.choice(_NOUNS)}-"
                f"{self.rng.randrange(1000, 10000)}"
            )
            if name not in taken:
                return name
        raise ClusterError("could not find a free app name; pass one")

    async def list_apps(self) -> Response:
        apps = sorted(self.ctx.state.state.records(App), key=lambda a: a.name)
        return _json({"apps": [wire(a) for a in apps]})

    async def get_app(self, app: str) -> Response:
        state = self.ctx.state.state
        found = find_app(state, _ref("app", app))
        release = current_release(state, found)
        formation = state.record(Formation, found.id)
        return _json(
            {
                "app": wire(found),
                "release": None if release is None else wire(release),
                "formation": None if formation is None else wire(formation),
                "routes": [wire(r) for r in routes_of(state, found)],
            }
        )

    async def patch_app(self, app: str) -> Response:
        body = await _json_body({"meta", "strategy"})
        if not body:
            raise UserError("body: nothing to change; accepted fields: meta, strategy")
        found = find_app(self.ctx.state.state, _ref("app", app))
        patch = body.get("meta", {})
        if not isinstance(patch, dict):
            raise UserError(f"app.meta: expected a map of label to string or null, got {_show(patch)}")
        relayed = await self._via_leader()
        if relayed is not None:
            return relayed
        async with self.alloc.app_lock(found.id):  # per key: each patch on the last one
            found = find_app(self.ctx.state.state, found.id)
            meta = dict(found.meta)
            for key, value in patch.items():
                if value is None:
                    meta.pop(key, None)  # JSON merge patch: null removes the key
                else:
                    meta[key] = value
            updated = dataclasses.replace(
                found, meta=meta, strategy=body.get("strategy", found.strategy)
            )
            result = await self.ctx.state.write([updated])
        return _json({"app": wire(updated), "replicas": result.replicas})

    async def delete_app(self, app: str) -> Response:
        found = find_app(self.ctx.state.state, _ref("app", app))
        relayed = await self._via_leader()
        if relayed is not None:
            return relayed
        async with self.alloc.app_lock(found.id):
            return await self._delete_app(found)

    async def _delete_app(self, found: App) -> Response:
        state = self.ctx.state.state
        routes = routes_of(state, found)
        changes: list[Change] = [Delete(App.KIND, found.id)]
        changes += [Delete(Route.KIND, r.id) for r in routes]
        had_formation = state.record(Formation, found.id) is not None
        if had_formation:
            changes.append(Delete(Formation.KIND, found.id))
        result = await self.ctx.state.write(changes)
        await self._drop_claims(found.id, Allocator.claims_of_app(found, routes), forget=True)
        deleted = {
            "app": found.id,
            "name": found.name,
            "routes": [r.id for r in routes],
            "formation": had_formation,
        }
        return _json({"deleted": deleted, "replicas": result.replicas})

    # releases

    async def create_release(self, app: str) -> Response:
        body = await _json_body({"artifacts", "env", "processes", "meta", "slug"})
        state = self.ctx.state.state
        found = find_app(state, _ref("app", app))
        if "slug" in body:
            return await self._release_from_slug(found, body)
        fields = {"id": uuid.uuid4().hex, "app_id": found.id, "created_at": self.ctx.now_ms()}
        release = Release.decode_fields("release", {**fields, **body})
        for i, artifact in enumerate(release.artifacts):
            if state.record(Artifact, artifact) is None:
                raise UserError(f"release.artifacts[{i}]: no artifact {artifact!r} in the cluster")
        relayed = await self._via_leader()
        if relayed is not None:
            return relayed
        made, _, result = await self._next_release(
            found, lambda _base, n: (dataclasses.replace(release, version=n), [])
        )
        return _json({"release": wire(made), "replicas": result.replicas}, 201)

    async def _next_release(
        self, app: App, build: Callable[[Release | None, int], tuple[Release, list[Change]]]
    ) -> tuple[Release, list[Change], WriteOutcome]:
        state = self.ctx.state.state
        return await self.alloc.next_release(
            app, build, lambda: current_release(self.ctx.state.state, app),
            len(releases_of(state, app)),
        )  # fmt: skip

    async def _release_from_slug(self, app: App, body: dict[str, Any]) -> Response:
        """A release of an uploaded slug: its Procfile gives the process types; the
        app's env carries over, and the formation moves to it (a deploy)."""
        if "artifacts" in body or "processes" in body:
            raise UserError("body: 'slug' comes with neither 'artifacts' nor 'processes' (the Procfile gives them)")
        digest = _DIGEST.decode("release.slug", body["slug"])
        env_given = _ENV_SET.decode("release.env", body.get("env", {}))
        meta = META.decode("release.meta", body.get("meta", {}))
        if self.slug_path is None:
            raise ClusterError("this node cannot read slugs")
        try:
            path = await self.slug_path(digest)
        except NotFound:
            raise UserError(
                f"release.slug: no node holds blob {digest}; upload it first (PUT /v1/blobs/{digest})"
            ) from None
        types = await trio.to_thread.run_sync(read_slug_procfile, path)
        if not types:
            raise UserError("release.slug: the slug has no ./app/Procfile (need lines 'TYPE: COMMAND')")
        size = (await trio.to_thread.run_sync(path.stat)).st_size
        relayed = await self._via_leader()
        if relayed is not None:
            return relayed
        now = self.ctx.now_ms()
        artifact = Artifact(
            id=uuid.uuid4().hex, type="slug", uri=f"blob:{digest}", created_at=now,
            digest=digest, size=size,
        )  # fmt: skip

        def build(base: Release | None, number: int) -> tuple[Release, list[Change]]:
            env = {} if base is None else dict(base.env)
            env.update(env_given)
            release = Release(
                id=uuid.uuid4().hex, app_id=app.id, created_at=now, artifacts=(artifact.id,),
                env=env, processes=process_specs(types), meta=meta, version=number,
            )  # fmt: skip
            formation = self.ctx.state.state.record(Formation, app.id)
            if formation is None:
                counts = {"web": 1} if "web" in types else {}
                formation = Formation(
                    app_id=app.id, release_id=release.id, updated_at=now, processes=counts
                )
            else:
                counts = {t: n for t, n in formation.processes.items() if t in types}
                formation = dataclasses.replace(
                    formation, release_id=release.id, updated_at=now, processes=counts
                )
            return release, [artifact, formation]

        release, extra, result = await self._next_release(app, build)
        return _json(
            {"release": wire(release), "formation": wire(_formation_in(extra)), "replicas": result.replicas},
            201,
        )

    async def list_releases(self, app: str) -> Response:
        state = self.ctx.state.state
        found = find_app(state, _ref("app", app))
        return _json({"releases": [wire(r) for r in releases_of(state, found)]})

    async def get_release(self, app: str, release_id: str) -> Response:
        state = self.ctx.state.state
        release = _of_app(state, find_app(state, _ref("app", app)), Release, release_id)
        return _json({"release": wire(release)})

    # formation

    async def get_formation(self, app: str) -> Response:
        state = self.ctx.state.state
        found = find_app(state, _ref("app", app))
        formation = state.record(Formation, found.id)
        return _json({"formation": None if formation is None else wire(formation)})

    async def put_formation(self, app: str) -> Response:
        body = await _json_body({"processes", "release_id", "constraints"}, required={"processes"})
        found = find_app(self.ctx.state.state, _ref("app", app))
        counts = _COUNTS.decode("formation.processes", body["processes"])
        given = _CONSTRAINTS.decode("formation.constraints", body.get("constraints", {}))
        release_id = None
        if body.get("release_id") is not None:
            release_id = ID.decode("formation.release_id", body["release_id"])
        relayed = await self._via_leader()
        if relayed is not None:
            return relayed
        async with self.alloc.app_lock(found.id):
            formation = self._formation(found, counts, given, release_id)
            result = await self.ctx.state.write([formation])
        return _json({"formation": wire(formation), "replicas": result.replicas})

    def _formation(
        self, found: App, counts: Mapping[str, int], given: Mapping[str, Mapping[str, str]],
        release_id: str | None,
    ) -> Formation:  # fmt: skip
        state = self.ctx.state.state
        current = state.record(Formation, found.id)
        release: Release | None
        if release_id is not None:
            release = state.record(Release, release_id)
            if release is None or release.app_id != found.id:
                raise UserError(f"formation.release_id: app {found.name!r} has no release {release_id!r}")
        else:
            release = current_release(state, found)
            if release is None:
                raise UserError(
                    f"app {found.name!r} has no release yet: create a release first "
                    "(git push, or POST /v1/apps/<app>/releases)"
                )
        unknown = sorted(t for t in counts if t not in release.processes)
        if unknown:
            has = ", ".join(sorted(release.processes)) or "none"
            raise UserError(
                f"formation.processes: release {release.id} has no process type "
                f"{unknown[0]!r}; its types: {has}"
            )
        constraints = dict(current.constraints) if current is not None else {}
        for ptype, tags in given.items():  # {} removes a type's constraints
            if tags:
                constraints[ptype] = tags
            else:
                constraints.pop(ptype, None)
        return Formation(
            app_id=found.id,
            release_id=release.id,
            updated_at=self.ctx.now_ms(),
            processes=counts,
            tags=current.tags if current is not None else {},
            constraints=constraints,
        )

    # env

    async def get_env(self, app: str) -> Response:
        state = self.ctx.state.state
        release = current_release(state, find_app(state, _ref("app", app)))
        env = {} if release is None else dict(release.env)
        return _json({"env": env, "release_id": None if release is None else release.id})

    async def patch_env(self, app: str) -> Response:
        body = await _json_body({"set", "unset"})
        found = find_app(self.ctx.state.state, _ref("app", app))
        to_set = _ENV_SET.decode("env.set", body.get("set", {}))
        to_unset = _ENV_UNSET.decode("env.unset", body.get("unset", []))
        if not to_set and not to_unset:
            raise UserError("body: nothing to change; give 'set': {NAME: value} and/or 'unset': [NAME]")
        both = sorted(set(to_set) & set(to_unset))
        if both:
            raise UserError(f"env: {both[0]!r} is both set and unset")
        relayed = await self._via_leader()
        if relayed is not None:
            return relayed

        def build(current: Release | None, number: int) -> tuple[Release, list[Change]]:
            now = self.ctx.now_ms()
            env = {} if current is None else dict(current.env)
            for name in to_unset:
                env.pop(name, None)
            env.update(to_set)
            new_id = uuid.uuid4().hex
            if current is None:
                release = Release(id=new_id, app_id=found.id, created_at=now, env=env, version=number)
            else:
                release = dataclasses.replace(
                    current, id=new_id, created_at=now, env=env, version=number
                )
            formation = self.ctx.state.state.record(Formation, found.id)
            if formation is None:
                formation = Formation(app_id=found.id, release_id=new_id, updated_at=now)
            else:
                formation = dataclasses.replace(formation, release_id=new_id, updated_at=now)
            return release, [formation]

        release, extra, result = await self._next_release(found, build)
        return _json(
            {
                "env": dict(release.env),
                "release": wire(release),
                "formation": wire(_formation_in(extra)),
                "replicas": result.replicas,
            }
        )

    # routes

    async def list_routes(self, app: str) -> Response:
        state = self.ctx.state.state
        found = find_app(state, _ref("app", app))
        return _json({"routes": [wire(r) for r in routes_of(state, found)]})

    async def create_route(self, app: str) -> Response:
        body = await _json_body(
            {"type", "domain", "path", "port", "process_type", "sticky"}, required={"type"}
        )
        found = find_app(self.ctx.state.state, _ref("app", app))
        fields = {"id": uuid.uuid4().hex, "app_id": found.id, "created_at": self.ctx.now_ms()}
        route = Route.decode_fields("route", {**fields, **body})
        idem = idempotency_key(request.headers.get(IDEMPOTENCY_HEADER))
        relayed = await self._via_leader()
        if relayed is not None:
            return relayed
        async with self.alloc.app_lock(found.id):
            state = self.ctx.state.state
            if state.record(App, found.id) is None:
                raise NotFound(f"app {found.name!r} was deleted meanwhile")
            clash = route_clash(state, route)
            keys = route_keys(route)
            if clash is not None and not (keys and await self._is_replay(keys[0], idem)):
                raise Conflict(clash)
            what = f"tcp port {route.port}" if route.type == "tcp" else f"http route {route.domain}{route.path}"
            result = None
            if clash is None:
                result = await self.alloc.claim_and_write(found.id, keys, [route], idem, f"{what} is taken")
        if result is None:  # a retry of a create that was made: answer with that route
            made = next((r for r in routes_of(self.ctx.state.state, found) if route_keys(r) == keys), None)
            if made is None:
                raise ClusterError("the route was added but has not reached this node yet; retry")
            return _json({"route": wire(made), "replicas": 1}, 201)
        return _json({"route": wire(route), "replicas": result.replicas}, 201)

    async def delete_route(self, app: str, route_id: str) -> Response:
        state = self.ctx.state.state
        found = find_app(state, _ref("app", app))
        route = _of_app(state, found, Route, route_id)
        relayed = await self._via_leader()
        if relayed is not None:
            return relayed
        result = await self.ctx.state.write([Delete(Route.KIND, route.id)])
        await self._drop_claims(found.id, route_keys(route))
        return _json({"deleted": route.id, "replicas": result.replicas})

    async def _drop_claims(self, app_id: str, keys: Sequence[str], *, forget: bool = False) -> None:
        """Best effort: a claim left behind is dropped by the leader's claim sweep."""
        try:
            with trio.move_on_after(3):
                claims = self.ctx.claims()
                await claims.drop_owned_by(keys, app_id)
                if forget:
                    await claims.forget_app(app_id)
        except (CoordError, ClusterError) as exc:
            log.warning("could not drop the claims of app %s (the sweep will): %s", app_id, exc)

    # uniqueness: the leader allocates

    async def _via_leader(self) -> Response | None:
        """None if this node is the leader (allocate here); else the leader's answer."""
        if await self.ctx.acting_leader():
            return None
        if request.headers.get(FORWARDED):
            raise ClusterError("this node is no longer the leader (leadership moved); retry")
        leader = self.ctx.leader_api()
        if leader is None:
            raise ClusterError(
                "the cluster has no leader right now (no quorum?); app names, TCP ports and "
                "HTTP domains are allocated by the leader: retry later "
                "(see 'flynnp2p cluster status')"
            )
        return await self.forward(leader, "the leader")

    async def forward(self, api: str, who: str) -> Response:
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
            raise ClusterError(f"cannot reach {who} at {api}: {reason}; retry") from None
        return Response(
            resp.content,
            status=resp.status_code,
            content_type=resp.headers.get("content-type", "application/json"),
        )


def _formation_in(changes: Sequence[Change]) -> Formation:
    return next(c for c in changes if isinstance(c, Formation))


_Owned = TypeVar("_Owned", Release, Route)


def _of_app(state: State, app: App, cls: type[_Owned], key: str) -> _Owned:
    """The ``cls`` record ``key`` of ``app``; 404 if it is missing or another app's."""
    record = state.record(cls, _ref(cls.KIND, key))
    if record is None or record.app_id != app.id:
        raise NotFound(f"app {app.name!r} has no {cls.KIND} {key!r}")
    return record


def apps_blueprint(
    ctx: ClusterContext,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    rng: random.Random | None = None,
    api: AppsApi | None = None,
) -> Blueprint:
    """The app API; `transport` replaces the network when forwarding (tests)."""
    api = api or AppsApi(ctx, transport, rng)
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
        ("GET", "/v1/apps/<app>/routes", api.list_routes),
        ("POST", "/v1/apps/<app>/routes", api.create_route),
        ("DELETE", "/v1/apps/<app>/routes/<route_id>", api.delete_route),
    )
    for method, rule, view in rules:
        bp.add_url_rule(rule, f"{view.__name__}", view, methods=[method])
    bp.add_url_rule("/v1/events", "events", partial(events, ctx.state), methods=["GET"])

    @bp.errorhandler(RecordError)
    async def record_error(exc: RecordError) -> Response:
        return error_response(400, "bad_request", str(exc))

    return bp
