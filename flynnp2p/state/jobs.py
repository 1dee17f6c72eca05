"""The job lifecycle: a job's states, the order a host reports them in, and what they mean.

Theory of operation
-------------------
Two writers describe one job. The leader writes its `Placement`: start, restart
(the same placement with ``generation + 1``) or stop. The job's host writes its
`Job` record, the *report*, and is the only writer of it. Within one generation
a report moves along

    (none) ──► pending ──► starting ──► up ──► stopping ──► down
       │          │            │         │         │          ▲
       │          └────────────┴─────────┴─────────┴─► crashed┘ (stopped by the leader)
       └──► down (refused as fenced: placed by a deposed leader, never run)

and `NEXT` lists every step exactly: besides the arrows, a run may go back to
``pending`` (this agent restarted and starts it again) or ``starting`` (it
re-adopted the job's container), and any state may end in ``crashed`` or, for a
one-off that exits 0 or a job stopped early, ``down``. A new generation starts
over from ``pending``.

What everyone but the host sees is `effective_state` (placement, report): the
report, corrected by what the leader decided since (a placement not acted on yet
is ``pending``, a stop of a live job ``stopping``). The API adds one state of its
own, `LOST`: an `ACTIVE` job whose host stopped answering this node.

The rules every component asks of a state, in one place:

* `is_finished`: nothing runs it and nothing will (down, or a one-off that crashed).
* `LIVE`: counts towards its group (the scheduler keeps a crashed job's slot).
* `ACTIVE`: placed and not stopping: its host is bringing it up or runs it.
* `IN_FLIGHT`: on its way somewhere: the picture may still change.
* `takes_traffic`: up, and its placement is not a stop (the router's test).
* `stopped_for_lost_host`: stopped because its host is not alive (routers give up
  what is in flight to it; a drained job finishes it).
* `drains`: routers may be sending it requests, so its host drains it before a stop.
* fencing (`FENCED`, `fenced_reason`, `is_fenced`): a host refused the placement.

Pure: states are the strings the records carry, so the same rules serve records,
API rows and the CLI (which does not load the record schema: it is imported for
types only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flynnp2p.state.records import Job, Placement

PENDING = "pending"  # placed; the host prepares it (fetches the slug) or has not reported yet
STARTING = "starting"  # running; its health check has not passed yet
UP = "up"
CRASHED = "crashed"  # exited by itself (a one-off: non-zero); a service job waits for a restart
STOPPING = "stopping"
DOWN = "down"  # stopped, refused, or a one-off that exited 0
LOST = "lost"  # (shown by the API only) an active job whose host stopped answering

REPORTED = (PENDING, STARTING, UP, CRASHED, STOPPING, DOWN)  # `Job.state`'s choices, in order
START, STOP = "start", "stop"  # `Placement.action`

# The reports a host may write after each one within a generation (None: no report
# yet). `pending` again after pending/starting/up/stopping: this agent restarted and
# starts the job again; `starting` again: it re-adopted the job's container.
NEXT: Mapping[str | None, frozenset[str]] = {
    None: frozenset({PENDING, DOWN}),  # DOWN: refused as fenced, never run
    PENDING: frozenset({PENDING, STARTING, CRASHED, DOWN}),
    STARTING: frozenset({PENDING, STARTING, UP, STOPPING, CRASHED, DOWN}),
    UP: frozenset({PENDING, STARTING, STOPPING, CRASHED, DOWN}),
    STOPPING: frozenset({PENDING, STARTING, CRASHED, DOWN}),
    CRASHED: frozenset({DOWN}),  # stopped by the leader while it waited for its restart
    DOWN: frozenset(),
}

LIVE = frozenset({PENDING, STARTING, UP, CRASHED})
ACTIVE = frozenset({PENDING, STARTING, UP})
IN_FLIGHT = frozenset({PENDING, STARTING, STOPPING, LOST})
EXITED = frozenset({CRASHED, DOWN})  # this run is over (runs nothing)

FENCED = "fenced:"  # how a host's reason starts when it refuses a stale placement


RESTARTED = "restarted; it "  # a restart placement's reason: how the run before it ended


def how_it_ended(exit_code: int | None, reason: str | None) -> str:
    """A crashed run's end in words: its exit code, or its host's reason when it never
    ran (a full disk, an image that cannot be fetched)."""
    if exit_code is not None:
        return f"exited with code {exit_code}"
    if reason:
        return f"could not start: {reason}"
    return "exited by itself"


def restart_reason(j: Job | None) -> str:
    """The reason a restart placement carries: how the run it replaces ended, kept
    for whoever judges the job after its host has reported the next run."""
    return RESTARTED + (
        how_it_ended(j.exit_code, j.reason) if j is not None else "exited by itself"
    )


def may_follow(previous: Job | None, report: Job) -> bool:
    """Whether a host may write `report` over `previous` (the record it replaces)."""
    if previous is None:
        return report.state in NEXT[None]
    if report.generation != previous.generation:  # a new generation starts over; never back
        return report.generation > previous.generation and report.state == PENDING
    return report.state in NEXT[previous.state]


def effective_state(p: Placement | None, j: Job | None) -> str | None:
    """A job's state from its host's report and the leader's placement (None: neither).

    Placed but not reported, or a restart ordered the host has not acted on yet:
    "pending". Stopped by the leader: "stopping" until its host reports it down, or
    "down" at once if it had crashed (it runs nothing). Else what the host reported.
    """
    if j is None:
        return None if p is None else (PENDING if p.action == START else DOWN)
    if p is not None and p.action == STOP and j.state != DOWN:
        return DOWN if j.state == CRASHED else STOPPING
    if p is not None and j.state == CRASHED and p.generation > j.generation:
        return PENDING
    return j.state


def is_finished(state: str, one_off: bool) -> bool:
    """Nothing runs it and nothing will: down, or a one-off that crashed (a crashed
    service job still waits for the leader: restarted, or stopped and then down)."""
    return state == DOWN or (one_off and state == CRASHED)


def takes_traffic(p: Placement | None, j: Job | None) -> bool:
    """Its host reports it up and the leader has not stopped it: requests go to it.

    A job being stopped drains (its host still runs it; new requests go elsewhere).
    A report with no placement in this replica (one refilling after a reset) still
    counts: its host says it is up. Whether it has an address to send them to is
    the router's to check (a worker is up without one)."""
    return effective_state(p, j) == UP


