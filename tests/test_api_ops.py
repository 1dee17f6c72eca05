"""The app API's domain operations, called without quart: state and input in, records out."""

from __future__ import annotations

import random

import pytest

from flynnp2p.api import ops
from flynnp2p.errors import ClusterError, NotFound, UserError
from flynnp2p.state.merge import Delete
from flynnp2p.state.records import App, Artifact, Formation, ProcessSpec, Release, Repo, Route
from tests.states import state_of

APP = App(id="a1", name="hello", created_at=1, meta={"owner": "ann"})
OTHER = App(id="a2", name="other", created_at=1)
WEB = ProcessSpec(command="python app.py")
V1 = Release(id="r1", app_id="a1", created_at=10, env={"A": "1", "B": "2"}, processes={"web": WEB}, version=1)
V2 = Release(
    id="r2", app_id="a1", created_at=20, env={"A": "1"},
    processes={"web": WEB, "worker": ProcessSpec(command="w")}, version=2,
)  # fmt: skip
ENV_ONLY = Release(id="r0", app_id="a1", created_at=5, env={"A": "1"}, version=1)  # env set, no push
FORMATION = Formation(
    app_id="a1", release_id="r1", updated_at=10, processes={"web": 2}, constraints={"web": {"disk": "ssd"}}
)
ROUTE = Route(id="t1", app_id="a1", type="http", created_at=1, domain="hello.example.com")
SLUG = Artifact(id="s1", type="slug", uri="blob:sha256:" + "ab" * 32, created_at=30, digest="sha256:" + "ab" * 32)


def test_reads() -> None:
    state = state_of(APP, OTHER, V1, V2, FORMATION, ROUTE)
    assert ops.find_app(state, "hello") == APP and ops.find_app(state, "a1") == APP
    with pytest.raises(NotFound, match="no app named 'nope'"):
        ops.find_app(state, "nope")
    assert ops.releases_of(state, APP) == [V2, V1]
    assert ops.current_release(state, APP) == V1  # the formation's, not the newest
    assert ops.current_release(state_of(APP, V1, V2), APP) == V2
    assert ops.current_release(state_of(APP), APP) is None
    assert ops.of_app(state, APP, Route, "t1") == ROUTE
    with pytest.raises(NotFound, match="app 'other' has no route 't1'"):
        ops.of_app(state, OTHER, Route, "t1")


@pytest.mark.parametrize(
    ("route", "clash"),
    [
        (Route(id="t2", app_id="a2", type="http", created_at=1, domain="hello.example.com"),
         "http route hello.example.com is taken by app 'hello' (route t1)"),
        (Route(id="t2", app_id="a2", type="http", created_at=1, domain="hello.example.com", path="/api"), None),
        (Route(id="t1", app_id="a1", type="http", created_at=1, domain="hello.example.com"), None),  # itself
        (Route(id="t3", app_id="a2", type="tcp", created_at=1, port=3001),
         "tcp port 3001 is taken by app 'hello' (route t4)"),
        (Route(id="t3", app_id="a2", type="tcp", created_at=1, port=3002), None),
    ],
)  # fmt: skip
def test_route_clash(route: Route, clash: str | None) -> None:
    tcp = Route(id="t4", app_id="a1", type="tcp", created_at=1, port=3001)
    assert ops.route_clash(state_of(APP, OTHER, ROUTE, tcp), route) == clash


def test_new_app_has_its_default_route_and_a_fresh_name_is_free() -> None:
    app, route = ops.new_app("hello", {"k": "v"}, "example.com", 5)
    assert (app.name, app.meta, app.created_at) == ("hello", {"k": "v"}, 5)
    assert (route.app_id, route.type, route.domain, route.path) == (app.id, "http", "hello.example.com", "/")
    rng = random.Random(1)
    name = ops.fresh_name(rng, set())
    assert ops.fresh_name(random.Random(1), {"x"}) == name
    assert ops.fresh_name(random.Random(1), {name}) != name
    with pytest.raises(ClusterError, match="free app name"):
        ops.fresh_name(_Same(), {"amber-badger-1000"})


class _Same(random.Random):
    def choice(self, seq):  # type: ignore[no-untyped-def,override]
        return seq[0]

    def randrange(self, *_args: int) -> int:  # type: ignore[override]
        return 1000


@pytest.mark.parametrize(
    ("patch", "strategy", "meta"),
    [({"team": "x"}, "all-at-once", {"owner": "ann", "team": "x"}),
     ({"owner": None}, "one-by-one", {}),
     ({"nothing": None}, "all-at-once", {"owner": "ann"})],
)  # fmt: skip
def test_patched_app(patch: dict[str, str | None], strategy: str, meta: dict[str, str]) -> None:
    updated = ops.patched_app(APP, patch, {"strategy": strategy})
    assert (updated.id, updated.meta, updated.strategy) == ("a1", meta, strategy)


