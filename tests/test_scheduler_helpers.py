"""Builders for the scheduler tests, and `apply_plan`: hosts that obey a plan.

(No tests here; the name only keeps it with the scheduler's test files.)
"""

from __future__ import annotations

import dataclasses

from flynnp2p.scheduler import Desired, Host, Inputs, JobInfo, Plan


def host(name: str, alive: bool = True, mem: int = 4096, **tags: str) -> Host:
    return Host(name, alive, tags, mem)


def want(
    app: str = "a",
    type: str = "web",
    count: int = 1,
    release: str = "r1",
    mem: int = 256,
    omni: bool = False,
    **constraints: str,
) -> Desired:
    return Desired(app, release, type, count, mem, omni, constraints)


def job(
    id: str,
    host: str = "n1",
    state: str = "up",
    created: int = 0,
    app: str = "a",
    type: str = "web",
    release: str = "r1",
    mem: int = 256,
    restarts: int = 0,
    exited_at: int | None = None,
    up_since: int | None = None,
    one_off: bool = False,
) -> JobInfo:
    return JobInfo(
        id, app, release, type, host, state, created, mem, restarts, exited_at, up_since, one_off
    )


def apply_plan(inputs: Inputs, p: Plan, now_ms: int = 0) -> Inputs:
    """The inputs after every host acted on `p`: stops are stopping, starts starting,
    restarted jobs starting again."""
    stops = {s.job_id for s in p.stops}
    restarts = {r.job_id: r for r in p.restarts_at}
    jobs = []
    for j in inputs.jobs:
        if j.id in stops:
            j = dataclasses.replace(j, state="stopping")
        elif j.id in restarts:
            j = dataclasses.replace(j, state="starting", restarts=restarts[j.id].restarts)
        jobs.append(j)
    for s in p.starts:
        jobs.append(
            JobInfo(
                s.job_id,
                s.app,
                s.release,
                s.type,
                s.host,
                "starting",
                now_ms,
                s.memory_mb,
                one_off=s.one_off,
            )
        )
    return dataclasses.replace(inputs, jobs=tuple(jobs))


def used_mb(inputs: Inputs) -> dict[str, int]:
    """Memory held per host by the jobs of `inputs`."""
    used = {h.name: 0 for h in inputs.hosts}
    for j in inputs.jobs:
        if j.holds_memory and j.host in used:
            used[j.host] += j.memory_mb
    return used