HOST_GONE = " is not alive"  # how the leader's reason for stopping a dead host's job ends


def host_gone_reason(host: str) -> str:
    """The leader's reason for stopping a job because its host is not alive."""
    return f"host {host}{HOST_GONE}"


def stopped_for_lost_host(p: Placement | None, j: Job | None) -> bool:
    """The leader stopped it because its host is not alive: nothing will answer what a
    router has in flight to it (unlike a drain), so routers give that up at once."""
    return (
        p is not None and p.action == STOP and p.reason is not None and p.reason.endswith(HOST_GONE)
        and (j is None or j.state != DOWN)
    )  # fmt: skip


def drains(job: Job | None) -> bool:
    """Its host drains it before stopping it: the report says up, and it is a
    service job with an address, so routers may be sending it requests (they only
    ever choose such a job; see `takes_traffic`). Draining is the host's half of a
    protocol with the routers: report it ``stopping`` (every router drops it on
    seeing that, whoever decided the stop), wait the deregistration delay, then
    SIGTERM with the grace period (`flynnp2p.host.runner`). A one-off, a worker,
    or a job not up yet was never chosen: it stops at once."""
    return job is not None and job.state == UP and not job.one_off and job.address is not None


def fenced_reason(epoch: int, newest_epoch: int) -> str:
    return f"{FENCED} placed at epoch {epoch}, the newest epoch is {newest_epoch}"


def is_fenced(job: Job) -> bool:
    """The host refused the job's placement as coming from a deposed leader."""
    return job.state == DOWN and (job.reason or "").startswith(FENCED)
