"""The job commands of the CLI (flynnp2p/cli/jobs.py, and scale's wait and release add).

Three layers: the pure parsing, formatting and scale-decision functions, table-driven;
``run``/``log``/``scale`` driven against an `httpx.MockTransport` that scripts the
API's streams (breaks, Ctrl-C, exit events); and the commands against the real API
served on 127.0.0.1 (apps, jobs, blobs and logs blueprints over a `StateService`),
where no scheduler or agent runs, so records a host or the leader would write are
written by the test.
"""

from __future__ import annotations

import gzip
import io
import json
import queue
import random
import tarfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import flynnp2p.cli.jobs as jobs
import flynnp2p.cli.scale as scale_wait
from flynnp2p.api.app import create_app
from flynnp2p.api.apps import AppsApi, apps_blueprint
from flynnp2p.api.blobs import blobs_blueprint
from flynnp2p.api.jobs import jobs_blueprint
from flynnp2p.api.logs import LogFanout, internal_log_blueprint, logs_blueprint
from flynnp2p.api.server import ApiServer
from flynnp2p.build.blobs import BlobService
from flynnp2p.build.blobstore import BlobStore
from flynnp2p.cli.apps import process_counts, scale_items
from flynnp2p.cli.client import ApiClient
from flynnp2p.cli.common import blocked_text, env_pairs, reason_text, short_job
from flynnp2p.cli.jobs import (
    RunFollower,
    age,
    exit_status,
    host_rows,
    log_line,
    ps_text,
    tag_changes,
)
from flynnp2p.cli.main import build_parser, main
from flynnp2p.cli.scale import (
    ScaleProgress,
    job_changes,
    scale_progress,
    scale_verdict,
    wait_for_formation,
)
from flynnp2p.errors import ClusterError, UserError
from flynnp2p.host.loghub import LogHub
from flynnp2p.peering import Peer
from flynnp2p.state.records import Blocked, Job, Placement, Record
from flynnp2p.state.service import StateService
from tests import test_cli_apps
from tests.test_api_apps import TOKEN, Clock, Ctx, Node, start_service

# The CLI-runner fixture of the app commands' tests; it runs against *our* `server_url`
# (below), whose API has the jobs, logs and blobs endpoints too.
cli = test_cli_apps.cli

NOW = 1_800_000_000_000


def job(
    id: str, state: str, *, type: str = "web", release: str = "r2", host: str = "n1", **extra: Any
) -> dict[str, Any]:
    return {
        "id": id, "app_id": "a1", "release_id": release, "process_type": type, "host": host,
        "state": state, "created_at": NOW - 5000, "updated_at": NOW, "one_off": False,
        "restarts": 0, "reason": None, "address": None, "exit_code": None, **extra,
    }  # fmt: skip


def blocked(type: str = "web", count: int = 2, *reasons: str, job_id: str | None = None) -> dict[str, Any]:
    return {
        "app_id": "a1", "process_type": type, "count": count, "epoch": 1, "updated_at": NOW,
        "reasons": list(reasons or ("no host with tag disk=ssd",)), "job_id": job_id,
    }  # fmt: skip


# -- parsing ------------------------------------------------------------------------


def test_env_pairs_split_at_the_first_equals_sign() -> None:
    assert env_pairs(["A=1", "B=x=y", "EMPTY="]) == {"A": "1", "B": "x=y", "EMPTY": ""}
    for bad in ("NOEQUALS", "1A=2", "=v", "A-B=1"):
        with pytest.raises(UserError, match="NAME=VALUE"):
            env_pairs([bad])


def test_process_counts() -> None:
    assert process_counts(["web=2", "worker=0", "my-type=10"]) == {"web": 2, "worker": 0, "my-type": 10}
    for bad in ("web", "web=-1", "web=x", "=3", "bad type=1"):
        with pytest.raises(UserError, match="TYPE=COUNT"):
            process_counts([bad])


def test_scale_items_with_tag_constraints() -> None:
    assert scale_items(["web=3,disk=ssd,zone=a", "worker=1", "db=1,"]) == {
        "web": (3, {"disk": "ssd", "zone": "a"}),
        "worker": (1, None),
        "db": (1, {}),
    }
    for bad in ("web=3,disk", "web=3,Disk=x", "web=3,=x"):
        with pytest.raises(UserError, match="TAG=VALUE"):
            scale_items([bad])


def test_tag_changes_set_and_remove() -> None:
    assert tag_changes(["disk=ssd", "zone=", "gpu-", "disk-type=nvme"]) == {
        "disk": "ssd", "zone": "", "gpu": None, "disk-type": "nvme",
    }  # fmt: skip
    for bad in ("disk", "-", "=ssd"):
        with pytest.raises(UserError, match="KEY=VALUE to set a tag or KEY- to remove"):
            tag_changes([bad])


def test_run_takes_its_command_after_the_options() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "-a", "shop", "-e", "A=1", "-e", "B=2", "--memory", "64",
                              "--", "python", "-c", "print(1)", "--", "-d"])  # fmt: skip
    assert args.app == "shop" and args.env == ["A=1", "B=2"] and args.memory == 64
    assert args.command == ["--", "python", "-c", "print(1)", "--", "-d"]  # cmd_run drops the first --
    args = parser.parse_args(["run", "-a", "shop", "-d", "ls", "-l"])
    assert args.detach and args.command == ["ls", "-l"]
    args = parser.parse_args(["host", "tag", "n2", "disk=ssd", "gpu-"])
    assert args.name == "n2" and args.tags == ["disk=ssd", "gpu-"]


