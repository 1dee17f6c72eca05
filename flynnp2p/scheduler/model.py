"""What the planner sees: hosts, desired groups, current jobs; and the adapter from state.

Theory of operation
-------------------
The core never reads records or the membership itself. The leader builds one
`Inputs` value per evaluation (`inputs_from_state`) and hands it to `plan`; the
same `Inputs`, ``now_ms`` and ``seed`` always give the same plan, so a plan can be
replayed from a logged input.

* `Host`: a member of the cluster, its tags and its memory capacity.
* `Desired`: one *group*, an (app, process type) of a formation: the release it
  should run, how many jobs, how much memory each takes, whether it is omni (one
  per eligible host), the tags a host needs, and how a new release replaces the
  jobs of an old one (``strategy``, see `flynnp2p.scheduler.surge`: the app's
  effective strategy for service types, `REPLACE` for omni ones), and the hosts
  that already hold its release's slug (``slug_hosts``, from the `BlobLocation`
  records: `rank` prefers them once the group is spread). A group with
  ``hold`` set is left alone (its release has not reached this replica yet) and
  reported as blocked.
* `JobInfo`: a job as the scheduler understands it, merged from the host-written
  `Job` record and the leader-written `Placement` for the same id: a start
  placement the host has not acted on yet is a ``starting`` job (so a second
  evaluation does not place it again), a stop placement makes it ``stopping``.
* `OneOff`: a `flynnp2p run` request, placed once under the id it already has.

Memory: a job holds its process type's ``memory_mb`` (from its *own* release) on
its host while it is starting, up, stopping, or crashed and waiting to be
restarted (so its slot is still there when the restart comes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flynnp2p.scheduler.surge import REPLACE, STRATEGIES, effective_strategy
from flynnp2p.state.jobs import effective_state, is_fenced, is_finished
from flynnp2p.state.merge import State
from flynnp2p.state.records import (
    BUILT_ON,
    App,
    Artifact,
    BlobLocation,
    Formation,
    Job,
    Placement,
    ProcessSpec,
    Release,
    RunRequest,
)
from flynnp2p.state.schema import EMPTY, FrozenMap

DEFAULT_MEMORY_MB = 512  # ProcessSpec's default; used when a job's release is unknown


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    alive: bool
    tags: Mapping[str, str] = EMPTY
    memory_mb: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", FrozenMap(self.tags))


@dataclass(frozen=True, slots=True)
class Desired:
    """One (app, process type) of a formation."""

    app: str
    release: str
    type: str
    count: int
    memory_mb: int = DEFAULT_MEMORY_MB
    omni: bool = False
    constraints: Mapping[str, str] = EMPTY
    hold: str | None = None  # why the group must be left alone for now
    strategy: str = REPLACE  # how jobs of another release give way (`surge`)
    slug_hosts: frozenset[str] = frozenset()  # hosts that hold the release's slug (`rank`)
    slug_built_on: str | None = None  # the one of them that built it and unpacked it (`rank`)

    def __post_init__(self) -> None:
        if self.count < 0 or self.memory_mb < 0:
            raise ValueError(f"{self.app}/{self.type}: count and memory_mb must be >= 0")
        if self.strategy not in STRATEGIES:
            accepted = ", ".join(STRATEGIES)
            raise ValueError(f"{self.app}/{self.type}: strategy must be one of {accepted}")
        object.__setattr__(self, "constraints", FrozenMap(self.constraints))

    @property
    def group(self) -> tuple[str, str]:
        return (self.app, self.type)


@dataclass(frozen=True, slots=True)
class JobInfo:
    id: str
    app: str
    release: str
    type: str
    host: str
    state: str  # starting | up | crashed | stopping | down (`flynnp2p.state.jobs`; pending is starting)
    created_at: int
    memory_mb: int = DEFAULT_MEMORY_MB
    restarts: int = 0
    exited_at: int | None = None  # when a crashed job exited
    up_since: int | None = None  # when the run that crashed became up (for the backoff reset)
    one_off: bool = False

    @property
    def group(self) -> tuple[str, str]:
        return (self.app, self.type)

    @property
    def holds_memory(self) -> bool:
        # A crashed service job keeps its slot for its restart; a finished job
        # (down, or a crashed one-off) holds nothing.
        return not is_finished(self.state, self.one_off)


@dataclass(frozen=True, slots=True)
class OneOff:
    """A one-off job to place once; never restarted, never replaced."""

    id: str
    app: str
    release: str
    type: str
    memory_mb: int = DEFAULT_MEMORY_MB
    constraints: Mapping[str, str] = EMPTY

    def __post_init__(self) -> None:
        object.__setattr__(self, "constraints", FrozenMap(self.constraints))


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything one evaluation looks at. Order does not matter: the planner sorts."""

    hosts: tuple[Host, ...] = ()
    desired: tuple[Desired, ...] = ()
    jobs: tuple[JobInfo, ...] = ()
    one_offs: tuple[OneOff, ...] = ()


