"""What the app API does to the records: plain functions, state and input in, records out.

Theory of operation
-------------------
The handlers (`flynnp2p.api.apps`) decode a request at the edge, forward it to the
leader when it changes something, take the app's lock there and then call one of
these; what comes back is written as one batch. Nothing here reads a request,
the clock or the network: ``now`` and fresh ids are arguments, so each rule is
tested alone (tests/test_api_ops.py) and the git push and deploys can make the
same changes without HTTP.

The rules that live here and nowhere else:

* an app is created with its default route ``<name>.<cluster domain>``;
* a deleted app takes its routes, formation and saved git repository with it, a deleted route its
  certificate (unless another route uses it);
* a route's HTTP domain+path, or its TCP port, belongs to one route; a TCP route
  given no port takes the lowest free one of the cluster's range;
* a release of a slug keeps the app's env, and moves the formation to itself
  (the process types its Procfile lacks are dropped; the first one scales
  ``web=1``); an env change is a new release the formation moves to;
* a formation names only process types its release has, and per-type constraints
  merge into the current ones (``{}`` removes a type's);
* every formation write that names a new release is a deploy: it goes with a
  running `Deployment` (`deployment_changes`; a deploy still running is marked
  failed, replaced), which the leader's deploy watcher finishes;
* a rollback moves the formation to an earlier release (default: the one before
  the current), keeping the counts of the types that release has.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TypeVar

from flynnp2p.build.procfile import process_specs
from flynnp2p.errors import ClusterError, Conflict, NotFound, UserError
from flynnp2p.scheduler.rollout import formation_on
from flynnp2p.scheduler.surge import effective_strategy
from flynnp2p.state.merge import Change, Delete, State
from flynnp2p.state.records import (
    App,
    Artifact,
    BuildCache,
    Certificate,
    ClusterConfig,
    Deployment,
    Formation,
    Release,
    Repo,
    Route,
)

# -- reads ------------------------------------------------------------------


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


_Owned = TypeVar("_Owned", Release, Route)


def of_app(state: State, app: App, cls: type[_Owned], key: str) -> _Owned:
    """The ``cls`` record ``key`` of ``app``; 404 if it is missing or another app's."""
    record = state.record(cls, key)
    if record is None or record.app_id != app.id:
        raise NotFound(f"app {app.name!r} has no {cls.KIND} {key!r}")
    return record


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


def tcp_port_range(state: State) -> tuple[int, int]:
    """The cluster's TCP route ports (recorded by its first leader)."""
    config = state.record(ClusterConfig, "config")
    defaults = ClusterConfig(domain="x", created_at=0)
    if config is None:
        return defaults.tcp_port_min, defaults.tcp_port_max
    return config.tcp_port_min, config.tcp_port_max


def free_tcp_ports(state: State, skip: Collection[int] = ()) -> Iterator[int]:
    """The cluster's TCP route ports no route has (nor `skip`), lowest first."""
    lo, hi = tcp_port_range(state)
    taken = {r.port for r in state.records(Route) if r.type == "tcp"} | set(skip)
    return (p for p in range(lo, hi + 1) if p not in taken)


def describe_route(route: Route) -> str:
    return f"tcp port {route.port}" if route.type == "tcp" else f"http route {route.domain}{route.path}"


# -- apps -------------------------------------------------------------------

_ADJECTIVES = (
    "amber", "autumn", "bold", "brave", "bright", "calm", "crimson", "dawn", "eager", "fancy",
    "gentle", "golden", "happy", "hidden", "icy", "jolly", "lively", "lucky", "misty", "nimble",
    "proud", "quiet", "rapid", "silent", "snowy", "sunny", "swift",
)  # fmt: skip
_NOUNS = (
    "badger", "bay", "brook", "canyon", "cloud", "comet", "creek", "dune", "falcon", "fern",
    "field", "forest", "harbor", "heron", "lake", "meadow", "moon", "otter", "pine", "river",
    "sky", "sparrow", "star", "stone", "wave", "willow",
)  # fmt: skip