# -- formatting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ago_ms", "shown"),
    [
        (0, "0s"), (999, "0s"), (12_400, "12s"), (59_999, "59s"), (60_000, "1m"),
        (3 * 60_000 + 5_000, "3m"), (3_599_999, "59m"), (3_600_000, "1h"), (2 * 3_600_000 + 1, "2h"),
        (86_400_000, "1d"), (3 * 86_400_000, "3d"), (-5_000, "0s"),  # a skewed clock
    ],
)  # fmt: skip
def test_age(ago_ms: int, shown: str) -> None:
    assert age(NOW - ago_ms, NOW) == shown


def test_short_job() -> None:
    assert short_job("web-3f2a9c0e11aa") == "web-3f2a"
    assert short_job("web-3f2a9c0e11aa", "…") == "web-3f2a…"
    assert short_job("my-worker-abcdef12") == "my-worker-abcd"
    assert short_job("run-0123456789abcdef") == "run-0123"
    assert short_job("web-ab", "…") == "web-ab" and short_job("plain", "…") == "plain"


def test_reason_only_for_crashed_down_and_stopping_jobs() -> None:
    assert reason_text(job("w-1", "crashed", reason="exited", exit_code=1, restarts=3)) == (
        "exited; exit 1; 3 restarts"
    )
    assert reason_text(job("w-1", "down", reason="killed by a user")) == "killed by a user"
    assert reason_text(job("w-1", "stopping")) == ""
    assert reason_text(job("w-1", "up", reason="stale", exit_code=0)) == ""


def test_ps_text_has_a_reason_column_only_when_a_job_has_a_reason() -> None:
    body = {
        "jobs": [
            job("web-aaaa1111", "up", release="0123456789abcdef", created_at=NOW - 12_000),
            job("web-bbbb2222", "crashed", host="n2", reason="health check failed", exit_code=1,
                created_at=NOW - 3 * 3_600_000),
        ],
        "blocked": [blocked("web", 2), blocked("agent", 0, "no host fits", "n3: tag os=linux"),
                    blocked("run", 1, "no memory", job_id="run-42")],
    }  # fmt: skip
    assert ps_text(body, NOW).splitlines() == [
        "ID            TYPE  STATE    HOST  RELEASE   AGE  REASON",
        "web-aaaa1111  web   up       n1    01234567  12s",
        "web-bbbb2222  web   crashed  n2    r2        3h   health check failed; exit 1",
        "blocked: 2 x web: no host with tag disk=ssd",
        "blocked: omni agent runs nowhere: no host fits; n3: tag os=linux",
        "blocked: run-42: no memory",
    ]
    plain = {"jobs": [job("web-aaaa1111", "starting", created_at=NOW - 61_000)], "blocked": []}
    assert ps_text(plain, NOW).splitlines() == [
        "ID            TYPE  STATE     HOST  RELEASE  AGE",
        "web-aaaa1111  web   starting  n1    r2       1m",
    ]
    assert ps_text({"jobs": [], "blocked": []}, NOW) == "no jobs"


def test_log_line() -> None:
    ts = int(datetime(2026, 11, 26, 1, 2, 3, 456_000, tzinfo=UTC).timestamp() * 1000)
    item = {"ts_ms": ts, "node": "n2", "job_id": "web-3f2a9c0e", "type": "web", "stream": "stdout",
            "text": "GET / 200"}  # fmt: skip
    assert log_line(item) == "2026-11-26T01:02:03.456Z web-3f2a[n2]: GET / 200"
    assert log_line(item, raw=True) == "GET / 200"
    assert log_line({**item, "ts_ms": ts - 456}) == "2026-11-26T01:02:03.000Z web-3f2a[n2]: GET / 200"


def test_host_rows() -> None:
    hosts = [
        {"name": "n1", "addr": "127.0.0.1", "status": "alive", "leader": True, "jobs": 3,
         "tags": {"zone": "a", "disk": "ssd"}},
        {"name": "n2", "addr": "127.0.0.2", "status": "failed", "leader": False, "jobs": 0, "tags": {}},
    ]  # fmt: skip
    assert host_rows(hosts) == [
        ("n1", "127.0.0.1", "alive", "*", "3", "disk=ssd,zone=a"),
        ("n2", "127.0.0.2", "failed", "", "0", "-"),
    ]


def test_job_changes() -> None:
    first = [job("web-aaaa1111", "up", address="127.0.0.1:20001"), job("web-bbbb2222", "pending", host="n2")]
    # The first look shows what is in progress, not what was already running.
    assert job_changes(None, first) == ["web-bbbb… pending on n2"]
    before = {j["id"]: j for j in first}
    later = [
        job("web-bbbb2222", "up", host="n2", address="127.0.0.3:20412"),
        job("web-cccc3333", "crashed", reason="exited", exit_code=2),
    ]
    assert job_changes(before, later) == [
        "web-bbbb… up on n2 at 127.0.0.3:20412",
        "web-cccc… crashed on n1: exited; exit 2",
        "web-aaaa… down",
    ]
    assert job_changes({j["id"]: j for j in later}, later) == []
    stopping = [job("web-bbbb2222", "stopping", host="n2", address="127.0.0.3:20412")]
    assert job_changes({j["id"]: j for j in later[:1]}, stopping) == ["web-bbbb… stopping"]


# -- scale: the decision --------------------------------------------------------------


FORMATION = {"release_id": "r2", "processes": {"web": 2, "worker": 1}}