def inputs_from_state(state: State, hosts: Iterable[Host], now_ms: int) -> Inputs:
    """Build the planner's inputs from a replica's state and the membership view.

    `now_ms` bounds the exit times hosts report: a host whose clock runs ahead must
    not push a crashed job's restart into the future.
    """
    releases: dict[str, Release | None] = {}

    def release(release_id: str) -> Release | None:
        if release_id not in releases:
            releases[release_id] = state.record(Release, release_id)
        return releases[release_id]

    def spec(release_id: str, ptype: str) -> ProcessSpec | None:
        r = release(release_id)
        return None if r is None else r.processes.get(ptype)

    def memory(release_id: str, ptype: str) -> int:
        s = spec(release_id, ptype)
        return DEFAULT_MEMORY_MB if s is None else s.memory_mb

    hosts = tuple(hosts)
    apps = {a.id: a for a in state.records(App)}
    desired = [
        _desired(
            f, ptype, release(f.release_id), spec(f.release_id, ptype), apps.get(f.app_id),
            slug_hosts(state, release(f.release_id), hosts),
        )
        for f in state.records(Formation)
        for ptype in sorted(f.processes)
    ]  # fmt: skip
    placements = {p.id: p for p in state.records(Placement)}
    records = {j.id: j for j in state.records(Job)}
    # A one-off its host refused (placed by a deposed leader) was never run: it is
    # placed again, as if it had never been.
    fenced = {j.id for j in records.values() if j.one_off and is_fenced(j)}
    jobs = []
    for job_id in sorted((placements.keys() | records.keys()) - fenced):
        p, j = placements.get(job_id), records.get(job_id)
        seen = effective_state(p, j)
        job_state = "starting" if seen == "pending" else seen  # (the planner's vocabulary)
        if j is not None and job_state is not None:
            mem = p.memory_mb if p is not None and p.memory_mb else memory(j.release_id, j.process_type)
            jobs.append(_job_info(j, job_state, mem, now_ms))
        elif p is not None and p.action == "start":  # placed, not reported yet
            jobs.append(
                JobInfo(
                    id=p.id,
                    app=p.app_id,
                    release=p.release_id,
                    type=p.process_type,
                    host=p.host,
                    state="starting",
                    created_at=p.created_at,
                    memory_mb=p.memory_mb or memory(p.release_id, p.process_type),
                    one_off=p.one_off,
                )
            )
    formations = {f.app_id: f for f in state.records(Formation)}
    one_offs = tuple(
        OneOff(
            id=r.id,
            app=r.app_id,
            release=r.release_id,
            type=r.process_type,
            memory_mb=r.memory_mb,
            constraints=formations[r.app_id].tags if r.app_id in formations else EMPTY,
        )
        for r in state.records(RunRequest)
        if r.id not in placements or r.id in fenced  # placed once, never again (unless refused)
    )
    return Inputs(hosts=hosts, desired=tuple(desired), jobs=tuple(jobs), one_offs=one_offs)


def slug_hosts(state: State, release: Release | None, hosts: Iterable[Host]) -> frozenset[str]:
    """The hosts that hold `release`'s slug (their `BlobLocation` of its digest)."""
    artifact = state.record(Artifact, release.artifacts[0]) if release and release.artifacts else None
    if artifact is None or artifact.type != "slug" or artifact.digest is None:
        return frozenset()
    digest = artifact.digest
    return frozenset(h.name for h in hosts if state.record(BlobLocation, f"{digest}@{h.name}"))


def slug_built_on(release: Release | None, holders: frozenset[str]) -> str | None:
    """The holder of `release`'s slug that built it (and so has it unpacked), if known."""
    built = release.meta.get(BUILT_ON) if release is not None else None
    return built if built in holders else None


def _desired(
    f: Formation, ptype: str, release: Release | None, spec: ProcessSpec | None, app: App | None,
    slug_on: frozenset[str] = frozenset(),
) -> Desired:  # fmt: skip
    count = f.processes[ptype]
    omni = False if spec is None else spec.omni
    strategy = REPLACE if omni or app is None else effective_strategy(app.strategy, f.processes)
    hold = None
    if release is None:
        hold = f"release {f.release_id} has not reached this node yet"
    elif spec is None and count > 0:
        hold = f"release {f.release_id} has no process type {ptype}"
    return Desired(
        app=f.app_id,
        release=f.release_id,
        type=ptype,
        count=count,
        memory_mb=DEFAULT_MEMORY_MB if spec is None else spec.memory_mb,
        omni=omni,
        constraints=f.constraints_of(ptype),
        hold=hold,
        strategy=strategy,
        slug_hosts=slug_on,
        slug_built_on=slug_built_on(release, slug_on),
    )


def _job_info(j: Job, state: str, memory_mb: int, now_ms: int) -> JobInfo:
    # `updated_at` of a crashed job is its exit time; `up_since` when that run
    # passed its health check (None: it never did, so no backoff reset).
    return JobInfo(
        id=j.id,
        app=j.app_id,
        release=j.release_id,
        type=j.process_type,
        host=j.host,
        state=state,
        created_at=j.created_at,
        memory_mb=memory_mb,
        restarts=j.restarts,
        exited_at=min(j.updated_at, now_ms) if state == "crashed" else None,
        up_since=j.up_since,
        one_off=j.one_off,
    )
