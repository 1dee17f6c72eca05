"""The node agent: boot order of one flynnp2p node.

    api sockets bound (fail fast on a taken port)
    → gossip (serf child + RPC + membership view)
    → node identity saved (only once the join has succeeded)
    → API served, state copied from peers, blobs, logs, jobs
    → etcd member (bootstrapped, restarted or joined as a learner) and the election
    → leader duties (catch-up and claims, scheduler, etcd autopilot)
    … until SIGINT/SIGTERM: jobs drained and stopped, graceful serf leave, children stopped.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import trio

import flynnp2p
from flynnp2p.api.app import create_app
from flynnp2p.api.apps import AppsApi, apps_blueprint
from flynnp2p.api.blobs import blobs_blueprint
from flynnp2p.api.coord import coord_blueprint
from flynnp2p.api.internal import internal_blueprint
from flynnp2p.api.jobs import jobs_blueprint
from flynnp2p.api.logs import LogFanout, internal_log_blueprint, logs_blueprint
from flynnp2p.api.router import router_blueprint
from flynnp2p.api.server import ApiServer
from flynnp2p.build.blobs import BlobService
from flynnp2p.build.blobstore import BlobStore
from flynnp2p.config import (
    NodeConfig,
    coord_dead_after_s,
    etcd_binary,
    job_drain_delay_s,
    job_stop_grace_s,
    save_node,
    serf_binary,
    state_gc_interval_s,
)
from flynnp2p.coord.ca import ClusterCA
from flynnp2p.coord.claims import Claims
from flynnp2p.coord.client import CoordError
from flynnp2p.coord.election import LeaderElection, LeaderView
from flynnp2p.coord.member import EtcdSettings
from flynnp2p.coord.service import Coord
from flynnp2p.errors import ClusterError, ConfigError
from flynnp2p.gossip.codec import SerfError
from flynnp2p.gossip.heartbeat import Heartbeats
from flynnp2p.gossip.peers import GossipPeers
from flynnp2p.gossip.ping import UdpPinger
from flynnp2p.gossip.serf_agent import SerfSettings, free_port
from flynnp2p.gossip.service import Gossip
from flynnp2p.gossip.tags import role_list, serf_names, serf_tags, user_tags
from flynnp2p.host.backend import JobBackend
from flynnp2p.host.loghub import LogHub
from flynnp2p.host.ports import PortAllocator
from flynnp2p.host.process import ProcessBackend
from flynnp2p.host.runner import HostRunner
from flynnp2p.leader import LeaderDuties
from flynnp2p.netaddr import url_host
from flynnp2p.router.feed import feed_routes
from flynnp2p.router.service import Router
from flynnp2p.router.table import RouteTable
from flynnp2p.scheduler.service import Scheduler, hosts_from_members
from flynnp2p.state.errors import StoreError
from flynnp2p.state.records import ClusterConfig
from flynnp2p.state.service import Peer, StateService
from flynnp2p.state.store import SqliteStore
from flynnp2p.token import ClusterToken
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

CLAIM_SWEEP_S = 30.0
CATCH_UP_S = 3.0


def memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def docker_available() -> bool:
    """Whether a Docker engine answers here (for --backend auto)."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no socket, no permission, no engine: all mean "no"
        return False


def now_ms() -> int:
    return int(time.time() * 1000)


async def _start_listening(
    nursery: trio.Nursery, run: Callable[..., Awaitable[object]], what: str, option: str
) -> None:
    """Start a service that binds a port; a port it cannot bind is a configuration error."""
    try:
        await nursery.start(run)
    except OSError as exc:
        raise ConfigError(f"{what} cannot be used ({exc.strerror}; choose {option})") from None