@pytest.mark.parametrize(
    ("jobs_", "blocked_", "missing", "settling"),
    [
        pytest.param(
            [job("w1", "up"), job("w2", "up"), job("k1", "up", type="worker")], [], (), False,
            id="exactly-the-formation",
        ),
        pytest.param(
            [job("w1", "up"), job("w2", "starting"), job("k1", "pending", type="worker")], [],
            ("web: 1 of 2 up, 1 starting", "worker: 0 of 1 up, 1 pending"), True,
            id="in-progress",
        ),
        pytest.param(
            [job("w1", "up"), job("w2", "up"), job("w0", "up", release="r1"), job("k1", "up", type="worker")],
            [], ("web: 2 of 2 up, 1 of older releases",), False,
            id="an-old-release-job-still-up",
        ),
        pytest.param(
            [job("w1", "up"), job("w2", "up"), job("w3", "up"), job("k1", "up", type="worker")], [],
            ("web: 3 of 2 up, 1 too many",), False,
            id="surplus",
        ),
        pytest.param(
            [job("w1", "up"), job("w2", "up"), job("w3", "stopping"), job("k1", "up", type="worker")], [],
            ("web: 2 of 2 up, 1 stopping",), True,
            id="a-stopping-job",
        ),
        pytest.param(
            [job("w1", "up"), job("w2", "crashed"), job("k1", "up", type="worker")], [],
            ("web: 1 of 2 up, 1 crashed",), False,
            id="crashed",
        ),
        pytest.param(
            [job("w1", "up"), job("w2", "up"), job("k1", "up", type="worker"), job("c1", "up", type="clock", release="r1")],
            [], ("clock: 0 of 0 up, 1 of older releases",), False,
            id="a-type-no-longer-in-the-formation",
        ),
        pytest.param(
            [job("w1", "up"), job("w2", "up"), job("k1", "up", type="worker"),
             job("run-1", "up", type="run", one_off=True), job("w0", "down")],
            [blocked("run", 1, "no memory", job_id="run-2")], (), False,
            id="one-offs-and-finished-jobs-do-not-count",
        ),
        pytest.param(
            [job("w1", "up"), job("k1", "up", type="worker")], [blocked("web", 1)],
            ("web: 1 of 2 up",), False,
            id="blocked",
        ),
    ],
)  # fmt: skip
def test_scale_progress(
    jobs_: list[dict[str, Any]], blocked_: list[dict[str, Any]], missing: tuple[str, ...], settling: bool
) -> None:
    progress = scale_progress(FORMATION, {"jobs": jobs_, "blocked": blocked_})
    assert progress.missing == missing
    assert progress.done == (not missing)
    assert progress.settling == settling
    assert progress.blocked == tuple(blocked_text(b) for b in blocked_ if not b["job_id"])


def test_scale_progress_of_an_empty_formation() -> None:
    empty = {"release_id": "r2", "processes": {}}
    assert scale_progress(empty, {"jobs": [], "blocked": []}).done
    assert scale_progress(empty, {"jobs": [job("w1", "up")], "blocked": []}).missing == (
        "web: 1 of 0 up, 1 too many",
    )


WAITING = ScaleProgress(("web: 1 of 2 up, 1 pending",), (), True)
BLOCKED_SETTLING = ScaleProgress(("web: 1 of 3 up, 1 pending",), ("1 x web: full",), True)
BLOCKED_STILL = ScaleProgress(("web: 2 of 3 up",), ("1 x web: full",), False)


@pytest.mark.parametrize(
    ("progress", "elapsed", "verdict"),
    [
        (ScaleProgress((), (), False), 0.0, "done"),
        (ScaleProgress((), ("1 x web: stale",), False), 0.0, "done"),
        (WAITING, 0.5, "wait"),
        (WAITING, 10.0, "timeout"),
        (BLOCKED_STILL, 0.5, "wait"),  # may predate the formation: the leader has not looked yet
        (BLOCKED_STILL, scale_wait.BLOCKED_SETTLE_S, "blocked"),  # nothing in flight: no point waiting
        (BLOCKED_SETTLING, 5.0, "wait"),
        (BLOCKED_SETTLING, 10.0, "blocked"),
    ],
)
def test_scale_verdict(progress: ScaleProgress, elapsed: float, verdict: str) -> None:
    assert scale_verdict(progress, elapsed, timeout_s=10.0) == verdict


class ScriptedJobs:
    """A client whose job list follows a script, one body per poll (the last repeats);
    its clock advances by the poll interval per poll."""

    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.bodies = bodies
        self.polls = 0
        self.now = 100.0

    def get(self, path: str) -> dict[str, Any]:
        assert path == "/v1/apps/shop/jobs"
        body = self.bodies[min(self.polls, len(self.bodies) - 1)]
        self.polls += 1
        return body

    def sleep(self, s: float) -> None:
        self.now += s


def _wait(script: ScriptedJobs, formation: Mapping[str, Any] = FORMATION, timeout: float = 5.0,
          as_json: bool = False) -> int:  # fmt: skip
    return wait_for_formation(
        script, "/v1/apps/shop/jobs", formation, started=100.0, timeout_s=timeout,  # type: ignore[arg-type]
        as_json=as_json, clock=lambda: script.now, sleep=script.sleep,
    )  # fmt: skip


