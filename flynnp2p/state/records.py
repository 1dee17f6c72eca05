"""The typed records held in the replicated state.

Theory of operation
-------------------
Each kind of record is a frozen, hashable dataclass with a ``KIND`` (its table in
the state), a ``key`` (its identity within that table) and a schema ``VERSION``.
Fields are validated on construction (see `schema`), so holding a record means
holding a valid one. ``to_wire()`` gives a plain dict carrying ``"v"``, the schema
version; ``from_wire()`` refuses unknown versions (`SchemaVersionError`), unknown
fields and bad values (`RecordError`, naming the field and what is accepted).

Who writes what (this is what keeps last-writer-wins safe):

* `App`, `Route`, `Certificate`: any node, through the API; names and TCP ports
  that must be unique are allocated by the leader.
* `Release`, `Artifact`: immutable, UUID or content addressed, never conflict.
* `Formation`: one per app (key = app id): the release the app should run and how
  many processes of each type; a deploy is a formation write naming a new release.
* `Placement`: written by the leader only, fenced by its ``epoch``.
* `Job`, `BlobLocation`: written only by the node they live on.
* `Repo`: one per app (key = app id), written by the leader after an accepted
  ``git push``; its ``generation`` is taken from etcd by compare-and-swap, so a
  push built on a stale repository never overwrites a newer one.

Changing a record's shape means a new VERSION; old versions stay readable by
listing them in ``READS`` and upgrading in ``from_wire``.

(No ``from __future__ import annotations`` here: the checks live in ``Annotated``
metadata, which must be evaluated when the classes are created.)
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, ClassVar, Self

from flynnp2p import vocab
from flynnp2p.state.errors import RecordError, SchemaVersionError
from flynnp2p.state.jobs import REPORTED
from flynnp2p.state.schema import EMPTY, Bool, Choice, Dict, Int, Nested, Opt, Schema, Seq, Str

# Names and keys: the one vocabulary (flynnp2p.vocab), as field checks.
ID = Str.of(vocab.ID)
APP_NAME = Str.of(vocab.APP_NAME)
PROCESS_TYPE = Str.of(vocab.PROCESS_TYPE)
NODE = Str.of(vocab.NODE_NAME)
LABEL = Str.of(vocab.LABEL)
TEXT = Str(None, "a string of up to 4096 characters", max_len=4096, min_len=0)
ENV_VALUE = Str(None, "a string of up to 32768 characters", max_len=32768, min_len=0)
ENV = Dict(Str.of(vocab.ENV_NAME), ENV_VALUE)
META = Dict(LABEL, TEXT)
TIMESTAMP = Int(0, 2**63 - 1)
DOMAIN = Str.of(vocab.DOMAIN)
PATH = Str.of(vocab.PATH)
PORT = Int(1, 65535)
STRATEGIES = ("auto", "all-at-once", "one-by-one")
PEM = Str(r"-----BEGIN [A-Z0-9 ]+-----\n[\s\S]+", "a PEM block", max_len=65536)


class Record(Schema):
    """Base of every record kind."""

    __slots__ = ()
    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1
    READS: ClassVar[frozenset[int]] = frozenset({1})

    @property
    def key(self) -> str:
        """Identity of the record within its kind."""
        raise NotImplementedError

    def to_wire(self) -> dict[str, object]:
        return {"v": self.VERSION, **Schema.to_wire(self)}

    @classmethod
    def from_wire(cls, wire: object) -> Self:
        if not isinstance(wire, Mapping):
            raise RecordError(cls.KIND, f"expected a map, got {type(wire).__name__}")
        version = wire.get("v")
        if version not in cls.READS or type(version) is not int:
            raise SchemaVersionError(
                f"{cls.KIND}.v",
                f"unknown schema version {version!r}; this node reads {sorted(cls.READS)}",
            )
        return cls.decode_fields(cls.KIND, wire, skip=frozenset({"v"}))


class IdRecord(Record):
    """A record whose key is its ``id`` field."""

    __slots__ = ()
    id: str  # declared by each kind, with its check

    @property
    def key(self) -> str:
        return self.id


@dataclass(frozen=True, slots=True)
class App(IdRecord):
    """An app and its settings (``flynnp2p app set``).

    ``strategy``: how a new release replaces the running one; "auto" is
    one-by-one once the app runs 2 or more web jobs, else all-at-once.
    ``deploy_timeout_s``: how long a deploy's new jobs have to become healthy
    before the previous release is restored. ``build_memory_mb`` and
    ``build_timeout_s``: the limits of the app's builds.
    """

    KIND: ClassVar[str] = "app"
    VERSION: ClassVar[int] = 2  # 2: "auto" strategy, deploy and build limits
    READS: ClassVar[frozenset[int]] = frozenset({1, 2})
    id: Annotated[str, ID]
    name: Annotated[str, APP_NAME]
    created_at: Annotated[int, TIMESTAMP]
    meta: Annotated[Mapping[str, str], META] = EMPTY
    strategy: Annotated[str, Choice(*STRATEGIES)] = "auto"
    deploy_timeout_s: Annotated[int, Int(5, 3600)] = 120
    build_memory_mb: Annotated[int, Int(128, 65536)] = 1024
    build_timeout_s: Annotated[int, Int(10, 86400)] = 900


@dataclass(frozen=True, slots=True)
class HealthCheck(Schema):
    type: Annotated[str, Choice("tcp", "http")] = "tcp"
    path: Annotated[str | None, Opt(PATH)] = None
    interval_ms: Annotated[int, Int(100, 3_600_000)] = 5_000
    timeout_ms: Annotated[int, Int(100, 600_000)] = 2_000
    threshold: Annotated[int, Int(1, 100)] = 1

    def validate(self, path: str) -> None:
        if (self.type == "http") != (self.path is not None):
            raise RecordError(f"{path}.path", "required for http checks and only for them")


@dataclass(frozen=True, slots=True)
class ProcessSpec(Schema):
    command: Annotated[str, Str(None, "a command of 1 to 4096 characters", max_len=4096)]
    ports: Annotated[tuple[int, ...], Seq(Int(0, 65535), max_items=16)] = ()
    health_check: Annotated[HealthCheck | None, Opt(Nested(HealthCheck))] = None
    memory_mb: Annotated[int, Int(16, 1_048_576)] = 512
    omni: Annotated[bool, Bool()] = False


@dataclass(frozen=True, slots=True)
class Release(IdRecord):
    KIND: ClassVar[str] = "release"
    id: Annotated[str, ID]
    app_id: Annotated[str, ID]
    created_at: Annotated[int, TIMESTAMP]
    artifacts: Annotated[tuple[str, ...], Seq(ID, max_items=8)] = ()
    env: Annotated[Mapping[str, str], ENV] = EMPTY
    processes: Annotated[
        Mapping[str, ProcessSpec], Dict(PROCESS_TYPE, Nested(ProcessSpec), max_items=64)
    ] = EMPTY
    meta: Annotated[Mapping[str, str], META] = EMPTY
    # v1, v2, ... per app, as Heroku numbers them (0: made before numbering);
    # the leader takes each number from etcd by compare-and-swap.
    version: Annotated[int, Int(0)] = 0


# A release's meta key: the node that built its slug and unpacked it there for jobs
# (a job placed there starts without fetching or unpacking it: `scheduler.rank`).
BUILT_ON = "build.node"


@dataclass(frozen=True, slots=True)
class Artifact(IdRecord):
    KIND: ClassVar[str] = "artifact"
    id: Annotated[str, ID]
    type: Annotated[str, Choice("slug", "docker")]
    uri: Annotated[str, Str(r"[a-z][a-z0-9+.-]*:\S+", "a URI without spaces", max_len=2048)]
    created_at: Annotated[int, TIMESTAMP]
    digest: Annotated[str | None, Opt(Str.of(vocab.DIGEST))] = None
    size: Annotated[int | None, Opt(Int(0))] = None
    meta: Annotated[Mapping[str, str], META] = EMPTY

    def validate(self, path: str) -> None:
        if self.type == "slug" and self.digest is None:
            raise RecordError(f"{path}.digest", "required for slugs (they are content addressed)")


@dataclass(frozen=True, slots=True)
class Formation(Record):
    """What an app should run: a release, a count per process type, and the host
    tags each type needs (``constraints[type]``, else ``tags`` for every type)."""

    KIND: ClassVar[str] = "formation"
    VERSION: ClassVar[int] = 2
    READS: ClassVar[frozenset[int]] = frozenset({1, 2})
    app_id: Annotated[str, ID]
    release_id: Annotated[str, ID]
    updated_at: Annotated[int, TIMESTAMP]
    processes: Annotated[Mapping[str, int], Dict(PROCESS_TYPE, Int(0, 10_000), 64)] = EMPTY
    tags: Annotated[Mapping[str, str], META] = EMPTY
    constraints: Annotated[
        Mapping[str, Mapping[str, str]], Dict(PROCESS_TYPE, META, max_items=64)
    ] = EMPTY

    def constraints_of(self, ptype: str) -> Mapping[str, str]:
        return self.constraints.get(ptype, self.tags)

    @property
    def key(self) -> str:
        return self.app_id


@dataclass(frozen=True, slots=True)
class Route(IdRecord):
    KIND: ClassVar[str] = "route"
    VERSION: ClassVar[int] = 2  # 2: https_only
    READS: ClassVar[frozenset[int]] = frozenset({1, 2})
    id: Annotated[str, ID]
    app_id: Annotated[str, ID]
    type: Annotated[str, Choice("http", "tcp")]
    created_at: Annotated[int, TIMESTAMP]
    domain: Annotated[str | None, Opt(DOMAIN)] = None
    path: Annotated[str, PATH] = "/"
    port: Annotated[int | None, Opt(PORT)] = None
    process_type: Annotated[str, PROCESS_TYPE] = "web"
    sticky: Annotated[bool, Bool()] = False
    certificate_id: Annotated[str | None, Opt(ID)] = None
    https_only: Annotated[bool, Bool()] = False  # plain HTTP is answered 308 to https

    def validate(self, path: str) -> None:
        if self.type == "http":
            if self.domain is None:
                raise RecordError(f"{path}.domain", "required for http routes")
            if self.port is not None:
                raise RecordError(f"{path}.port", "only tcp routes have a port")
        else:
            if self.port is None:
                raise RecordError(f"{path}.port", "required for tcp routes")
            if self.domain is not None or self.path != "/" or self.certificate_id is not None:
                raise RecordError(f"{path}.type", "tcp routes take no domain, path or certificate")
            if self.https_only or self.sticky:
                raise RecordError(f"{path}.type", "tcp routes are neither https_only nor sticky")


JOB_STATES = REPORTED  # the lifecycle's reported states (`flynnp2p.state.jobs`)


@dataclass(frozen=True, slots=True)
class Job(IdRecord):
    """A job as the host that runs it reports it (written by that host only).

    pending: placed, its artifact is being fetched; starting: running, its health
    check has not passed yet; up; crashed: exited by itself (a one-off: exited
    non-zero), waiting for the leader to restart it; stopping; down: stopped, or a
    one-off that exited 0. ``generation`` is the placement generation this run
    answers (see `Placement`), ``up_since`` when this run passed its health check.
    """

    KIND: ClassVar[str] = "job"
    VERSION: ClassVar[int] = 2
    READS: ClassVar[frozenset[int]] = frozenset({1, 2})
    id: Annotated[str, ID]
    app_id: Annotated[str, ID]
    release_id: Annotated[str, ID]
    process_type: Annotated[str, PROCESS_TYPE]
    host: Annotated[str, NODE]
    state: Annotated[str, Choice(*JOB_STATES)]
    created_at: Annotated[int, TIMESTAMP]
    updated_at: Annotated[int, TIMESTAMP]
    address: Annotated[str | None, Opt(Str.of(vocab.ADDRESS))] = None
    exit_code: Annotated[int | None, Opt(Int(-255, 255))] = None
    restarts: Annotated[int, Int(0, 2**31)] = 0
    one_off: Annotated[bool, Bool()] = False
    generation: Annotated[int, Int(0, 2**31)] = 0
    up_since: Annotated[int | None, Opt(TIMESTAMP)] = None
    reason: Annotated[str | None, Opt(TEXT)] = None


@dataclass(frozen=True, slots=True)
class Placement(IdRecord):
    """The leader's decision that `host` should start (or stop) job `id`.

    The leader restarts a crashed job in place by bumping ``generation``
    (``restarts`` is the count the backoff goes by; it starts over after a run
    stayed up 5 minutes), and stops one by rewriting the placement with action
    "stop" and a ``reason``. ``args`` and ``env`` are a one-off's command line and extra
    environment. Hosts ignore a new placement from an epoch older than the newest
    they have seen (see ``host.runner``).
    """

    KIND: ClassVar[str] = "placement"
    VERSION: ClassVar[int] = 2
    READS: ClassVar[frozenset[int]] = frozenset({1, 2})
    id: Annotated[str, ID]
    app_id: Annotated[str, ID]
    release_id: Annotated[str, ID]
    process_type: Annotated[str, PROCESS_TYPE]
    host: Annotated[str, NODE]
    action: Annotated[str, Choice("start", "stop")]
    epoch: Annotated[int, Int(0)]
    created_at: Annotated[int, TIMESTAMP]
    args: Annotated[tuple[str, ...], Seq(TEXT, max_items=256)] = ()
    one_off: Annotated[bool, Bool()] = False
    generation: Annotated[int, Int(0, 2**31)] = 0
    restarts: Annotated[int, Int(0, 2**31)] = 0
    reason: Annotated[str | None, Opt(TEXT)] = None
    env: Annotated[Mapping[str, str], ENV] = EMPTY
    memory_mb: Annotated[int | None, Opt(Int(16, 1_048_576))] = None  # a one-off's own size


@dataclass(frozen=True, slots=True)
class RunRequest(IdRecord):
    """A one-off job asked for through the API (`flynnp2p run`); the leader places it
    under this id. ``args`` is the command line (run with ``bash -c`` when it is
    one element, else exec'd word by word after quoting)."""

    KIND: ClassVar[str] = "run"
    id: Annotated[str, ID]
    app_id: Annotated[str, ID]
    release_id: Annotated[str, ID]
    args: Annotated[tuple[str, ...], Seq(TEXT, max_items=256)]
    created_at: Annotated[int, TIMESTAMP]
    env: Annotated[Mapping[str, str], ENV] = EMPTY
    memory_mb: Annotated[int, Int(16, 1_048_576)] = 512
    process_type: Annotated[str, PROCESS_TYPE] = "run"

    def validate(self, path: str) -> None:
        if not self.args:
            raise RecordError(f"{path}.args", "a command of at least one word is required")


@dataclass(frozen=True, slots=True)
class Blocked(Record):
    """Jobs the leader could not place, and why (key: app/type, or a one-off's id).

    Written by the leader after each evaluation that changes them; deleted once the
    jobs are placed. ``count`` 0 means an omni type that fits no host at all.
    """

    KIND: ClassVar[str] = "blocked"
    app_id: Annotated[str, ID]
    process_type: Annotated[str, PROCESS_TYPE]
    count: Annotated[int, Int(0, 1_000_000)]
    reasons: Annotated[tuple[str, ...], Seq(TEXT, max_items=32)]
    epoch: Annotated[int, Int(0)]
    updated_at: Annotated[int, TIMESTAMP]
    job_id: Annotated[str | None, Opt(ID)] = None

    @property
    def key(self) -> str:
        return self.job_id or f"{self.app_id}/{self.process_type}"


@dataclass(frozen=True, slots=True)
class Certificate(IdRecord):
    KIND: ClassVar[str] = "certificate"
    id: Annotated[str, ID]
    domains: Annotated[tuple[str, ...], Seq(DOMAIN, max_items=100)]
    cert_pem: Annotated[str, PEM]
    key_pem: Annotated[str, PEM]
    created_at: Annotated[int, TIMESTAMP]

    def validate(self, path: str) -> None:
        if not self.domains:
            raise RecordError(f"{path}.domains", "at least one domain is required")


@dataclass(frozen=True, slots=True)
class BlobLocation(Record):
    """Node `node` holds a copy of the blob `digest` (written by that node only)."""

    KIND: ClassVar[str] = "blob"
    digest: Annotated[str, Str.of(vocab.DIGEST)]
    node: Annotated[str, NODE]
    size: Annotated[int, Int(0)]
    created_at: Annotated[int, TIMESTAMP]

    @property
    def key(self) -> str:
        return f"{self.digest}@{self.node}"


@dataclass(frozen=True, slots=True)
class ClusterConfig(Record):
    """Settings fixed when the cluster is created (one record, key "config")."""

    KIND: ClassVar[str] = "cluster"
    VERSION: ClassVar[int] = 2  # 2: the TCP route port range
    READS: ClassVar[frozenset[int]] = frozenset({1, 2})
    domain: Annotated[str, DOMAIN]
    created_at: Annotated[int, TIMESTAMP]
    # `route add tcp` without a port takes the lowest free one of this range.
    tcp_port_min: Annotated[int, PORT] = 3000
    tcp_port_max: Annotated[int, PORT] = 3500

    def validate(self, path: str) -> None:
        if self.tcp_port_min > self.tcp_port_max:
            raise RecordError(f"{path}.tcp_port_max", "must not be below tcp_port_min")

    @property
    def key(self) -> str:
        return "config"


GIT_REF = Str.of(vocab.GIT_REF)
GIT_OID = Str.of(vocab.GIT_OID)
MAX_MANIFEST_REFS = 64


@dataclass(frozen=True, slots=True)
class Repo(Record):
    """The newest saved git repository of an app, in the blobstore: a `git bundle`
    of all its refs (``digest``; None when the repository has no refs), then the
    ``increments`` pushed since (bundles of the objects each push added, applied
    in order), with ``refs`` the exact refs they add up to (empty: the base
    bundle's refs are exact); the ``generation`` etcd gave it (1 for the first
    push), and when it was saved."""

    KIND: ClassVar[str] = "repo"
    app_id: Annotated[str, ID]
    generation: Annotated[int, Int(1)]
    updated_at: Annotated[int, TIMESTAMP]
    digest: Annotated[str | None, Opt(Str.of(vocab.DIGEST))] = None
    size: Annotated[int, Int(0)] = 0
    increments: Annotated[tuple[str, ...], Seq(Str.of(vocab.DIGEST), max_items=16)] = ()
    refs: Annotated[Mapping[str, str], Dict(GIT_REF, GIT_OID, MAX_MANIFEST_REFS)] = EMPTY

    def validate(self, path: str) -> None:
        if self.increments and (self.digest is None or not self.refs):
            raise RecordError(f"{path}.increments", "come after a base bundle, with the refs")

    @property
    def key(self) -> str:
        return self.app_id

    @property
    def blobs(self) -> tuple[str, ...]:
        """The bundles to apply, base first."""
        return (self.digest, *self.increments) if self.digest is not None else ()


DEPLOY_STATUSES = ("running", "complete", "failed", "rolled-back")


@dataclass(frozen=True, slots=True)
class Deployment(IdRecord):
    """One move of an app's formation to a new release, and how it ended.

    Written by the leader with the formation write that names ``new_release_id``
    (`flynnp2p.api.ops.deployment_changes`), as "running"; its deploy watcher
    (`flynnp2p.scheduler.watcher`) then marks it "complete" once only the new
    release's jobs run and are up, or "failed" (a new job crashed, or was not
    up within the app's ``deploy_timeout_s``: ``reason``, ``failed_job_id``),
    "rolled-back" when it then moved the formation back to ``old_release_id``.
    ``strategy`` is the effective one (never "auto").
    """

    KIND: ClassVar[str] = "deployment"
    id: Annotated[str, ID]
    app_id: Annotated[str, ID]
    new_release_id: Annotated[str, ID]
    strategy: Annotated[str, Choice("all-at-once", "one-by-one")]
    status: Annotated[str, Choice(*DEPLOY_STATUSES)]
    created_at: Annotated[int, TIMESTAMP]
    old_release_id: Annotated[str | None, Opt(ID)] = None
    finished_at: Annotated[int | None, Opt(TIMESTAMP)] = None
    reason: Annotated[str | None, Opt(TEXT)] = None
    failed_job_id: Annotated[str | None, Opt(ID)] = None

    def validate(self, path: str) -> None:
        if (self.status == "running") != (self.finished_at is None):
            raise RecordError(f"{path}.finished_at", "set exactly when the deployment is finished")


# -- the build cache (issue 11 part 3) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class BuildCache(Record):
    """The newest saved build cache of an app: a gzipped tar of its CACHE_DIR in the
    blobstore (``digest``, ``size`` bytes), packed by ``node`` after a build that
    succeeded there (`flynnp2p.build.cache`). One per app; the newest write wins
    (pushes to one app are serialised, so two builds never race to write it)."""

    KIND: ClassVar[str] = "buildcache"
    app_id: Annotated[str, ID]
    digest: Annotated[str, Str.of(vocab.DIGEST)]
    size: Annotated[int, Int(0)]
    node: Annotated[str, NODE]
    updated_at: Annotated[int, TIMESTAMP]

    @property
    def key(self) -> str:
        return self.app_id


RECORD_TYPES: tuple[type[Record], ...] = (
    App, Release, Artifact, Formation, Route, Job, Placement, RunRequest, Blocked, Certificate,
    BlobLocation, ClusterConfig, Repo, Deployment, BuildCache,
)  # fmt: skip
KINDS: Mapping[str, type[Record]] = {cls.KIND: cls for cls in RECORD_TYPES}
KIND_CHOICES = ", ".join(sorted(KINDS))


def decode_record(kind: str, wire: object) -> Record:
    """Decode the wire form of a record of `kind`."""
    cls = KINDS.get(kind)
    if cls is None:
        raise RecordError("kind", f"unknown kind {kind!r}; accepted: {KIND_CHOICES}")
    return cls.from_wire(wire)
