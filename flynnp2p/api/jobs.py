"""Jobs and hosts: ``ps``, ``kill``, ``run``, ``explain``, ``host list``/``host tag``.

Theory of operation
-------------------
Every read answers from this node's replica: a job is what its host reported
(the `Job` record) merged with what the leader decided (the `Placement`): a
placement not reported yet is ``pending``, a stop placement of a live job is
``stopping``. Jobs the leader could not place come from the `Blocked` records.

``kill`` is a placement write, so it goes to the leader (which stamps its epoch);
the scheduler then replaces the job like any other that stopped. ``run`` writes a
`RunRequest` on any node; the leader places it. Host tags belong to the host:
``PUT /v1/hosts/<name>/tags`` is forwarded to that node, which sets its serf tags
and keeps them in its node file.

A host that serf still calls alive but that has stopped answering this node's
heartbeats (`flynnp2p.gossip.heartbeat`) is shown ``unresponsive`` in the hosts
list, and the jobs it reported pending, starting or up are shown ``lost``: serf
takes 5-7 s to call it failed, and until then its last report is stale.  They
stay ``lost`` once serf calls the host failed, until the leader stops them (then
``down``).  This is this node's own view; the scheduler still acts on serf's.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping

from quart import Blueprint, Response, request

from flynnp2p import vocab
from flynnp2p.api.app import FORWARDED
from flynnp2p.api.apps import AppsApi
from flynnp2p.api.context import JobsContext
from flynnp2p.api.edge import answer, json_body, ref
from flynnp2p.api.ops import current_release, find_app
from flynnp2p.api.render import wire
from flynnp2p.errors import ClusterError, NotFound, UserError
from flynnp2p.state.jobs import ACTIVE, DOWN, LOST, STOP, STOPPING, effective_state, is_finished
from flynnp2p.state.merge import State
from flynnp2p.state.records import (
    ENV,
    TEXT,
    App,
    Blocked,
    Job,
    Placement,
    RunRequest,
)
from flynnp2p.state.schema import Int, Seq
from flynnp2p.vocab import show

_ARGS = Seq(TEXT, max_items=256)
_MEMORY = Int(16, 1_048_576)
NO_SILENT_HOSTS: Callable[[], Mapping[str, float]] = dict


def jobs_of(
    state: State, app: App, include_stopped: bool, alive: Collection[str] | None = None,
    lost_hosts: Mapping[str, str] | None = None,
) -> list[dict[str, object]]:
    """The app's jobs as `ps` shows them, oldest first.

    A job the leader stopped on a host that is not `alive` (failed or gone) is shown
    down: its host cannot report it, and the scheduler has replaced it. A pending,
    starting or up job on one of the `lost_hosts` (name → why) is shown lost."""
    placements = {p.id: p for p in state.records(Placement) if p.app_id == app.id}
    reports = {j.id: j for j in state.records(Job) if j.app_id == app.id}
    out = []
    for job_id in placements.keys() | reports.keys():
        p, j = placements.get(job_id), reports.get(job_id)
        seen = effective_state(p, j)
        if seen is None:
            continue
        row = wire(j) if j is not None else _placed(p)  # type: ignore[arg-type]
        row["state"] = seen
        if p is not None and p.action == STOP:
            if seen == STOPPING and alive is not None and p.host not in alive:
                row["state"], row["reason"] = DOWN, p.reason
            elif seen == DOWN:
                row["reason"] = row.get("reason") or p.reason
        host = str(row["host"])
        if lost_hosts and host in lost_hosts and row["state"] in ACTIVE:
            row["state"], row["reason"] = LOST, lost_hosts[host]
        if is_finished(str(row["state"]), bool(row["one_off"])) and not include_stopped:
            continue
        out.append(row)
    out.sort(key=lambda r: (str(r["process_type"]), int(r["created_at"]), str(r["id"])))  # type: ignore[call-overload]
    return out


def _placed(p: Placement) -> dict[str, object]:
    """The row of a job its host has not reported yet."""
    return {
        "id": p.id, "app_id": p.app_id, "release_id": p.release_id,
        "process_type": p.process_type, "host": p.host, "created_at": p.created_at,
        "updated_at": p.created_at, "one_off": p.one_off, "restarts": p.restarts,
        "reason": None, "address": None, "exit_code": None,
    }  # fmt: skip


def blocked_of(state: State, app: App) -> list[dict[str, object]]:
    return [wire(b) for b in state.records(Blocked) if b.app_id == app.id]


class JobsApi:
    def __init__(
        self, ctx: JobsContext, apps: AppsApi, silent_hosts: Callable[[], Mapping[str, float]]
    ) -> None:
        self.ctx = ctx
        self.apps = apps
        self.silent_hosts = silent_hosts

    async def list_jobs(self, app: str) -> Response:
        state = self.ctx.state.state
        found = find_app(state, ref("app", app))
        include = request.args.get("all", "") in ("1", "true", "yes")
        rows = jobs_of(state, found, include, self._alive(), self._lost_hosts())
        return answer({"jobs": rows, "blocked": blocked_of(state, found)})

    def _alive(self) -> set[str]:
        return {m["name"] for m in self.ctx.members() if m["status"] == "alive"}

    def _lost_hosts(self) -> dict[str, str]:
        """Hosts whose reports are stale: silent to our heartbeats, or failed per serf."""
        silent = self.silent_hosts()
        lost = {}
        for m in self.ctx.members():
            if m["status"] == "alive" and m["name"] in silent:
                lost[m["name"]] = f"host {m['name']} has not answered for {silent[m['name']]:.1f}s"
            elif m["status"] != "alive":
                lost[m["name"]] = f"host {m['name']} is {m['status']}"
        return lost

    async def get_job(self, app: str, job_id: str) -> Response:
        state = self.ctx.state.state
        found = find_app(state, ref("app", app))
        job_id = ref("job", job_id)
        for row in jobs_of(state, found, True, self._alive(), self._lost_hosts()):
            if row["id"] == job_id:
                return answer({"job": row})
        for b in state.records(Blocked):
            if b.app_id == found.id and b.job_id == job_id:
                return answer({"job": None, "blocked": wire(b)})
        raise NotFound(f"app {found.name!r} has no job {job_id!r}")

    async def kill_job(self, app: str, job_id: str) -> Response:
        forwarded = await self.apps.forwarder.via_leader()
        if forwarded is not None:
            return forwarded
        state = self.ctx.state.state
        found = find_app(state, ref("app", app))
        job_id = ref("job", job_id)
        p = state.record(Placement, job_id)
        if p is None or p.app_id != found.id:
            raise NotFound(f"app {found.name!r} has no job {job_id!r} (see 'flynnp2p ps')")
        if p.action == "stop":
            return answer(
                {"job_id": job_id, "state": "stopping", "already": True, "one_off": p.one_off}
            )
        stop = dataclasses.replace(
            p, action="stop", epoch=self.ctx.leader_epoch(), reason="killed by a user"
        )
        result = await self.ctx.state.write([stop])
        return answer(
            {"job_id": job_id, "state": "stopping", "one_off": p.one_off, "replicas": result.replicas}
        )

    async def run_job(self, app: str) -> Response:
        body = await json_body({"args", "env", "memory_mb"}, required={"args"})
        state = self.ctx.state.state
        found = find_app(state, ref("app", app))
        args = _ARGS.decode("run.args", body["args"])
        if not args or not any(a.strip() for a in args):
            raise UserError("run.args: give a command, e.g. [\"python\", \"-c\", \"print(42)\"]")
        env = ENV.decode("run.env", body.get("env", {}))
        memory = _MEMORY.decode("run.memory_mb", body.get("memory_mb", 512))
        release = current_release(state, found)
        if release is None:
            raise UserError(
                f"app {found.name!r} has no release yet: deploy first "
                "(git push, or 'flynnp2p release add --slug app.tgz')"
            )
        job_id = f"run-{secrets.token_hex(8)}"
        req = RunRequest(
            id=job_id, app_id=found.id, release_id=release.id, args=args,
            created_at=self.ctx.now_ms(), env=env, memory_mb=memory,
        )  # fmt: skip
        result = await self.ctx.state.write([req])
        return answer({"job_id": job_id, "release_id": release.id, "replicas": result.replicas}, 201)

    # hosts

    async def list_hosts(self) -> Response:
        state = self.ctx.state.state
        counts: dict[str, int] = {}
        for j in state.records(Job):
            if j.state in ACTIVE:
                counts[j.host] = counts.get(j.host, 0) + 1
        silent = self.silent_hosts()
        hosts = [{**m, "jobs": counts.get(m["name"], 0)} for m in self.ctx.members()]
        for h in hosts:
            # Serf's word stays in "gossip_status"; "status" says what this node sees.
            h["gossip_status"] = h["status"]
            h["silent_s"] = None
            if h["status"] == "alive" and h["name"] in silent:
                h["status"], h["silent_s"] = "unresponsive", round(silent[h["name"]], 1)
        return answer({"hosts": hosts})

    async def tag_host(self, name: str) -> Response:
        body = await json_body({"tags"}, required={"tags"})
        name = ref("host", name)
        raw = body["tags"]
        if not isinstance(raw, dict) or not raw:
            raise UserError("tags: expected a non-empty object {KEY: VALUE or null}")
        tags: dict[str, str | None] = {}
        for key, value in raw.items():
            if not vocab.TAG_KEY.ok(key):
                raise UserError(f"tags: key {show(key)} must be {vocab.TAG_KEY.accepted}")
            if value is not None and not vocab.TAG_VALUE.ok(value):
                raise UserError(
                    f"tags.{key}: expected {vocab.TAG_VALUE.accepted} (or null to remove it), "
                    f"got {show(value)}"
                )
            tags[key] = value
        if name == self.ctx.node_name:
            return answer({"host": name, "tags": await self.ctx.set_host_tags(tags)})
        member = next((m for m in self.ctx.members() if m["name"] == name), None)
        if member is None:
            raise NotFound(f"no host {name!r} in the cluster (see 'flynnp2p host list')")
        if member["status"] != "alive" or not member["api"]:
            raise ClusterError(f"host {name} is {member['status']}: its tags can change once it is back")
        if request.headers.get(FORWARDED):
            raise ClusterError(f"host {name} is not this node; retry")
        return await self.apps.forwarder.to(member["api"], f"host {name}")


def jobs_blueprint(
    ctx: JobsContext, apps: AppsApi,
    silent_hosts: Callable[[], Mapping[str, float]] = NO_SILENT_HOSTS,
) -> Blueprint:
    """The jobs and hosts API; forwarding goes through `apps` (and its transport).

    `silent_hosts` names the hosts that stopped answering heartbeats (with how long
    they have been silent), e.g. `flynnp2p.gossip.heartbeat.Heartbeats.unresponsive`."""
    api = JobsApi(ctx, apps, silent_hosts)
    bp = Blueprint("jobs", __name__)
    rules: tuple[tuple[str, str, Callable[..., Awaitable[Response]]], ...] = (
        ("GET", "/v1/apps/<app>/jobs", api.list_jobs),
        ("POST", "/v1/apps/<app>/jobs", api.run_job),
        ("GET", "/v1/apps/<app>/jobs/<job_id>", api.get_job),
        ("DELETE", "/v1/apps/<app>/jobs/<job_id>", api.kill_job),
        ("GET", "/v1/hosts", api.list_hosts),
        ("PUT", "/v1/hosts/<name>/tags", api.tag_host),
    )
    for method, rule, view in rules:
        bp.add_url_rule(rule, view.__name__, view, methods=[method])
    return bp