def test_wait_prints_changes_until_the_formation_runs(capsys: pytest.CaptureFixture[str]) -> None:
    old = job("web-0000aaaa", "up", release="r1", address="127.0.0.1:20001")
    script = ScriptedJobs([
        {"jobs": [old], "blocked": []},
        {"jobs": [old, job("web-1111bbbb", "pending", host="n2"), job("web-2222cccc", "pending"),
                  job("worker-3333dddd", "starting", type="worker")], "blocked": []},
        {"jobs": [old, job("web-1111bbbb", "up", host="n2", address="127.0.0.3:20412"),
                  job("web-2222cccc", "up", address="127.0.0.1:20002"),
                  job("worker-3333dddd", "up", type="worker")], "blocked": []},
        {"jobs": [{**old, "state": "stopping"}, job("web-1111bbbb", "up", host="n2", address="127.0.0.3:20412"),
                  job("web-2222cccc", "up", address="127.0.0.1:20002"),
                  job("worker-3333dddd", "up", type="worker")], "blocked": []},
        {"jobs": [job("web-1111bbbb", "up", host="n2", address="127.0.0.3:20412"),
                  job("web-2222cccc", "up", address="127.0.0.1:20002"),
                  job("worker-3333dddd", "up", type="worker")], "blocked": []},
    ])  # fmt: skip
    assert _wait(script) == 0
    assert capsys.readouterr().out.splitlines() == [
        "web-1111… pending on n2",
        "web-2222… pending on n1",
        "worker-3333… starting on n1",
        "web-1111… up on n2 at 127.0.0.3:20412",
        "web-2222… up on n1 at 127.0.0.1:20002",
        "worker-3333… up on n1",
        "web-0000… stopping",
        "web-0000… down",
        "scale completed in 0.40s",
    ]
    assert script.polls == 5


def test_wait_with_json_prints_the_final_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    body = {"jobs": [job("w1", "up"), job("w2", "up"), job("k1", "up", type="worker")], "blocked": []}
    assert _wait(ScriptedJobs([body]), as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == body


def test_wait_stops_on_a_block_once_nothing_is_in_flight(capsys: pytest.CaptureFixture[str]) -> None:
    body = {"jobs": [job("w1", "up"), job("k1", "up", type="worker")],
            "blocked": [blocked("web", 1, "n1: needs tag disk=ssd", "n2: 10 MB free, needs 512")]}  # fmt: skip
    script = ScriptedJobs([body])
    with pytest.raises(ClusterError) as err:
        _wait(script, timeout=60.0)
    assert err.value.message == (
        "scale blocked: 1 x web: n1: needs tag disk=ssd; n2: 10 MB free, needs 512"
    )
    # Not the whole timeout: the first poll at or past the settling time.
    assert scale_wait.BLOCKED_SETTLE_S <= script.now - 100.0 < scale_wait.BLOCKED_SETTLE_S + 1.5 * scale_wait.POLL_S
    out = capsys.readouterr().out.splitlines()
    assert out == ["blocked: 1 x web: n1: needs tag disk=ssd; n2: 10 MB free, needs 512"]


def test_wait_times_out_saying_what_is_missing() -> None:
    script = ScriptedJobs([{"jobs": [job("w1", "up"), job("w2", "starting")], "blocked": []}])
    with pytest.raises(ClusterError) as err:
        _wait(script, timeout=1.5)
    assert err.value.message == (
        "scale did not complete in 1.5s: web: 1 of 2 up, 1 starting; worker: 0 of 1 up"
    )
    assert 1.5 <= script.now - 100.0 < 1.5 + 1.5 * scale_wait.POLL_S


# -- run and log over a scripted transport ------------------------------------------


def test_run_follower_skips_what_a_reconnect_replays() -> None:
    f = RunFollower()
    assert f.feed({"text": "one", "stream": "stdout"}) == ("stdout", "one")
    assert f.feed({"text": "two", "stream": "stderr"}) == ("stderr", "two")
    assert f.feed({"event": "blocked", "reasons": ["no memory"]}) == ("stderr", "run: blocked: no memory")
    f.reconnected()
    assert f.feed({"text": "one", "stream": "stdout"}) is None
    assert f.feed({"text": "two", "stream": "stderr"}) is None
    assert f.feed({"event": "blocked", "reasons": ["no memory"]}) is None  # told already
    assert f.feed({"text": "three", "stream": "stdout"}) == ("stdout", "three")
    assert f.feed({"event": "heartbeat"}) is None and f.exit is None
    f.feed({"event": "exit", "state": "down", "exit_code": 0, "reason": None})
    assert f.exit is not None and f.shown == 3


@pytest.mark.parametrize(
    ("event", "code", "message"),
    [
        ({"state": "down", "exit_code": 0}, 0, None),
        ({"state": "crashed", "exit_code": 3}, 3, None),
        ({"state": "crashed", "exit_code": -9}, 137, None),
        ({"state": "crashed", "exit_code": None, "reason": "out of memory"}, 1, "run: out of memory"),
        ({"state": "down", "exit_code": None, "reason": None}, 1, "run: the job ended down"),
    ],
)
def test_exit_status(event: dict[str, Any], code: int, message: str | None) -> None:
    assert exit_status(event) == (code, message)


def ndjson(*items: Mapping[str, Any], then: BaseException | None = None) -> Iterator[bytes]:
    for item in items:
        yield json.dumps(item).encode() + b"\n"
    if then is not None:
        raise then


@dataclass
class FakeApi:
    """The API as a script: one handler per request, in order."""

    script: list[Callable[[httpx.Request], httpx.Response]]
    seen: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        assert self.script, f"unexpected request {request.method} {request.url}"
        return self.script.pop(0)(request)

    def client(self) -> ApiClient:
        client = ApiClient("http://node.test:7100", TOKEN.encode())
        client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(self))
        return client