def test_app_deletion_takes_routes_and_formation() -> None:
    assert ops.app_deletion(state_of(APP, OTHER, FORMATION, ROUTE), APP) == [
        Delete("app", "a1"), Delete("route", "t1"), Delete("formation", "a1")
    ]
    assert ops.app_deletion(state_of(APP), APP) == [Delete("app", "a1")]
    repo = Repo(app_id="a1", generation=3, updated_at=5)
    assert Delete("repo", "a1") in ops.app_deletion(state_of(APP, repo), APP)  # its bundles go too


@pytest.mark.parametrize(
    ("formation", "types", "counts"),
    [(None, {"web": "gunicorn"}, {"web": 1}),  # the first release of a web app runs one
     (None, {"worker": "w"}, {}),
     (FORMATION, {"web": "gunicorn"}, {"web": 2}),  # a deploy keeps the scale
     (FORMATION, {"worker": "w"}, {}),  # a type the Procfile dropped goes
     # env set before the first push: the formation runs nothing yet, web=1 still
     (Formation(app_id="a1", release_id="r0", updated_at=5), {"web": "gunicorn"}, {"web": 1})],
)  # fmt: skip
def test_slug_release(formation: Formation | None, types: dict[str, str], counts: dict[str, int]) -> None:
    base = V1 if formation is None or formation.processes else ENV_ONLY
    release, moved = ops.slug_release(
        APP, base, formation, 3, artifact=SLUG, types=types, env={"B": "9", "C": "3"}, meta={}, now=40
    )
    assert release.env == {"A": "1", "B": "9", "C": "3"}  # the app's env carries over
    assert (release.version, release.artifacts, set(release.processes)) == (3, ("s1",), set(types))
    assert (moved.release_id, moved.processes, moved.updated_at) == (release.id, counts, 40)
    if formation is not None:
        assert moved.constraints == formation.constraints


@pytest.mark.parametrize(
    ("base", "formation", "env"),
    [(None, None, {"C": "3"}), (V1, FORMATION, {"A": "1", "C": "3"})],
)
def test_env_release(base: Release | None, formation: Formation | None, env: dict[str, str]) -> None:
    release, moved = ops.env_release(APP, base, formation, 7, set_={"C": "3"}, unset=["B"], now=50)
    assert (release.env, release.version, release.created_at) == (env, 7, 50)
    assert release.id != (base.id if base else None)
    if base is not None:
        assert release.processes == base.processes
    assert moved.release_id == release.id
    assert moved.processes == (formation.processes if formation else {})


@pytest.mark.parametrize(
    ("set_", "unset", "message"),
    [({}, [], "nothing to change"), ({"A": "1"}, ["A"], "'A' is both set and unset")],
)
def test_check_env_change(set_: dict[str, str], unset: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        ops.check_env_change(set_, unset)
    ops.check_env_change({"A": "1"}, ["B"])


@pytest.mark.parametrize(
    ("counts", "constraints", "release_id", "result"),
    [({"web": 3}, {}, None, ("r1", {"web": 3}, {"web": {"disk": "ssd"}})),
     ({"worker": 1}, {}, "r2", ("r2", {"worker": 1}, {"web": {"disk": "ssd"}})),
     ({"web": 1}, {"web": {}}, None, ("r1", {"web": 1}, {})),  # {} removes a type's constraints
     ({"web": 1}, {"worker": {"zone": "a"}}, None,
      ("r1", {"web": 1}, {"web": {"disk": "ssd"}, "worker": {"zone": "a"}})),
     ({"worker": 1}, {}, None, "release r1 has no process type 'worker'; its types: web"),
     ({"web": 1}, {}, "r9", "app 'hello' has no release 'r9'")],
)  # fmt: skip
def test_new_formation(
    counts: dict[str, int], constraints: dict[str, dict[str, str]], release_id: str | None,
    result: tuple[str, dict[str, int], dict[str, dict[str, str]]] | str,
) -> None:  # fmt: skip
    state = state_of(APP, V1, V2, FORMATION)
    if isinstance(result, str):
        with pytest.raises(UserError, match=result):
            ops.new_formation(state, APP, counts, constraints, release_id, 60)
        return
    made = ops.new_formation(state, APP, counts, constraints, release_id, 60)
    assert (made.release_id, made.processes, made.constraints, made.updated_at) == (*result, 60)


def test_a_formation_needs_a_release() -> None:
    with pytest.raises(UserError, match="has no release yet"):
        ops.new_formation(state_of(APP), APP, {"web": 1}, {}, None, 1)


@pytest.mark.parametrize("name", sorted(ops.RESERVED_NAMES))
def test_reserved_names(name: str) -> None:
    with pytest.raises(UserError, match=f"'{name}' is reserved"):
        ops.new_app(name, {}, "example.com", 1)
