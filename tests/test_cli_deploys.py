"""The deploy commands' pure parts and the shared wait (flynnp2p/cli/deploys.py,
flynnp2p/deployments.py): settings parsing, the table, the outcome report."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flynnp2p import deployments
from flynnp2p.cli.deploys import deployment_rows, parse_settings
from flynnp2p.cli.main import build_parser
from flynnp2p.errors import UserError

VERSIONS = {"r1": 1, "r2": 2}
FAILED = {
    "id": "d2" * 8, "app_id": "a", "old_release_id": "r1", "new_release_id": "r2",
    "strategy": "one-by-one", "status": "rolled-back", "created_at": 1_000, "finished_at": 4_500,
    "reason": "job web-1 (web) exited with code 3", "failed_job_id": "web-1",
}  # fmt: skip


def test_settings_are_parsed_and_bad_ones_say_what_is_accepted() -> None:
    got = parse_settings(["strategy=one-by-one", "deploy_timeout_s=30", "build_memory_mb=2048"])
    assert got == {"strategy": "one-by-one", "deploy_timeout_s": 30, "build_memory_mb": 2048}
    with pytest.raises(
        UserError, match=r"KEY one of: strategy .*build_timeout_s.*got 'colour=red'"
    ):
        parse_settings(["colour=red"])
    with pytest.raises(
        UserError, match=r"deploy_timeout_s: expected a whole number \(seconds, 5 to 3600\)"
    ):
        parse_settings(["deploy_timeout_s=soon"])


def test_deployment_table_rows() -> None:
    running = {**FAILED, "id": "d3" * 8, "status": "running", "finished_at": None, "reason": None}
    first = {**FAILED, "id": "d1" * 8, "old_release_id": None, "new_release_id": "r1", "status": "complete",
             "strategy": "all-at-once", "reason": None}  # fmt: skip
    rows = deployment_rows([running, FAILED, first], VERSIONS, now_ms=3_000)
    assert rows == [
        ("d3d3d3d3", "v1 → v2", "one-by-one", "running", "2.0s", ""),
        (
            "d2d2d2d2",
            "v1 → v2",
            "one-by-one",
            "rolled-back",
            "3.5s",
            "job web-1 (web) exited with code 3",
        ),
        ("d1d1d1d1", "- → v1", "all-at-once", "complete", "3.5s", ""),
    ]


def test_report_of_a_failed_deploy_names_why_the_logs_and_what_serves() -> None:
    ndjson = "\n".join(
        json.dumps(x) for x in ({"text": "Traceback"}, {"event": "history-done"}, {"text": "boom"})
    )
    tail = deployments.log_tail(ndjson + "\nnot json")
    assert tail == ["Traceback", "boom"]
    assert deployments.report(FAILED, VERSIONS, tail) == [
        "deploy of v2 failed after 3.5 s: job web-1 (web) exited with code 3",
        "last lines of job web-1:",
        "    Traceback",
        "    boom",
        "rolled back: the previous release v1 still serves",
    ]
    assert deployments.log_params(FAILED) == {"job": "web-1", "n": "10"}
    done = {**FAILED, "status": "complete", "reason": None, "failed_job_id": None}
    assert deployments.report(done, VERSIONS) == ["deployed v2 (one-by-one) in 3.5 s"]
    assert deployments.log_params(done) is None


def test_wait_polls_until_the_deployment_of_the_release_is_finished() -> None:
    answers = iter(
        [[], [{**FAILED, "status": "running"}], [FAILED, {**FAILED, "new_release_id": "r1"}]]
    )
    asked: list[str] = []
    clock = [0.0]

    def get(path: str) -> Any:
        asked.append(path)
        return {"deployments": next(answers)}

    def sleep(s: float) -> None:
        clock[0] += s

    dep = deployments.wait_for_sync(
        get, "shop", "r2", timeout_s=60, sleep=sleep, monotonic=lambda: clock[0]
    )
    assert dep == FAILED and asked == ["/v1/apps/shop/deployments"] * 3 and clock[0] == 1.0
    never = deployments.wait_for_sync(
        lambda _p: {"deployments": []},
        "shop",
        "r2",
        timeout_s=2,
        sleep=sleep,
        monotonic=lambda: clock[0],
    )
    assert never is None


def test_commands_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["rollback", "v2", "-y", "-a", "shop"])
    assert (args.release, args.yes, args.app) == ("v2", True, "shop")
    args = parser.parse_args(["app", "set", "strategy=one-by-one", "-a", "shop"])
    assert (args.app_cmd, args.pairs, args.app) == ("set", ["strategy=one-by-one"], "shop")
    assert parser.parse_args(["app", "-a", "shop"]).app_cmd in (None, "show")  # both show
    assert parser.parse_args(["deployment", "-a", "shop"]).app == "shop"