@pytest.fixture
def fake_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str, FakeApi]]:
    monkeypatch.setattr(jobs, "RECONNECT_PAUSE_S", 0.0)

    def run(script: list[Callable[[httpx.Request], httpx.Response]], *argv: str) -> tuple[int, str, str, FakeApi]:
        api = FakeApi(script)
        monkeypatch.setattr(jobs, "client_for", lambda args: api.client())
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err, api

    return run


def answer(status: int, body: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda r: httpx.Response(status, json=body)


def stream(*items: Mapping[str, Any], then: BaseException | None = None) -> Callable[[httpx.Request], httpx.Response]:
    return lambda r: httpx.Response(200, content=ndjson(*items, then=then))


def out_line(text: str, stream: str = "stdout") -> dict[str, Any]:
    return {"ts_ms": NOW, "node": "n2", "job_id": "run-0123456789abcdef", "type": "run",
            "stream": stream, "text": text}  # fmt: skip


def test_run_streams_the_output_reconnects_and_exits_with_the_jobs_code(fake_cli: Any) -> None:
    code, out, err, api = fake_cli([
        answer(201, {"job_id": "run-0123456789abcdef", "release_id": "r2", "replicas": 1}),
        stream(out_line("one"), out_line("oops", "stderr"), then=httpx.RemoteProtocolError("peer closed")),
        stream(out_line("one"), out_line("oops", "stderr"), {"event": "blocked", "reasons": ["no memory"]},
               out_line("two")),  # ends without an exit event: reconnect again
        stream(out_line("one"), out_line("oops", "stderr"), out_line("two"), out_line("three"),
               {"event": "exit", "job_id": "run-0123456789abcdef", "state": "crashed", "exit_code": 3,
                "reason": None}),
    ], "run", "-a", "shop", "-e", "A=1", "--memory", "64", "--", "python", "-c", "print(1)")  # fmt: skip
    assert code == 3
    assert out == "one\ntwo\nthree\n"
    assert err == "oops\nrun: blocked: no memory\n"
    post = api.seen[0]
    assert post.method == "POST" and post.url.path == "/v1/apps/shop/jobs"
    assert json.loads(post.content) == {"args": ["python", "-c", "print(1)"], "env": {"A": "1"}, "memory_mb": 64}
    log = api.seen[1]
    assert log.url.path == "/v1/apps/shop/log"
    assert dict(log.url.params) == {"job": "run-0123456789abcdef", "until_exit": "1", "n": "10000"}


def test_run_ctrl_c_kills_the_job(fake_cli: Any) -> None:
    code, out, err, api = fake_cli([
        answer(201, {"job_id": "run-0123456789abcdef", "release_id": "r2", "replicas": 1}),
        stream(out_line("working"), then=KeyboardInterrupt()),
        answer(200, {"job_id": "run-0123456789abcdef", "state": "stopping", "replicas": 1}),
    ], "run", "-a", "shop", "--", "sleep", "100")  # fmt: skip
    assert code == 130 and out == "working\n"
    assert err == "run: stopped job run-0123456789abcdef\n"
    assert api.seen[-1].method == "DELETE" and api.seen[-1].url.path == "/v1/apps/shop/jobs/run-0123456789abcdef"


def test_run_says_why_a_job_without_exit_code_ended(fake_cli: Any) -> None:
    code, _, err, _ = fake_cli([
        answer(201, {"job_id": "run-1", "release_id": "r2", "replicas": 1}),
        stream({"event": "exit", "job_id": "run-1", "state": "crashed", "exit_code": None,
                "reason": "killed: out of memory (64 MB)"}),
    ], "run", "-a", "shop", "--", "big")  # fmt: skip
    assert code == 1 and err == "run: killed: out of memory (64 MB)\n"


def test_run_usage_errors(fake_cli: Any) -> None:
    code, _, err, _ = fake_cli([], "run", "-a", "shop", "--")
    assert code == 2 and "give a command" in err
    code, _, err, _ = fake_cli([], "run", "-a", "shop", "--json", "--", "ls")
    assert code == 2 and "--json goes with -d" in err
    code, _, err, _ = fake_cli([], "run", "-a", "shop", "-e", "NOPE", "--", "ls")
    assert code == 2 and "NAME=VALUE" in err


def test_log_formats_lines_and_skips_events(fake_cli: Any) -> None:
    ts = int(datetime(2026, 11, 26, 1, 2, 3, 456_000, tzinfo=UTC).timestamp() * 1000)
    lines = [
        {"ts_ms": ts, "node": "n2", "job_id": "web-3f2a9c0e", "type": "web", "stream": "stdout", "text": "hello"},
        {"event": "heartbeat"},
        {"ts_ms": ts + 1, "node": "n1", "job_id": "web-77aa0000", "type": "web", "stream": "stderr", "text": "warn"},
    ]  # fmt: skip
    code, out, err, api = fake_cli([stream(*lines)], "log", "-a", "shop", "-n", "5", "-t", "web")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "2026-11-26T01:02:03.456Z web-3f2a[n2]: hello",
        "2026-11-26T01:02:03.457Z web-77aa[n1]: warn",
    ]
    assert dict(api.seen[0].url.params) == {"n": "5", "type": "web"}
    code, out, err, _ = fake_cli([stream(*lines)], "log", "-a", "shop", "--raw", "--split-stderr")
    assert (out, err) == ("hello\n", "warn\n")
    code, out, _, _ = fake_cli([stream(*lines)], "log", "-a", "shop", "--json")
    assert [json.loads(x)["text"] for x in out.splitlines()] == ["hello", "warn"]


