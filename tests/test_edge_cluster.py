"""Nothing a user sends can crash a node or fork the state: a real 2-node cluster
driven through every write endpoint with arbitrary JSON (Hypothesis), and a
store holding a value written before such values were refused.

Both nodes must stay alive, no answer may be a 5xx, every error must name its
reason, and the two replicas must converge to the same records."""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse
from typing import Any

import httpx
import msgpack
import pytest
import trio
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.harness import AgentProc, Cluster, wait_for
from tests.test_cluster_state import converged, create, get_app

pytestmark = pytest.mark.slow

NASTY = ["\udfff", "\ud800", "\udc00x", "\x00", "a\x00b", "\ufffd", "é", "💥", "", " ", "../..", "%00"]
text = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.one_of(st.characters(), st.sampled_from(["\udfff", "\ud83d", "\x00"])), max_size=12),
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False),
)
FIELDS = [
    "name", "meta", "strategy", "set", "unset", "processes", "release_id", "artifacts",
    "env", "type", "domain", "path", "port", "args", "command", "memory_mb",
    "process_type", "detach", "tags", "sticky", "id",
]  # fmt: skip
leaf = st.one_of(st.none(), st.booleans(), numbers, text)
junk = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), text), inner, max_size=4),
    ),
    max_leaves=12,
)
# Shaped like the real bodies (known fields, string maps), with junk inside, so the
# checks past "unknown field" are reached too.
shaped = st.dictionaries(
    st.sampled_from(FIELDS),
    st.one_of(junk, st.dictionaries(text, st.one_of(text, st.none()), max_size=3),
              st.lists(text, max_size=3)),
    max_size=3,
)  # fmt: skip
bodies = st.one_of(
    shaped.map(lambda b: json.dumps(b).encode()),  # json.dumps escapes lone surrogates
    junk.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"[" * 100_000, b'{"meta": {"k": "\\udfff"}}', b"\xff\xfe{}"]),
)


def to_msgpack(obj: object) -> bytes:
    """As a hostile peer would send it: lone surrogates as invalid UTF-8."""
    try:
        return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogatepass")  # type: ignore[no-any-return]
    except (OverflowError, TypeError, ValueError):  # ints beyond 64 bits
        return b"\xc1"


# A peer's push shaped like the real thing, junk inside (no horizon: a junk
# horizon would rightly make the node reset and refill, which is not this test).
entry_like = st.fixed_dictionaries({
    "kind": st.one_of(st.sampled_from(["app", "route", "formation", "release", "run"]), junk),
    "key": st.one_of(text, junk), "value": junk,
    "hlc": st.one_of(st.lists(numbers, max_size=3), junk),
    "origin": st.one_of(st.sampled_from(["n1/abc", "n2/def"]), text), "seq": numbers,
})  # fmt: skip
peer_bodies = st.one_of(
    st.fixed_dictionaries({
        "v": st.sampled_from([1, 1, 2, None]),
        "delta": st.fixed_dictionaries({
            "entries": st.lists(entry_like, max_size=3), "vv": st.just({}),
            "horizon": st.just({}), "complete": st.one_of(st.booleans(), junk),
        }),
    }).map(to_msgpack),
    st.fixed_dictionaries({"v": st.just(1), "vv": junk, "node": junk}).map(to_msgpack),
    junk.map(to_msgpack),
    st.binary(max_size=40),
)  # fmt: skip
bodies_for = {"/v1/internal/state/push": peer_bodies, "/v1/internal/state/sync": peer_bodies}

ENDPOINTS = [
    ("POST", "/v1/apps"),
    ("PATCH", "/v1/apps/{app}"),
    ("DELETE", "/v1/apps/{app}"),
    ("POST", "/v1/apps/{app}/releases"),
    ("PUT", "/v1/apps/{app}/formation"),
    ("PATCH", "/v1/apps/{app}/env"),
    ("POST", "/v1/apps/{app}/routes"),
    ("DELETE", "/v1/apps/{app}/routes/{id}"),
    ("POST", "/v1/apps/{app}/jobs"),
    ("DELETE", "/v1/apps/{app}/jobs/{id}"),
    ("PUT", "/v1/hosts/{host}/tags"),
    ("POST", "/v1/internal/state/push"),
    ("POST", "/v1/internal/state/sync"),
]
requests = st.sampled_from(ENDPOINTS).flatmap(
    lambda endpoint: st.tuples(
        st.just(endpoint),
        st.one_of(st.sampled_from(["fuzz", "fuzz"]), text),  # the app mostly exists
        st.one_of(st.sampled_from(["n1", "n2"]), text),
        st.integers(0, 1),  # which node is asked
        bodies_for.get(endpoint[1], bodies),
    )
)


def url(template: str, app: str, host: str) -> str:
    quote = lambda s: urllib.parse.quote(s.encode("utf-8", "surrogatepass"), safe="") or "x"  # noqa: E731
    return template.format(app=quote(app), host=quote(host), id=quote(app[::-1]))


def check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    if r.status_code >= 400:
        message = r.json()["error"]["message"]
        assert message.strip(), (what, r.text)


