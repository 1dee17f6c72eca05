"""The scheduler: a pure placement core (reconcile, feasible, rank, plan).

``plan(inputs_from_state(state, hosts, now_ms), now_ms, seed)`` gives the starts,
stops, timed restarts and blocked jobs of one evaluation; see `plan` for the
pipeline and its invariants.
"""

from flynnp2p.scheduler.model import Desired, Host, Inputs, JobInfo, OneOff, inputs_from_state
from flynnp2p.scheduler.plan import Blocked, Plan, Start, new_job_id, plan
from flynnp2p.scheduler.reconcile import Restart, Stop

__all__ = [
    "Blocked",
    "Desired",
    "Host",
    "Inputs",
    "JobInfo",
    "OneOff",
    "Plan",
    "Restart",
    "Start",
    "Stop",
    "inputs_from_state",
    "new_job_id",
    "plan",
]