def test_log_follow_reconnects_for_new_lines_and_ends_quietly_on_ctrl_c(fake_cli: Any) -> None:
    code, out, err, api = fake_cli([
        stream(out_line("a"), then=httpx.ReadTimeout("no heartbeat")),
        stream(out_line("b"), {"event": "heartbeat"}, then=KeyboardInterrupt()),
    ], "log", "-a", "shop", "-f", "-j", "run-0123456789abcdef", "--raw")  # fmt: skip
    assert code == 0 and out == "a\nb\n"
    assert "reconnecting" in err and len(err.splitlines()) == 1
    assert dict(api.seen[0].url.params) == {"n": "100", "follow": "1", "job": "run-0123456789abcdef"}
    assert dict(api.seen[1].url.params)["n"] == "0"  # no history twice


def test_log_errors_are_one_line(fake_cli: Any) -> None:
    code, out, err, _ = fake_cli(
        [answer(404, {"error": {"code": "not_found", "message": "no app named 'nope'"}})], "log", "-a", "nope"
    )
    assert code == 1 and out == ""
    assert err == "flynnp2p: error: http://node.test:7100 answered 404: no app named 'nope'\n"
    code, _, err, _ = fake_cli([stream(out_line("a"), then=httpx.ReadError("reset"))], "log", "-a", "shop")
    assert code == 1 and len(err.splitlines()) == 1 and "log stream" in err and "reset" in err


# -- against the real API -------------------------------------------------------------


@dataclass
class JobsCtx(Ctx):
    node_name: str = "n1"
    api_addr: str = ""
    host_tags: dict[str, str] = field(default_factory=dict)

    def leader_epoch(self) -> int:
        return 1

    def members(self) -> list[dict[str, Any]]:
        return [{"name": "n1", "addr": "127.0.0.1", "gossip_port": 7946, "status": "alive",
                 "roles": ["scheduler", "host"], "api": self.api_addr, "leader": True,
                 "tags": dict(self.host_tags)}]  # fmt: skip

    async def set_host_tags(self, tags: Mapping[str, str | None]) -> dict[str, str]:
        for key, value in tags.items():
            if value is None:
                self.host_tags.pop(key, None)
            else:
                self.host_tags[key] = value
        return dict(self.host_tags)


class NoPeers:
    def alive_peers(self) -> list[Peer]:
        return []


@dataclass
class Served:
    url: str
    service: StateService
    token: trio.lowlevel.TrioToken
    logs: Path

    def write(self, *records: Record) -> None:
        trio.from_thread.run(self.service.write, list(records), trio_token=self.token)


def serve(root: Path, started: queue.Queue[Served], stop: threading.Event) -> None:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery)
            ctx = JobsCtx(service, Clock())
            http = httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN.peer_key}"}, timeout=10.0)
            blobs = BlobService(BlobStore(root / "blobs"), service, NoPeers(), http, "n1", ctx.now_ms)
            hub = LogHub(root / "logs")
            fanout = LogFanout(http, lambda: [], Peer("n1", "unbound"))
            app = create_app(Node())
            apps_api = AppsApi(ctx, None, random.Random(7), slug_path=blobs.local_path)
            app.register_blueprint(apps_blueprint(ctx, api=apps_api))
            app.register_blueprint(jobs_blueprint(ctx, apps_api))
            app.register_blueprint(blobs_blueprint(blobs))
            app.register_blueprint(internal_log_blueprint(hub))
            app.register_blueprint(logs_blueprint(ctx, fanout))
            server = ApiServer(app, "127.0.0.1", 0)
            sockets = server.bind()
            port = sockets.insecure_sockets[0].getsockname()[1]
            ctx.api_addr = f"127.0.0.1:{port}"
            fanout.self_peer = Peer("n1", ctx.api_addr)
            await nursery.start(fanout.run)
            await nursery.start(server.run, sockets)
            token = trio.lowlevel.current_trio_token()
            started.put(Served(f"http://127.0.0.1:{port}", service, token, root / "logs"))
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    trio.run(run)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    started: queue.Queue[Served] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(tmp_path_factory.mktemp("api"), started, stop))
    thread.start()
    try:
        yield started.get(timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_url(served: Served) -> str:
    return served.url


def make_slug(path: Path, procfile: str = "web: python3 -m http.server $PORT\n") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("./app/Procfile", procfile.encode()), ("./app/index.html", b"hi\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def as_json(out: str) -> Any:
    return json.loads(out)


def deployed(cli: Any, app: str, tmp_path: Path, procfile: str | None = None) -> dict[str, Any]:
    """Create `app` and deploy a slug; its info."""
    assert cli("create", app)[0] == 0
    slug = make_slug(tmp_path / f"{app}.tgz", *(() if procfile is None else (procfile,)))
    code, _, err = cli("release", "-a", app, "add", "--slug", str(slug))
    assert code == 0, err
    info: dict[str, Any] = as_json(cli("info", "-a", app, "--json")[1])
    return info


def test_release_add_uploads_the_slug_and_deploys_it(cli: Any, tmp_path: Path) -> None:
    cli("create", "slugged")
    slug = make_slug(tmp_path / "app.tgz", "web: python3 -m http.server $PORT\nworker: python3 w.py\n")
    code, out, err = cli("release", "-a", "slugged", "add", "--slug", str(slug), "-e", "GREETING=hi")
    assert code == 0, err
    info = as_json(cli("info", "-a", "slugged", "--json")[1])
    rid = info["release"]["id"]
    assert out == f"release {rid}: types web, worker (deployed: web=1)\n"
    assert info["formation"]["processes"] == {"web": 1}
    assert cli("env", "-a", "slugged")[1] == "GREETING=hi\n"
    code, out, _ = cli("release", "-a", "slugged", "show", rid)
    assert "process:   web: python3 -m http.server $PORT" in out and "artifacts: " in out
    # Again, as JSON: same bytes, so the same blob; a new release.
    code, out, _ = cli("release", "add", "-a", "slugged", "--slug", str(slug), "--json")
    assert code == 0 and as_json(out)["release"]["id"] != rid
    assert as_json(out)["release"]["env"] == {"GREETING": "hi"}  # the env carries over


def test_release_add_with_a_bad_slug(cli: Any, tmp_path: Path) -> None:
    cli("create", "badslug")
    missing = tmp_path / "nope.tgz"
    code, out, err = cli("release", "-a", "badslug", "add", "--slug", str(missing))
    assert code == 2 and out == ""
    assert err == f"flynnp2p: error: cannot read slug {str(missing)!r}: No such file or directory\n"
    code, _, err = cli("release", "-a", "badslug", "add", "--slug", str(tmp_path))
    assert code == 2 and "cannot read slug" in err and len(err.splitlines()) == 1
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"not a tarball")
    code, _, err = cli("release", "-a", "badslug", "add", "--slug", str(junk))
    assert code == 1 and "not a gzipped tar" in err
    code, _, err = cli("release", "-a", "badslug", "add", "--slug", str(make_slug(tmp_path / "e.tgz", "")))
    assert code == 1 and "no ./app/Procfile" in err


def test_release_add_of_a_non_tarball_fails_in_one_line(cli: Any, tmp_path: Path) -> None:
    cli("create", "junkslug")
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"not a tarball")
    code, _, err = cli("release", "-a", "junkslug", "add", "--slug", str(junk))
    assert code == 1 and len(err.splitlines()) == 1


