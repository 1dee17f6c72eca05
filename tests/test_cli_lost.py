"""How the CLI shows a `lost` job (its host stopped answering): unit tests."""

from __future__ import annotations

from typing import Any

from flynnp2p.cli.common import reason_text
from flynnp2p.cli.scale import job_change_line, scale_progress, scale_verdict

REASON = "host n2 has not answered for 2.4s"


def web(id: str, state: str, host: str, reason: str | None = None) -> dict[str, Any]:
    return {
        "id": id, "process_type": "web", "release_id": "r1", "state": state, "host": host,
        "reason": reason, "address": "127.0.0.2:8001", "one_off": False, "exit_code": None,
        "restarts": 0,
    }  # fmt: skip


def test_a_lost_job_says_why_and_where() -> None:
    job = web("web-aaaa0000111122223333", "lost", "n2", REASON)
    assert reason_text(job) == REASON
    assert job_change_line(job) == f"web-aaaa… lost on n2: {REASON}"


def test_scale_waits_for_a_lost_job_to_be_replaced() -> None:
    formation = {"release_id": "r1", "processes": {"web": 2}}
    # Both hosts are taken, so the scheduler says it cannot place one more for now.
    blocked = [{"process_type": "web", "count": 1, "reasons": ["every host runs one web"]}]
    body = {"jobs": [web("web-1", "up", "n1"), web("web-2", "lost", "n2", REASON)], "blocked": blocked}
    progress = scale_progress(formation, body)
    assert progress.missing == ("web: 1 of 2 up, 1 lost",) and progress.blocked
    assert progress.settling  # the lost job will be replaced: wait, it is not "blocked"
    assert scale_verdict(progress, elapsed_s=30.0, timeout_s=60.0) == "wait"