def fresh_name(rng: random.Random, taken: Collection[str]) -> str:
    """A generated app name (``adjective-noun-NNNN``) that no app has."""
    for _ in range(100):
        name = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{rng.randrange(1000, 10000)}"
        if name not in taken:
            return name
    raise ClusterError("could not find a free app name; pass one")


# ``api.<domain>`` is the cluster's API through the router, ``git.<domain>`` its git.
RESERVED_NAMES = frozenset({"api", "git"})


def new_app(name: str, meta: Mapping[str, str], domain: str, now: int) -> tuple[App, Route]:
    """An app and its default HTTP route ``<name>.<domain>``."""
    if name in RESERVED_NAMES:
        raise UserError(
            f"name: {name!r} is reserved ({name}.{domain} is the cluster's own); choose another"
        )
    app = App(id=uuid.uuid4().hex, name=name, created_at=now, meta=meta)
    route = Route(
        id=uuid.uuid4().hex, app_id=app.id, type="http", created_at=now, domain=f"{name}.{domain}"
    )
    return app, route


APP_SETTINGS = ("strategy", "deploy_timeout_s", "build_memory_mb", "build_timeout_s")


def patched_app(
    app: App, meta_patch: Mapping[str, str | None], settings: Mapping[str, object] | None = None
) -> App:
    """JSON merge patch of the app's meta (None removes a key), and its settings
    (`APP_SETTINGS`; both checked by the record)."""
    meta = dict(app.meta)
    for key, value in meta_patch.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return dataclasses.replace(app, meta=meta, **(settings or {}))  # type: ignore[arg-type]


def route_deletion(state: State, route: Route, going: Collection[str] = ()) -> list[Change]:
    """The route, and its certificate unless a route that stays uses it too."""
    changes: list[Change] = [Delete(Route.KIND, route.id)]
    cert = route.certificate_id
    if cert is not None and state.record(Certificate, cert) is not None:
        gone = {route.id, *going}
        if not any(r.certificate_id == cert and r.id not in gone for r in state.records(Route)):
            changes.append(Delete(Certificate.KIND, cert))
    return changes


def app_deletion(state: State, app: App) -> list[Change]:
    """The app, its routes (and their certificates) and its formation, in one batch."""
    changes: list[Change] = [Delete(App.KIND, app.id)]
    routes = routes_of(state, app)
    going = {r.id for r in routes}
    seen: set[Change] = set()
    for route in routes:
        for change in route_deletion(state, route, going):
            if change not in seen:
                seen.add(change)
                changes.append(change)
    for kind in (Formation, Repo, BuildCache):  # keyed by the app's id; blobs then collected
        if state.record(kind, app.id) is not None:
            changes.append(Delete(kind.KIND, app.id))
    changes.extend(Delete(Deployment.KIND, d.id) for d in deployments_of(state, app))
    return changes


# -- releases and formations ------------------------------------------------


def slug_release(
    app: App, base: Release | None, formation: Formation | None, number: int, *,
    artifact: Artifact, types: Mapping[str, str], env: Mapping[str, str],
    meta: Mapping[str, str], now: int,
) -> tuple[Release, Formation]:  # fmt: skip
    """Release ``number`` of a slug (its Procfile's `types`), on the env of `base`
    with `env` on top, and the formation moved to it."""
    release = Release(
        id=uuid.uuid4().hex, app_id=app.id, created_at=now, artifacts=(artifact.id,),
        env={**(base.env if base is not None else {}), **env}, processes=process_specs(dict(types)),
        meta=meta, version=number,
    )  # fmt: skip
    # The first release that runs anything (no formation yet, or only env releases
    # before it) with a web type runs web=1.
    if formation is not None and (formation.processes or (base is not None and base.processes)):
        return release, formation_on(formation, release, now)
    counts = {"web": 1} if "web" in types else {}
    if formation is None:
        formation = Formation(app_id=app.id, release_id=release.id, updated_at=now)
    return release, dataclasses.replace(formation, release_id=release.id, updated_at=now, processes=counts)