def test_ps_explain_and_kill(cli: Any, served: Served, tmp_path: Path) -> None:
    info = deployed(cli, "jobsapp", tmp_path)
    app_id, rid = info["app"]["id"], info["release"]["id"]
    code, out, _ = cli("ps", "-a", "jobsapp")
    assert code == 0 and out == "no jobs\n"  # no scheduler here
    code, out, _ = cli("explain", "-a", "jobsapp")
    assert code == 0 and out == "nothing is blocked\n"

    now = int(datetime.now(UTC).timestamp() * 1000)
    served.write(
        Placement(id="web-aaaa0000111122223333", app_id=app_id, release_id=rid, process_type="web",
                  host="n1", action="start", epoch=1, created_at=now - 65_000),
        Job(id="web-bbbb0000111122223333", app_id=app_id, release_id=rid, process_type="web", host="n2",
            state="crashed", created_at=now - 5_000, updated_at=now, exit_code=1, restarts=2,
            reason="exited with code 1"),
        Blocked(app_id=app_id, process_type="web", count=2, epoch=1, updated_at=now,
                reasons=("n1: needs tag disk=ssd", "n2: 100 MB free, needs 512 MB")),
    )  # fmt: skip
    code, out, _ = cli("ps", "-a", "jobsapp")
    assert code == 0
    assert out.splitlines() == [
        "ID                        TYPE  STATE    HOST  RELEASE   AGE  REASON",
        f"web-aaaa0000111122223333  web   pending  n1    {rid[:8]}  1m",
        f"web-bbbb0000111122223333  web   crashed  n2    {rid[:8]}  5s   exited with code 1; exit 1; 2 restarts",
        "blocked: 2 x web: n1: needs tag disk=ssd; n2: 100 MB free, needs 512 MB",
    ]
    body = as_json(cli("ps", "-a", "jobsapp", "--json")[1])
    assert [j["state"] for j in body["jobs"]] == ["pending", "crashed"] and len(body["blocked"]) == 1

    for args in ((), ("web",)):
        code, out, _ = cli("explain", "-a", "jobsapp", *args)
        assert code == 0 and out.splitlines() == [
            "2 x web: cannot be placed", "  - n1: needs tag disk=ssd", "  - n2: 100 MB free, needs 512 MB",
        ]  # fmt: skip
    code, out, _ = cli("explain", "-a", "jobsapp", "web-bbbb0000111122223333")
    assert code == 0
    assert out.splitlines() == [
        "job:       web-bbbb0000111122223333", "type:      web", "state:     crashed", "host:      n2",
        f"release:   {rid}", "address:   -", "reason:    exited with code 1", "exit code: 1",
        "restarts:  2",
    ]  # fmt: skip
    code, _, err = cli("explain", "-a", "jobsapp", "nothing-here")
    assert code == 1 and "no job and no blocked process type 'nothing-here'" in err

    code, out, _ = cli("kill", "-a", "jobsapp", "web-aaaa0000111122223333")
    assert code == 0 and out == "killed job web-aaaa0000111122223333 (the scheduler replaces it)\n"
    code, out, _ = cli("kill", "-a", "jobsapp", "web-aaaa0000111122223333")
    assert code == 0 and out == "job web-aaaa0000111122223333 is already stopping\n"
    code, _, err = cli("kill", "-a", "jobsapp", "web-cccc")
    assert code == 1 and "has no job 'web-cccc'" in err
    code, out, _ = cli("ps", "-a", "jobsapp", "--all", "--json")
    shown = {j["id"]: j for j in as_json(out)["jobs"]}
    assert set(shown) == {"web-aaaa0000111122223333", "web-bbbb0000111122223333"}
    killed = shown["web-aaaa0000111122223333"]  # stopped before its host reported it
    assert killed["state"] == "down" and killed["reason"] == "killed by a user"


