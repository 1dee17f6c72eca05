"""``scale``'s wait: is the formation running yet, and what changed since the last look.

Theory of operation
-------------------
After the formation is written, `wait_for_formation` polls ``GET
/v1/apps/<app>/jobs`` every ``POLL_S``, prints each job's state changes as they
appear (`job_changes`), and stops once the pure `scale_progress` over (formation,
that body) says every type has its count of ``up`` jobs of the formation's
release and nothing else is in flight; blocked entries end it early (after
``BLOCKED_SETTLE_S``: one seen sooner may predate the change).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flynnp2p.cli.client import ApiClient
from flynnp2p.cli.common import blocked_text, print_json, reason_text, short_job
from flynnp2p.errors import ClusterError
from flynnp2p.state.jobs import IN_FLIGHT, is_finished

POLL_S = 0.1
# A blocked entry seen right after the formation changed may predate it (the leader
# has not evaluated the change yet): it ends a scale early only after this long.
BLOCKED_SETTLE_S = 2.0


@dataclass(frozen=True)
class ScaleProgress:
    missing: tuple[str, ...]  # per process type not yet as wanted: what it has
    blocked: tuple[str, ...]  # `blocked_text` of the app's blocked process types
    settling: bool  # jobs pending, starting or stopping: the picture may still change

    @property
    def done(self) -> bool:
        return not self.missing


def scale_progress(formation: Mapping[str, Any], body: Mapping[str, Any]) -> ScaleProgress:
    """Whether every type of `formation` has exactly its count of jobs up, all of its
    release, and no other unfinished job (old release, surplus, stopping, crashed)."""
    release, want = formation["release_id"], formation.get("processes") or {}
    jobs = [j for j in body.get("jobs") or () if not j.get("one_off") and not is_finished(j["state"], False)]
    missing = []
    for ptype in sorted(set(want) | {j["process_type"] for j in jobs}):
        count = want.get(ptype, 0)
        of_type = [j for j in jobs if j["process_type"] == ptype]
        current = [j for j in of_type if j["release_id"] == release]
        up = sum(j["state"] == "up" for j in current)
        old = len(of_type) - len(current)
        if up == count == len(current) and not old:
            continue
        parts = [f"{up} of {count} up"]
        parts += [f"{n} {s}" for s in ("pending", "starting", "crashed", "stopping", "lost")
                  if (n := sum(j["state"] == s for j in current))]  # fmt: skip
        if up > count:
            parts.append(f"{up - count} too many")
        if old:
            parts.append(f"{old} of older releases")
        missing.append(f"{ptype}: {', '.join(parts)}")
    blocked = tuple(blocked_text(b) for b in body.get("blocked") or () if not b.get("job_id"))
    return ScaleProgress(tuple(missing), blocked, any(j["state"] in IN_FLIGHT for j in jobs))


Verdict = Literal["done", "wait", "blocked", "timeout"]


def scale_verdict(progress: ScaleProgress, elapsed_s: float, timeout_s: float) -> Verdict:
    if progress.done:
        return "done"
    if elapsed_s >= timeout_s:
        return "blocked" if progress.blocked else "timeout"
    if progress.blocked and not progress.settling and elapsed_s >= BLOCKED_SETTLE_S:
        return "blocked"  # nothing in flight could still unblock it
    return "wait"


def job_change_line(job: Mapping[str, Any]) -> str:
    line = f"{short_job(job['id'], '…')} {job['state']}"
    if job["state"] in ("pending", "starting", "up", "crashed", "lost") and job.get("host"):
        line += f" on {job['host']}"
    if job["state"] == "up" and job.get("address"):
        line += f" at {job['address']}"
    why = reason_text(job)
    return f"{line}: {why}" if why else line


def job_changes(
    before: Mapping[str, Mapping[str, Any]] | None, jobs: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Lines for jobs that appeared or changed since `before`, and ``down`` for jobs
    gone from the list (finished). With no `before` (the first look), the jobs that
    are not up: what is in progress."""
    out = []
    for j in jobs:
        old = before.get(j["id"]) if before is not None else None
        if before is None:
            changed = j["state"] != "up"
        else:
            changed = old is None or any(old.get(k) != j.get(k) for k in ("state", "host", "address"))
        if changed:
            out.append(job_change_line(j))
    listed = {j["id"] for j in jobs}
    out += [f"{short_job(i, '…')} down" for i in (before or {}) if i not in listed]
    return out


def wait_for_formation(
    client: ApiClient,
    jobs_path: str,
    formation: Mapping[str, Any],
    *,
    started: float,
    timeout_s: float,
    as_json: bool,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Poll the app's jobs until `formation` runs; 0, or a `ClusterError` saying what is
    missing or blocked. `started` is `clock()` when the formation was written."""
    seen: dict[str, Mapping[str, Any]] | None = None
    told: set[str] = set()
    while True:
        body = client.get(jobs_path)
        jobs = [j for j in body["jobs"] if not j.get("one_off")]
        progress = scale_progress(formation, body)
        elapsed = clock() - started
        if not as_json:
            for line in job_changes(seen, jobs):
                print(line, flush=True)
            for text in progress.blocked if elapsed >= BLOCKED_SETTLE_S else ():
                if text not in told:
                    told.add(text)
                    print(f"blocked: {text}", flush=True)
        seen = {j["id"]: j for j in jobs}
        verdict = scale_verdict(progress, elapsed, timeout_s)
        if verdict == "done":
            if as_json:
                print_json(body)
            else:
                print(f"scale completed in {elapsed:.2f}s")
            return 0
        if verdict == "blocked":
            raise ClusterError(f"scale blocked: {' | '.join(progress.blocked)}")
        if verdict == "timeout":
            raise ClusterError(f"scale did not complete in {timeout_s:g}s: {'; '.join(progress.missing)}")
        sleep(POLL_S)