def hammer(agents: list[AgentProc]) -> int:
    """Run the Hypothesis search (synchronously: the agents are other processes)."""
    def client(a: AgentProc, key: str) -> httpx.Client:
        return httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {key}"}, timeout=15.0)

    clients = [client(a, a.token.api_key) for a in agents]
    # /v1/internal/* takes only the nodes' own credential: junk from a "peer".
    peers = [client(a, a.token.peer_key) for a in agents]
    sent = 0

    @settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")),  # more for a longer hunt
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking against a live cluster
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(requests, min_size=1, max_size=4))
    @example([(("PATCH", "/v1/apps/{app}"), "fuzz", "n1", 1, b'{"meta": {"k": "\\udfff"}}')])
    @example([(("PATCH", "/v1/apps/{app}"), "fuzz", "n1", 0, b'{"meta": {"k\\ud800": "v"}}')])
    @example([(("PATCH", "/v1/apps/{app}/env"), "fuzz", "n1", 1, b'{"set": {"K": "\\udfff"}}')])
    @example([(("POST", "/v1/apps/{app}/jobs"), "fuzz", "n1", 0, b'{"args": ["echo", "\\udfff"]}')])
    @example([(("PUT", "/v1/hosts/{host}/tags"), "fuzz", "n2", 0, b'{"tags": {"k": "\\udfff"}}')])
    @example([(("POST", "/v1/apps"), "fuzz", "n1", 0, b'{"name": "x\\u0000y"}')])
    def run(batch: list[tuple[tuple[str, str], str, str, int, bytes]]) -> None:
        nonlocal sent
        check(clients[0].post("/v1/apps", json={"name": "fuzz"}), "create fuzz")  # 201 or 409
        for (method, template), app, host, node, body in batch:
            path = url(template, app, host)
            what = f"{method} {path} {body[:200]!r} on {agents[node].name}"
            try:
                via = peers if path.startswith("/v1/internal/") else clients
                r = via[node].request(
                    method, path, content=body, headers={"Content-Type": "application/json"}
                )
            except httpx.HTTPError as exc:
                raise AssertionError(f"{what}: {exc!r}\n{agents[node].log_tail()}") from None
            sent += 1
            check(r, what)
        for a in agents:
            assert a.running, f"{a.name} exited:\n{a.log_tail()}"

    try:
        run()
    finally:
        for c in clients + peers:
            c.close()
    return sent


async def apps_of(agent: AgentProc) -> list[dict[str, Any]]:
    async with agent.client() as c:
        r = await c.get("/v1/apps")
        assert r.status_code == 200, r.text
        return r.json()["apps"]  # type: ignore[no-any-return]


async def test_arbitrary_input_on_every_write_endpoint_never_crashes_or_forks(
    cluster: Cluster,
) -> None:
    agents = await cluster.start(2)
    await cluster.wait_converged(agents, alive=2)
    sent = await trio.to_thread.run_sync(hammer, agents)  # blocking clients: off the trio thread
    assert sent >= 40
    assert all(a.running for a in agents)
    await converged(agents, timeout=30)
    first, second = [await apps_of(a) for a in agents]
    assert first == second


async def test_a_value_stored_before_surrogates_were_refused_no_longer_blocks_pulls(
    cluster: Cluster,
) -> None:
    """A store written by the old code holds a lone surrogate: its node loads it
    repaired (U+FFFD) and serves it, so its peer can pull again and both agree."""
    a, b = await cluster.start(2)
    await cluster.wait_converged([a, b], alive=2)
    await create(a, "web")
    await wait_for(lambda: get_app(b, "web"), 10, "the app on b")
    a.stop()

    def poison() -> None:
        db = sqlite3.connect(a.data_dir / "state" / "state.sqlite3")
        (origin,) = db.execute("SELECT value FROM meta WHERE name = 'origin'").fetchone()
        (seq,) = db.execute(
            "SELECT coalesce(max(seq), 0) FROM vectors WHERE name = 'vv' AND origin = ?", (origin,)
        ).fetchone()
        (value,) = db.execute("SELECT value FROM entries WHERE kind = 'app'").fetchone()
        wire = json.loads(value)
        wire["meta"] = {"k": "bad\udfff"}
        # As a local write on a would have left it: a's next seq, a newer hlc.
        db.execute(
            "UPDATE entries SET value = ?, origin = ?, seq = ?, wall_ms = wall_ms + 1000 "
            "WHERE kind = 'app'",
            (json.dumps(wire), origin, seq + 1),
        )
        db.execute("INSERT OR REPLACE INTO vectors VALUES ('vv', ?, ?)", (origin, seq + 1))
        db.commit()
        db.close()

    await trio.to_thread.run_sync(poison)
    a.start(peers=[b.gossip])
    await a.wait_ready()
    await converged([a, b], timeout=30)

    async def repaired_on(agent: AgentProc) -> bool:
        app = await get_app(agent, "web")
        return app is not None and app["meta"] == {"k": "bad\ufffd"}

    for agent in (a, b):
        await wait_for(lambda agent=agent: repaired_on(agent), 15, f"the repaired app on {agent.name}")
    assert a.running and b.running