class Agent:
    def __init__(
        self, cfg: NodeConfig, token: ClusterToken, peers: list[str], *, fresh: bool
    ) -> None:
        self.cfg = cfg
        self.token = token
        self.fresh = fresh
        self.started_ms = now_ms()
        self.ready = False
        self.api_url = f"http://{url_host(cfg.addr)}:{cfg.api_port}"
        settings = SerfSettings(
            node_name=cfg.name,
            bind_addr=cfg.addr,
            bind_port=cfg.gossip_port,
            rpc_addr="127.0.0.1",
            rpc_port=free_port("127.0.0.1"),
            rpc_auth=token.api_key,
            encrypt_key_b64=token.gossip_key_b64,
            data_dir=cfg.data_dir,
            tags=self._tags(),
            binary=serf_binary(),
        )
        self.gossip = Gossip(settings, peers)
        # Node-to-node requests (state push/pull, blob copies, log fan-out,
        # forwarding) present the peer credential: /v1/internal/* takes nothing else.
        self.http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token.peer_key}"},
            # A peer behind a partition drops SYNs: give up on it in 2 s, not 10.
            timeout=httpx.Timeout(10.0, connect=2.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        # What must be decided once: etcd (one member on scheduler-role nodes).
        self.ca = ClusterCA(token.cluster_id, token.admin_secret)
        etcd = EtcdSettings(
            name=cfg.name, addr=cfg.addr, peer_port=cfg.coord_peer_port,
            client_port=cfg.coord_client_port, data_dir=cfg.data_dir,
            cluster_token=token.cluster_id_hex,
        )  # fmt: skip
        self.coord = Coord(
            etcd, self.ca, self.http, self._scheduler_peer_apis,
            enabled="scheduler" in cfg.roles, bootstrap=fresh and not peers,
            binary=etcd_binary(), voters_wanted=cfg.coord_voters,
            dead_after_s=coord_dead_after_s(),
        )  # fmt: skip
        self.election = LeaderElection(
            self.coord.client, cfg.name, self.api_url[len("http://"):], is_voter=self.coord.is_voter
        )
        self.duties = LeaderDuties(self.election.leadership)
        self.duties.add(lambda _epoch: self.coord.autopilot(self._serf_statuses))
        # Which alive members stopped answering (what the API shows; not replicated).
        # Pings are UDP datagrams on the API's address and port number (HTTP
        # heartbeats cost ~1.5 % of a core per node at three nodes).
        self.pinger = UdpPinger(token.peer_key, cfg.addr, cfg.api_port)
        self.heartbeats = Heartbeats(
            GossipPeers(self.gossip).alive_peers, self.pinger
        )
        try:
            store = SqliteStore(cfg.data_dir / "state", cfg.name)
        except StoreError as exc:
            raise ConfigError(f"cannot open the state store: {exc}") from None
        self.state = StateService(
            store, GossipPeers(self.gossip), self.http, now_ms, state_gc_interval_s()
        )
        # Content-addressed files; their locations live in the replicated state.
        self.blobs = BlobService(
            BlobStore(cfg.data_dir / "blobs"), self.state, GossipPeers(self.gossip),
            self.http, cfg.name, now_ms,
        )
        self.caught_up: Watched[int] = Watched(-1)  # the term whose catch-up is done
        self.duties.add(self._leader_catch_up)
        self.scheduler = Scheduler(
            self.state,
            lambda: hosts_from_members(self.gossip.view.value.members),
            self.gossip.view,
            now_ms,
            lambda epoch: self.caught_up.value == epoch,
        )
        self.duties.add(self.scheduler.duty)
        # Jobs: what the leader placed here runs on this node's backend.
        jobs_dir = cfg.data_dir / "jobs"
        self.loghub = LogHub(jobs_dir / "logs")
        self.backend: JobBackend | None = None
        self.runner: HostRunner | None = None
        if "host" in cfg.roles:
            self.backend = self._make_backend(jobs_dir)
            lo, hi = cfg.port_range()
            self.runner = HostRunner(
                cfg.name, cfg.addr, self.state, self.backend, self.blobs,
                PortAllocator(lo, hi, ("0.0.0.0",)),
                lambda: max(self.gossip.view.value.max_epoch, self.election.view.value.epoch),
                now_ms, jobs_dir,
                stop_grace_s=job_stop_grace_s(), drain_delay_s=job_drain_delay_s(cfg.drain_delay_s),
            )  # fmt: skip
        self.fanout = LogFanout(
            self.http, GossipPeers(self.gossip).alive_peers, Peer(cfg.name, self.api_url[7:])
        )
        # The router: every node proxies every app's routes to its jobs anywhere.
        self.routes: Watched[RouteTable] = Watched(RouteTable.build([], {}))
        self.router = Router(self.routes, address=cfg.addr, http_port=cfg.http_port)
        app = create_app(self)
        apps_api = AppsApi(self, slug_path=self.blobs.local_path, http=self.http)
        app.register_blueprint(internal_blueprint(self.state))
        app.register_blueprint(internal_log_blueprint(self.loghub))
        app.register_blueprint(apps_blueprint(self, api=apps_api))
        app.register_blueprint(jobs_blueprint(self, apps_api, self.heartbeats.unresponsive))
        app.register_blueprint(logs_blueprint(self, self.fanout))
        app.register_blueprint(blobs_blueprint(self.blobs))
        app.register_blueprint(coord_blueprint(self.coord))
        app.register_blueprint(router_blueprint(self.router))
        self.api = ApiServer(app, cfg.addr, cfg.api_port)

    def _make_backend(self, jobs_dir: Path) -> JobBackend:
        kind = self.cfg.backend
        if kind == "auto":
            kind = "docker" if docker_available() else "process"
        if kind == "docker":
            from flynnp2p.host.docker import DockerBackend

            return DockerBackend(
                jobs_dir, self.cfg.name, on_lines=self.loghub.publish,
                shutdown_grace_s=job_stop_grace_s(),
            )  # fmt: skip
        return ProcessBackend(
            jobs_dir, on_lines=self.loghub.publish, shutdown_grace_s=job_stop_grace_s()
        )

    def _tags(self) -> dict[str, str]:
        c = self.cfg
        tags = {
            "api": f"{url_host(c.addr)}:{c.api_port}",
            "roles": ",".join(c.roles),
            "st": str(self.started_ms),
            "ep": "0",
            "http": str(c.http_port),
            "https": str(c.https_port),
            "mem": str(memory_mb()),
            "v": flynnp2p.__version__,
        }
        tags.update(serf_tags(c.tags))
        return tags

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        sockets = self.api.bind()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_signal, nursery.cancel_scope)
                await nursery.start(self.gossip.run)
                if self.fresh:
                    save_node(self.cfg, self.token)
                # The API serves peers' pulls as soon as it is up; the state
                # service first copies what it lacks from a peer.
                await nursery.start(self.api.run, sockets)
                c = self.cfg
                await _start_listening(
                    nursery, self.pinger.run, f"heartbeat UDP port {c.addr}:{c.api_port}", "--api-port"
                )
                await nursery.start(self.heartbeats.run)
                await nursery.start(self.state.run)
                await nursery.start(self.blobs.run)
                await nursery.start(feed_routes, self.state, self.routes)
                await _start_listening(
                    nursery, self.router.run, f"router HTTP port {c.addr}:{c.http_port}", "--http-port"
                )
                await nursery.start(self.fanout.run)
                if self.backend is not None and self.runner is not None:
                    await nursery.start(self.backend.run)
                    await nursery.start(self.runner.run)
                await nursery.start(self.coord.run)
                await nursery.start(self.election.run)
                nursery.start_soon(self._announce_leadership)
                await nursery.start(self.duties.run)
                self.ready = True
                log.info("node %s is up: API %s", self.cfg.name, self.api_url)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                await self.http.aclose()
                await self.coord.aclose()
            self.state.store.close()

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("%s: leaving the cluster and stopping", signal.Signals(signum).name)
                self.gossip.serf.leave_on_stop = True
                if self.runner is not None:  # the node leaves: its jobs drain and stop first
                    await self.runner.shutdown()
                scope.cancel()
                return

    # -- what the API needs (flynnp2p.api.apps.ClusterContext) ---------------

    @property
    def peer_key(self) -> str:
        return self.token.peer_key

    @property
    def cluster_domain(self) -> str:
        """The domain the cluster was created with (the first leader records it)."""
        config = self.state.state.record(ClusterConfig, "config")
        return config.domain if config is not None else self.cfg.domain

    def is_leader(self) -> bool:
        """Leader, and caught up with every peer (and its claims) since it became one."""
        leading = self.election.leadership.value
        return leading.is_leader and self.caught_up.value == leading.epoch

    async def acting_leader(self) -> bool:
        """Leader and caught up; a node just elected waits (bounded) for its catch-up."""
        with trio.move_on_after(CATCH_UP_S + 2):
            version = self.caught_up.version
            while True:
                leading = self.election.leadership.value
                if not leading.is_leader:
                    return False
                if self.caught_up.value == leading.epoch:
                    return True
                version, _ = await self.caught_up.wait_change(version)
        return self.is_leader()

    async def _leader_catch_up(self, epoch: int) -> None:
        """A new leader first pulls from every peer and makes sure etcd holds a
        claim for every app and route the state holds (after ``cluster recover``,
        or for data from before claims), so that no name it allocates is taken."""
        with trio.move_on_after(CATCH_UP_S):  # peers behind a partition add nothing
            await self.state.catch_up()
        while True:
            try:
                await self._reconcile_claims()
                break
            except CoordError as exc:
                log.warning("leader: cannot reconcile the claims yet: %s", exc)
                await trio.sleep(1)
        self.caught_up.set(epoch)
        config = self.state.state.record(ClusterConfig, "config")
        if config is None:
            await self.state.write([ClusterConfig(domain=self.cfg.domain, created_at=now_ms())])
        elif config.domain != self.cfg.domain:
            log.warning(
                "this cluster's domain is %s; this node's --domain %s is ignored",
                config.domain, self.cfg.domain,
            )
        while True:
            await trio.sleep(CLAIM_SWEEP_S)
            try:
                await self._reconcile_claims()
            except CoordError as exc:
                log.info("claim sweep failed: %s", exc)

    async def _reconcile_claims(self) -> None:
        await Claims(self.coord.client).reconcile(self.state.state, now_ms())

    def claims(self) -> Claims:
        if not self.is_leader():
            raise ClusterError("this node is not the leader (leadership moved); retry")
        return Claims(self.coord.client)

    def leader_view(self) -> LeaderView:
        """Who leads: from etcd where this node has a voter, else from the ring's hint."""
        if self.coord.is_voter():
            return self.election.view.value
        hint = self.gossip.view.value.leader_hint
        if hint is None:
            return LeaderView(None, None, 0, False, "no quorum: no leader is announced to this node")
        member = self.gossip.view.value.member(hint.name)
        api = member.tags.get("api") if member is not None else None
        return LeaderView(hint.name, api, hint.leading, True, f"{hint.name} announces itself as leader")

    def leader_api(self) -> str | None:
        view = self.leader_view()
        return view.api if view.name is not None else None

    async def _announce_leadership(self) -> None:
        version, lead = self.election.leadership.version, self.election.leadership.value
        while True:
            await self.gossip.announce(lead.epoch if lead.is_leader else None)
            version, lead = await self.election.leadership.wait_change(version)

    def _serf_statuses(self) -> dict[str, str]:
        return {m.name: m.status for m in self.gossip.view.value.members}

    def _scheduler_peer_apis(self) -> list[str]:
        view = self.gossip.view.value
        apis = [
            m.tags["api"]
            for m in view.members
            if m.status == "alive" and m.name != view.self_name and m.tags.get("api")
            and "scheduler" in role_list(m.tags)
        ]
        random.shuffle(apis)
        return apis

    def now_ms(self) -> int:
        return now_ms()

    @property
    def node_name(self) -> str:
        return self.cfg.name

    def leader_epoch(self) -> int:
        return self.election.leadership.value.epoch

    async def set_host_tags(self, tags: Mapping[str, str | None]) -> dict[str, str]:
        """Change this host's tags (None removes one): serf tags, and the node file."""
        for key, value in tags.items():
            if value is None:
                self.cfg.tags.pop(key, None)
            else:
                self.cfg.tags[key] = value
        try:
            await self.gossip.set_tags(
                serf_tags({k: v for k, v in tags.items() if v is not None}),
                serf_names(k for k, v in tags.items() if v is None),
            )
        except SerfError as exc:
            raise ClusterError(f"serf did not take the new tags (retry): {exc}") from None
        await trio.to_thread.run_sync(save_node, self.cfg, self.token)
        return dict(self.cfg.tags)

    # -- what the API shows -------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        view = self.gossip.view.value
        leader = self.leader_view().name
        return [
            {
                "name": m.name,
                "addr": m.addr,
                "gossip_port": m.port,
                "status": m.status,
                "roles": role_list(m.tags),
                "api": m.tags.get("api", ""),
                "leader": m.name == leader,
                "tags": user_tags(m.tags),
            }
            for m in view.members
        ]

    def status(self) -> dict[str, Any]:
        e = self.leader_view()
        serf = self.gossip.serf
        leading = self.election.leadership.value
        return {
            "node": {
                "name": self.cfg.name,
                "addr": self.cfg.addr,
                "api": self.api_url,
                "roles": list(self.cfg.roles),
                "started_at_ms": self.started_ms,
                "is_leader": leading.is_leader,
            },
            "cluster_id": self.token.cluster_id_hex,
            "leader": {
                "name": e.name,
                "epoch": e.epoch,
                "quorum": e.quorum,
                "reason": e.reason,
                "alive": sum(m.status == "alive" for m in self.gossip.view.value.members),
                "electorate": sum(
                    m.status in ("alive", "failed") for m in self.gossip.view.value.members
                ),
            },
            "members": self.members(),
            "components": {
                "gossip": {
                    "ok": serf.running,
                    "serf_restarts": serf.restarts,
                    "last_error": serf.last_error,
                },
                "api": {"ok": True},
                "state": {
                    "ok": self.ready and self.state.degraded is None,
                    # Why writes fail here (a full disk), or None; reads go on.
                    "degraded": self.state.degraded,
                    "origin": self.state.origin,
                    "records": len(self.state.state),
                    "tombstones": sum(
                        e.value is None for t in self.state.state.tables.values() for e in t.values()
                    ),
                    "vv": dict(self.state.state.vv),
                    **self.state.stats,
                },
                "blobs": {"ok": self.ready, **self.blobs.stats},
                "coord": self.coord.stats(),
                "leader_duties": {"ok": True, "terms": self.duties.terms},
                "scheduler": dict(self.scheduler.stats),
                "jobs": {
                    "ok": self.runner is not None,
                    "backend": self.backend.name if self.backend else None,
                    "isolation": getattr(self.backend, "isolation", None),
                    "memory_enforced": self.backend.memory_enforced if self.backend else None,
                    "running": len(self.runner.runs) if self.runner else 0,
                    **(self.runner.stats if self.runner else {}),
                },
            },
            "versions": {"flynnp2p": flynnp2p.__version__},
        }
