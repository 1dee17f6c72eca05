"""Waiting on a deployment, as a client of the API sees it (pure, over its JSON).

Theory of operation
-------------------
Whatever moves an app to a new release (a ``git push``, ``rollback``, ``env set``)
can wait for the `Deployment` the leader made for it and say how it ended. The
waiting loops are the callers' (the push's is async, the CLI's is not); what they
share lives here, with no I/O:

1. `deployment_for`: of ``GET /v1/apps/<app>/deployments`` (newest first), the
   newest deployment of the release (the one the move made);
2. poll until `finished` (the deploy watcher gives every deployment an end: at the
   latest the app's ``deploy_timeout_s``);
3. when it failed, fetch the failing job's last lines (``GET
   /v1/apps/<app>/log?job=&n=`` gives NDJSON; `log_tail` keeps the text) and
   print `report`: why, those lines, and which release serves now.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

FINISHED = frozenset({"complete", "failed", "rolled-back"})
LOG_LINES = 10  # of the failing job, shown when a deploy fails
POLL_S = 0.5


def deployment_for(
    deployments: Sequence[Mapping[str, Any]], release_id: str
) -> Mapping[str, Any] | None:
    """The newest deployment of `release_id` (the list is newest first)."""
    return next((d for d in deployments if d.get("new_release_id") == release_id), None)


def finished(dep: Mapping[str, Any] | None) -> bool:
    return dep is not None and dep.get("status") in FINISHED


def log_params(dep: Mapping[str, Any]) -> dict[str, str] | None:
    """The query of the failing job's last lines, or None (no job to blame)."""
    job = dep.get("failed_job_id")
    return None if not job else {"job": str(job), "n": str(LOG_LINES)}


def log_tail(ndjson: str) -> list[str]:
    """The text of the log lines of an NDJSON log answer (its events dropped)."""
    lines = []
    for raw in ndjson.splitlines():
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict) and "text" in item:
            lines.append(str(item["text"]))
    return lines[-LOG_LINES:]


def version_of(versions: Mapping[str, int], release_id: str | None) -> str:
    if release_id is None:
        return "-"
    number = versions.get(release_id)
    return f"v{number}" if number else release_id[:8]


def duration_s(dep: Mapping[str, Any], now_ms: int) -> float:
    end = dep.get("finished_at") or now_ms
    return max(0.0, (int(end) - int(dep.get("created_at", end))) / 1000)


def report(
    dep: Mapping[str, Any], versions: Mapping[str, int], tail: Sequence[str] = ()
) -> list[str]:
    """What to tell the user of finished deployment `dep` (one line each, no prefix)."""
    new = version_of(versions, dep.get("new_release_id"))
    old = version_of(versions, dep.get("old_release_id"))
    took = f"{duration_s(dep, 0):.1f} s"
    status = dep.get("status")
    if status == "complete":
        return [f"deployed {new} ({dep.get('strategy')}) in {took}"]
    lines = [f"deploy of {new} failed after {took}: {dep.get('reason') or 'no reason given'}"]
    if tail:
        lines.append(f"last lines of job {dep.get('failed_job_id')}:")
        lines.extend(f"    {t}" for t in tail)
    if status == "rolled-back":
        lines.append(f"rolled back: the previous release {old} still serves")
    elif dep.get("old_release_id") is None:
        lines.append("there is no previous release to restore; fix the app and deploy again")
    else:
        lines.append("not rolled back: the formation had already moved on")
    return lines


def deployments_path(app: str) -> str:
    return f"/v1/apps/{quote(app)}/deployments"


async def wait_for(
    get_json: Callable[[str], Awaitable[Any]],
    app: str,
    release_id: str,
    *,
    timeout_s: float,
    sleep: Callable[[float], Awaitable[None]],
    monotonic: Callable[[], float],
    settled: Callable[[Mapping[str, Any]], Awaitable[bool]] | None = None,
) -> Mapping[str, Any] | None:
    """Poll until the deployment of `release_id` is finished, or `settled` says a
    running one needs no more waiting, or `timeout_s` passed; the deployment as last
    seen (None: none was made)."""
    deadline = monotonic() + timeout_s
    while True:
        dep = deployment_for((await get_json(deployments_path(app)))["deployments"], release_id)
        if finished(dep) or monotonic() >= deadline:
            return dep
        if dep is not None and settled is not None and await settled(dep):
            return dep
        await sleep(POLL_S)


def wait_for_sync(
    get_json: Callable[[str], Any],
    app: str,
    release_id: str,
    *,
    timeout_s: float,
    sleep: Callable[[float], None],
    monotonic: Callable[[], float],
) -> Mapping[str, Any] | None:
    """`wait_for` for a blocking client (the CLI)."""
    deadline = monotonic() + timeout_s
    while True:
        dep = deployment_for(get_json(deployments_path(app))["deployments"], release_id)
        if finished(dep) or monotonic() >= deadline:
            return dep
        sleep(POLL_S)