def env_release(
    app: App, base: Release | None, formation: Formation | None, number: int, *,
    set_: Mapping[str, str], unset: Sequence[str], now: int,
) -> tuple[Release, Formation]:  # fmt: skip
    """Release ``number``: `base` with its env changed, and the formation moved to it."""
    env = {} if base is None else dict(base.env)
    for name in unset:
        env.pop(name, None)
    env.update(set_)
    new_id = uuid.uuid4().hex
    if base is None:
        release = Release(id=new_id, app_id=app.id, created_at=now, env=env, version=number)
    else:
        release = dataclasses.replace(base, id=new_id, created_at=now, env=env, version=number)
    if formation is None:
        return release, Formation(app_id=app.id, release_id=new_id, updated_at=now)
    return release, dataclasses.replace(formation, release_id=new_id, updated_at=now)


def check_env_change(set_: Mapping[str, str], unset: Sequence[str]) -> None:
    if not set_ and not unset:
        raise UserError("body: nothing to change; give 'set': {NAME: value} and/or 'unset': [NAME]")
    both = sorted(set(set_) & set(unset))
    if both:
        raise UserError(f"env: {both[0]!r} is both set and unset")


def new_formation(
    state: State, app: App, counts: Mapping[str, int],
    constraints: Mapping[str, Mapping[str, str]], release_id: str | None, now: int,
) -> Formation:  # fmt: skip
    """The app's formation with `counts` of the release `release_id` (default: the
    current one); every type must be one of the release's."""
    current = state.record(Formation, app.id)
    release: Release | None
    if release_id is not None:
        release = state.record(Release, release_id)
        if release is None or release.app_id != app.id:
            raise UserError(f"formation.release_id: app {app.name!r} has no release {release_id!r}")
    else:
        release = current_release(state, app)
        if release is None:
            raise UserError(
                f"app {app.name!r} has no release yet: create a release first "
                "(git push, or POST /v1/apps/<app>/releases)"
            )
    unknown = sorted(t for t in counts if t not in release.processes)
    if unknown:
        has = ", ".join(sorted(release.processes)) or "none"
        raise UserError(
            f"formation.processes: release {release.id} has no process type "
            f"{unknown[0]!r}; its types: {has}"
        )
    merged = dict(current.constraints) if current is not None else {}
    for ptype, tags in constraints.items():  # {} removes a type's constraints
        if tags:
            merged[ptype] = tags
        else:
            merged.pop(ptype, None)
    return Formation(
        app_id=app.id,
        release_id=release.id,
        updated_at=now,
        processes=counts,
        tags=current.tags if current is not None else {},
        constraints=merged,
    )


# -- deployments and rollback -----------------------------------------------


def deployments_of(state: State, app: App) -> list[Deployment]:
    """The app's deployments, newest first."""
    mine = [d for d in state.records(Deployment) if d.app_id == app.id]
    return sorted(mine, key=lambda d: (d.created_at, d.id), reverse=True)


def deployment_changes(state: State, app: App, moved: Formation, now: int) -> list[Change]:
    """What goes with the formation write `moved`: when it names another release
    than the formation has, a running `Deployment` of it (from the current release,
    with the app's effective strategy), and every deployment of the app still
    running marked failed, replaced by it. Nothing for a formation on the same
    release (a scale)."""
    current = state.record(Formation, app.id)
    old = None if current is None else current.release_id
    if old == moved.release_id:
        return []
    new = Deployment(
        id=uuid.uuid4().hex, app_id=app.id, new_release_id=moved.release_id,
        strategy=effective_strategy(app.strategy, moved.processes), status="running",
        created_at=now, old_release_id=old,
    )  # fmt: skip
    why = f"replaced by deployment {new.id} (release {moved.release_id}) before it finished"
    changes: list[Change] = [
        dataclasses.replace(d, status="failed", finished_at=now, reason=why)
        for d in deployments_of(state, app)
        if d.status == "running"
    ]
    return [*changes, new]