def test_run_detached_and_kill_a_one_off(cli: Any, served: Served, tmp_path: Path) -> None:
    cli("create", "norelease")
    code, _, err = cli("run", "-a", "norelease", "-d", "--", "echo", "hi")
    assert code == 1 and "has no release yet" in err
    info = deployed(cli, "runner", tmp_path)
    code, out, err = cli("run", "-a", "runner", "-d", "-e", "X=1", "--", "echo", "hi")
    assert code == 0 and err == ""
    assert out.startswith("run-") and len(out.splitlines()) == 1
    job_id = out.strip()
    served.write(  # as the leader would place it
        Placement(id=job_id, app_id=info["app"]["id"], release_id=info["release"]["id"],
                  process_type="run", host="n1", action="start", epoch=1, created_at=1, one_off=True,
                  args=("echo", "hi")),
    )  # fmt: skip
    code, out, _ = cli("kill", "-a", "runner", job_id)
    assert code == 0 and out == f"killed job {job_id} (a one-off: it is not restarted)\n"
    code, out, _ = cli("run", "-a", "runner", "-d", "--json", "--memory", "64", "--", "sh", "-c", "exit 3")
    body = as_json(out)
    assert code == 0 and body["job_id"].startswith("run-") and set(body) >= {"release_id", "replicas"}


def test_run_with_a_bad_memory_limit_is_refused_with_the_reason(cli: Any, tmp_path: Path) -> None:
    deployed(cli, "tinyrun", tmp_path)
    code, _, err = cli("run", "-a", "tinyrun", "-d", "--memory", "1", "--", "ls")
    assert code == 1 and "run.memory_mb" in err


def test_scale_waits_for_the_jobs_the_host_reports(cli: Any, served: Served, tmp_path: Path) -> None:
    info = deployed(cli, "scaler", tmp_path)
    app_id, rid = info["app"]["id"], info["release"]["id"]
    now = int(datetime.now(UTC).timestamp() * 1000)
    served.write(
        Job(id="web-dddd0000111122223333", app_id=app_id, release_id=rid, process_type="web", host="n1",
            state="up", created_at=now, updated_at=now, address="127.0.0.1:20001"),
    )  # fmt: skip
    code, out, _ = cli("scale", "-a", "scaler", "web=1")
    assert code == 0 and out.startswith("scale completed in 0.") and len(out.splitlines()) == 1
    code, out, err = cli("scale", "-a", "scaler", "web=2", "--timeout", "0.3")
    assert code == 1 and out == ""
    assert err == "flynnp2p: error: scale did not complete in 0.3s: web: 1 of 2 up\n"
    code, out, _ = cli("scale", "-a", "scaler", "web=1", "--json")
    assert code == 0 and [j["id"] for j in as_json(out)["jobs"]] == ["web-dddd0000111122223333"]
    code, out, _ = cli("scale", "-a", "scaler", "web=3", "-n")
    assert code == 0 and out.splitlines()[:2] == ["TYPE  COUNT  TAGS", "web   3      -"]
    code, _, err = cli("scale", "-a", "scaler", "web=3", "--timeout", "0")
    assert code == 2 and "--timeout" in err


def test_log_reads_every_nodes_files(cli: Any, served: Served, tmp_path: Path) -> None:
    deployed(cli, "chatty", tmp_path)
    served.logs.mkdir(parents=True, exist_ok=True)
    ts = int(datetime(2026, 11, 26, 1, 2, 3, 456_000, tzinfo=UTC).timestamp() * 1000)
    lines = [
        {"ts_ms": ts, "job_id": "web-3f2a9c0e11", "stream": "stdout", "text": "first"},
        {"ts_ms": ts + 1000, "job_id": "web-3f2a9c0e11", "stream": "stderr", "text": "second"},
        {"ts_ms": ts + 2000, "job_id": "worker-77aa0000", "stream": "stdout", "text": "third"},
    ]
    (served.logs / "chatty.log").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, out, err = cli("log", "-a", "chatty", "-n", "2")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "2026-11-26T01:02:04.456Z web-3f2a[n1]: second",
        "2026-11-26T01:02:05.456Z worker-77aa[n1]: third",
    ]
    code, out, err = cli("log", "-a", "chatty", "-t", "web", "--raw", "--split-stderr")
    assert (code, out, err) == (0, "first\n", "second\n")
    code, out, _ = cli("log", "-a", "chatty", "-j", "worker-77aa0000", "--raw")
    assert out == "third\n"


def test_hosts(cli: Any) -> None:
    code, out, _ = cli("host", "tag", "n1", "disk=ssd", "zone=a")
    assert code == 0 and out == "host n1 tags: disk=ssd, zone=a\n"
    code, out, _ = cli("host", "tag", "n1", "zone-")
    assert code == 0 and out == "host n1 tags: disk=ssd\n"
    code, out, _ = cli("host", "list")
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "ADDR", "STATUS", "LEADER", "JOBS", "TAGS"]
    name, addr, status, leader, count, tags = out.splitlines()[1].split()
    assert (name, addr, status, leader, tags) == ("n1", "127.0.0.1", "alive", "*", "disk=ssd")
    assert count.isdigit()  # other tests' jobs may be on n1
    assert as_json(cli("host", "list", "--json")[1])["hosts"][0]["tags"] == {"disk": "ssd"}
    code, _, err = cli("host", "tag", "n1", "Bad=1")
    assert code == 1 and "must be lowercase" in err
    code, _, err = cli("host", "tag", "n9", "a=1")
    assert code == 1 and "no host 'n9'" in err
    code, _, err = cli("host", "tag", "n1", "justakey")
    assert code == 2 and "KEY=VALUE" in err
