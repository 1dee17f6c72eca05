"""Records: wire round trips, strict validation, schema versions (pure, synchronous)."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flynnp2p.state.errors import RecordError, SchemaVersionError
from flynnp2p.state.hlc import Hlc
from flynnp2p.state.merge import Delta, Entry
from flynnp2p.state.records import (
    KINDS,
    RECORD_TYPES,
    App,
    Artifact,
    BlobLocation,
    Blocked,
    Certificate,
    ClusterConfig,
    Deployment,
    Formation,
    HealthCheck,
    Job,
    Placement,
    ProcessSpec,
    Record,
    Release,
    Repo,
    Route,
    RunRequest,
    decode_record,
)

DIGEST = "sha256:" + "ab" * 32
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

EXAMPLES: list[Record] = [
    App(id="app-1", name="web-shop", created_at=1, meta={"owner": "ops"}, strategy="one-by-one"),
    Release(
        id="rel-1",
        app_id="app-1",
        created_at=2,
        artifacts=("art-1",),
        env={"DATABASE_URL": "postgres://db/x", "EMPTY": ""},
        processes={
            "web": ProcessSpec(
                command="gunicorn app:app",
                ports=(0,),
                health_check=HealthCheck(type="http", path="/health"),
                memory_mb=256,
            ),
            "logger": ProcessSpec(command="./log-shipper", omni=True),
        },
    ),
    Artifact(id="art-1", type="slug", uri=f"blob:{DIGEST}", digest=DIGEST, size=1024, created_at=3),
    Artifact(id="art-2", type="docker", uri="docker://registry.local/web:1.2", created_at=3),
    Formation(app_id="app-1", release_id="rel-1", updated_at=4, processes={"web": 3}, tags={"zone": "a"}),
    Route(id="rt-1", app_id="app-1", type="http", domain="*.example.com", path="/api", created_at=5),
    Route(id="rt-2", app_id="app-1", type="tcp", port=5432, process_type="db", created_at=5),
    Job(
        id="job-1", app_id="app-1", release_id="rel-1", process_type="web", host="node-1",
        state="up", created_at=6, updated_at=7, address="10.0.0.1:41000", restarts=2,
    ),
    Placement(
        id="job-2", app_id="app-1", release_id="rel-1", process_type="run", host="node-2",
        action="start", epoch=3, created_at=8, args=("rake", "db:migrate"), one_off=True,
        env={"VERBOSE": "1"}, generation=1, reason="placed",
    ),
    RunRequest(
        id="job-2", app_id="app-1", release_id="rel-1", args=("rake", "db:migrate"),
        created_at=8, env={"VERBOSE": "1"}, memory_mb=128,
    ),
    Blocked(
        app_id="app-1", process_type="web", count=2, reasons=("no host with tag disk=ssd",),
        epoch=3, updated_at=9,
    ),
    Certificate(id="cert-1", domains=("example.com",), cert_pem=PEM, key_pem=PEM, created_at=9),
    Repo(app_id="app-1", generation=2, updated_at=11, digest=DIGEST, size=2048, increments=(DIGEST,),
         refs={"refs/heads/main": "ab" * 20}),
    BlobLocation(digest=DIGEST, node="node-1", size=1024, created_at=10),
    ClusterConfig(domain="apps.example.com", created_at=1),
    Deployment(id="dep-1", app_id="app-1", new_release_id="rel-2", strategy="one-by-one",
               status="rolled-back", created_at=12, old_release_id="rel-1", finished_at=13,
               reason="job web-1 exited with code 1", failed_job_id="web-1"),
]  # fmt: skip


def test_examples_cover_every_kind() -> None:
    assert {type(r) for r in EXAMPLES} == set(RECORD_TYPES)
    assert set(KINDS) == {cls.KIND for cls in RECORD_TYPES}


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: f"{r.KIND}:{r.key}")
def test_wire_round_trip_through_json_and_msgpack(record: Record) -> None:
    wire = record.to_wire()
    assert wire["v"] == record.VERSION
    for blob in (json.loads(json.dumps(wire)), msgpack.unpackb(msgpack.packb(wire))):
        back = decode_record(record.KIND, blob)
        assert back == record
        assert hash(back) == hash(record)
        assert back.to_wire() == wire


def test_records_are_immutable_and_normalised() -> None:
    app = App(id="a", name="x", created_at=0, meta={"b": "2", "a": "1"})
    assert list(app.meta) == ["a", "b"]
    with pytest.raises(TypeError):
        app.meta["c"] = "3"  # type: ignore[index]
    spec = ProcessSpec(command="x", ports=[1, 2])  # type: ignore[arg-type]
    assert spec.ports == (1, 2)
    assert Release.from_wire(EXAMPLES[1].to_wire()).processes["web"].health_check == HealthCheck(
        type="http", path="/health"
    )


def test_keys() -> None:
    assert EXAMPLES[4].key == "app-1"  # one formation per app
    assert EXAMPLES[-3].key == f"{DIGEST}@node-1"
    assert EXAMPLES[-2].key == "config"  # one cluster config


def _with(record: Record, **changes: Any) -> dict[str, Any]:
    return {**record.to_wire(), **changes}


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("app", _with(EXAMPLES[0], name="Web_Shop"), "app.name", "lowercase letters"),
    ("app", _with(EXAMPLES[0], name=""), "app.name", "lowercase letters"),
    ("app", _with(EXAMPLES[0], id="bad id"), "app.id", "letters, digits"),
    ("app", _with(EXAMPLES[0], created_at=-1), "app.created_at", "integer from 0"),
    ("app", _with(EXAMPLES[0], created_at=True), "app.created_at", "integer"),
    ("app", _with(EXAMPLES[0], created_at=1.5), "app.created_at", "integer"),
    ("app", _with(EXAMPLES[0], meta={"k": 5}), "app.meta.k", "string"),
    ("app", _with(EXAMPLES[0], meta=["k"]), "app.meta", "a map"),
    ("app", _with(EXAMPLES[0], strategy="yolo"), "app.strategy", "'all-at-once', 'one-by-one'"),
    ("app", _with(EXAMPLES[0], colour="red"), "app", "unknown field(s) ['colour']"),
    ("app", {"v": 1, "id": "a", "name": "x"}, "app.created_at", "missing"),
    ("release", _with(EXAMPLES[1], env={"1BAD": "x"}), "release.env key", "variable name"),
    (
        "release",
        _with(EXAMPLES[1], processes={"web": {"command": "x", "memory_mb": "lots"}}),
        "release.processes.web.memory_mb",
        "integer from 16 to 1048576",
    ),
    (
        "release",
        _with(EXAMPLES[1], processes={"web": {"command": "x", "ports": [70000]}}),
        "release.processes.web.ports[0]",
        "integer from 0 to 65535",
    ),
    (
        "release",
        _with(EXAMPLES[1], processes={"web": {"command": "x", "health_check": {"type": "http"}}}),
        "release.processes.web.health_check.path",
        "required for http",
    ),
    (
        "release",
        _with(EXAMPLES[1], processes={"web": {"command": "x", "typo": 1}}),
        "release.processes.web",
        "unknown field(s) ['typo']",
    ),
    ("artifact", _with(EXAMPLES[2], type="zip"), "artifact.type", "'slug', 'docker'"),
    ("artifact", _with(EXAMPLES[2], digest=None), "artifact.digest", "required for slugs"),
    ("artifact", _with(EXAMPLES[2], digest="md5:abc"), "artifact.digest", "sha256"),
    ("formation", _with(EXAMPLES[4], processes={"web": -1}), "formation.processes.web", "0 to"),
    ("route", _with(EXAMPLES[5], domain=None), "route.domain", "required for http"),
    ("route", _with(EXAMPLES[5], domain="Bad Domain"), "route.domain", "DNS name"),
    ("route", _with(EXAMPLES[5], path="api"), "route.path", "starting with '/'"),
    ("route", _with(EXAMPLES[6], port=None), "route.port", "required for tcp"),
    ("route", _with(EXAMPLES[6], port=0), "route.port", "integer from 1 to 65535"),
    ("route", _with(EXAMPLES[6], domain="x.com"), "route.type", "no domain"),
    ("job", _with(EXAMPLES[7], state="running"), "job.state", "'starting', 'up'"),
    ("job", _with(EXAMPLES[7], address="nowhere"), "job.address", "'host:port'"),
    ("placement", _with(EXAMPLES[8], action="pause"), "placement.action", "'start', 'stop'"),
    ("placement", _with(EXAMPLES[8], args="rake"), "placement.args", "a list"),
    ("certificate", _with(EXAMPLES[11], domains=[]), "certificate.domains", "at least one"),
    ("certificate", _with(EXAMPLES[11], key_pem="secret"), "certificate.key_pem", "PEM"),
    ("blob", _with(EXAMPLES[13], node="no de"), "blob.node", "node name"),
]


@pytest.mark.parametrize(("kind", "wire", "field", "accepted"), BAD, ids=lambda x: str(x)[:40])
def test_validation_names_field_and_what_is_accepted(
    kind: str, wire: dict[str, Any], field: str, accepted: str
) -> None:
    with pytest.raises(RecordError) as info:
        decode_record(kind, wire)
    assert info.value.field == field
    assert accepted in str(info.value)
    assert info.value.http_status == 400


def test_constructor_validates_too() -> None:
    with pytest.raises(RecordError, match=r"app\.name"):
        App(id="a", name="Not Valid", created_at=0)
    with pytest.raises(RecordError, match=r"processspec\.memory_mb"):
        ProcessSpec(command="x", memory_mb=1)


@pytest.mark.parametrize("version", [0, 3, None, "1", True])
def test_unknown_schema_versions_are_rejected(version: object) -> None:
    wire = {**EXAMPLES[0].to_wire(), "v": version}
    with pytest.raises(SchemaVersionError, match=r"app\.v: unknown schema version .*reads \[1, 2\]"):
        App.from_wire(wire)
    del wire["v"]
    with pytest.raises(SchemaVersionError):
        App.from_wire(wire)


def test_unknown_kind_and_non_map() -> None:
    with pytest.raises(RecordError, match="unknown kind 'user'.*accepted: app, artifact"):
        decode_record("user", {})
    with pytest.raises(RecordError, match="expected a map"):
        decode_record("app", [1, 2])


def test_entry_and_delta_wire() -> None:
    e = Entry("app", "app-1", EXAMPLES[0], Hlc(5, 1), "node-1/abc", 7)
    t = Entry("route", "rt-9", None, Hlc(6, 0), "node-2/def", 1)
    delta = Delta((e, t), {"node-1/abc": 7, "node-2/def": 1}, {"node-2/def": 1}, complete=True)
    wire = msgpack.unpackb(msgpack.packb(delta.to_wire()))
    assert Delta.from_wire(wire) == delta
    bad = json.loads(json.dumps(delta.to_wire()))
    bad["entries"][0]["value"]["name"] = "BAD"
    with pytest.raises(RecordError) as info:
        Delta.from_wire(bad)
    assert info.value.field == "delta.entries[0].value.name"
    bad["entries"][0]["value"]["v"] = 9
    with pytest.raises(SchemaVersionError):
        Delta.from_wire(bad)
    wrong_key = e.to_wire() | {"key": "app-2"}
    with pytest.raises(RecordError, match="entry.key"):
        Entry.from_wire(wrong_key)
    for field, value in [("seq", 0), ("hlc", [1]), ("hlc", [-1, 0]), ("origin", "")]:
        with pytest.raises(RecordError, match=f"entry.{field}"):
            Entry.from_wire(e.to_wire() | {field: value})
    with pytest.raises(RecordError, match="delta.vv"):
        Delta.from_wire(delta.to_wire() | {"vv": {"n": -1}})


@given(
    name=st.from_regex(r"[a-z][a-z0-9]{0,10}(-[a-z0-9]{1,5}){0,3}", fullmatch=True),
    meta=st.dictionaries(
        st.from_regex(r"[a-z0-9][a-z0-9_.:/-]{0,10}", fullmatch=True),
        st.text(max_size=20).filter(lambda s: "\x00" not in s),
        max_size=4,
    ),
    created_at=st.integers(0, 2**63 - 1),
)
def test_app_round_trip_property(name: str, meta: dict[str, str], created_at: int) -> None:
    app = App(id="a", name=name, meta=meta, created_at=created_at)
    assert App.from_wire(msgpack.unpackb(msgpack.packb(app.to_wire()))) == app


def test_version_1_jobs_and_placements_still_read() -> None:
    job = {
        "v": 1, "id": "j", "app_id": "a", "release_id": "r", "process_type": "web",
        "host": "n", "state": "up", "created_at": 1, "updated_at": 2,
    }  # fmt: skip
    assert decode_record("job", job) == Job(
        id="j", app_id="a", release_id="r", process_type="web", host="n", state="up",
        created_at=1, updated_at=2,
    )  # fmt: skip
    placement = {
        "v": 1, "id": "j", "app_id": "a", "release_id": "r", "process_type": "web",
        "host": "n", "action": "start", "epoch": 1, "created_at": 1,
    }  # fmt: skip
    assert decode_record("placement", placement).generation == 0


def test_a_deployment_is_finished_exactly_when_it_has_a_finish_time() -> None:
    base = dict(id="d", app_id="a", new_release_id="r", strategy="all-at-once", created_at=1)
    Deployment(**base, status="running")  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="finished_at"):
        Deployment(**base, status="complete")  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="finished_at"):
        Deployment(**base, status="running", finished_at=2)  # type: ignore[arg-type]