def release_by_ref(state: State, app: App, ref: str | int) -> Release:
    """One of the app's releases by id, by version number, or by "vN"."""
    text = str(ref)
    number = text[1:] if text[:1] in ("v", "V") else text
    if number.isdigit() and len(number) < 10:
        found = next((r for r in releases_of(state, app) if r.version == int(number)), None)
        if found is not None:
            return found
    if isinstance(ref, str):
        release = state.record(Release, ref)
        if release is not None and release.app_id == app.id:
            return release
    raise NotFound(
        f"app {app.name!r} has no release {text!r}; give an id or a version such as v2 "
        "(see 'flynnp2p release')"
    )


def rollback_formation(state: State, app: App, ref: str | int | None, now: int) -> Formation:
    """The app's formation moved back to release `ref`, or by default to the release
    before the current one; 409 when there is none (or the app runs nothing)."""
    formation = state.record(Formation, app.id)
    current = None if formation is None else state.record(Release, formation.release_id)
    if formation is None or current is None:
        raise Conflict(f"app {app.name!r} has no formation to roll back: nothing is deployed")
    if ref is None:
        ordered = releases_of(state, app)
        older = ordered[ordered.index(current) + 1:] if current in ordered else []
        if not older:
            raise Conflict(
                f"app {app.name!r} has no release before v{current.version} ({current.id}) "
                "to roll back to"
            )
        target = older[0]
    else:
        target = release_by_ref(state, app, ref)
    if target.id == current.id:
        raise Conflict(f"app {app.name!r} already runs release v{target.version} ({target.id})")
    return formation_on(formation, target, now)


# -- route updates (`route update ID`) ---------------------------------------------------
#
# A route keeps its identity: its type, and the domain or port it claimed. What a
# route does with the requests it gets can change: stickiness, https_only, the
# path prefix (an HTTP route's claim is its domain+path, so a new path is a new
# claim: the handler claims it before the write and drops the old one after), the
# process type it targets, and its certificate (checked like one given at
# `route add`; the old one goes unless another route uses it).

ROUTE_UPDATABLE = ("sticky", "https_only", "path", "process_type", "cert_pem", "key_pem")
ROUTE_FIXED = ("type", "domain", "port")


def route_update(route: Route, changes: Mapping[str, object], certificate_id: str | None = None) -> Route:
    """`route` with `changes` (a request body's fields) applied and checked as a
    record; `certificate_id`: its new certificate. A field that cannot change is
    refused with a message that says what can."""
    fixed = sorted(k for k in changes if k in ROUTE_FIXED)
    if fixed:
        raise UserError(
            f"body.{fixed[0]}: a route's type, domain and port cannot change (remove the route "
            f"and add another); what can: sticky, https_only, path, process_type, cert_pem+key_pem"
        )
    wanted = {k: v for k, v in changes.items() if k in ROUTE_UPDATABLE and k not in ("cert_pem", "key_pem")}
    if not wanted and certificate_id is None:
        raise UserError(
            "body: nothing to change; give any of sticky, https_only, path, process_type, cert_pem+key_pem"
        )
    current = {f.name: getattr(route, f.name) for f in dataclasses.fields(route)}
    if certificate_id is not None:
        current["certificate_id"] = certificate_id
    return Route.decode_fields("route", {**current, **wanted})


def route_certificate_left(state: State, route: Route, replaced_by: str | None) -> list[Change]:
    """Deleting the certificate `route` stops using, unless another route uses it."""
    old = route.certificate_id
    if old is None or old == replaced_by or state.record(Certificate, old) is None:
        return []
    if any(r.certificate_id == old and r.id != route.id for r in state.records(Route)):
        return []
    return [Delete(Certificate.KIND, old)]
