"""The node agent: boot order of one flynnp2p node.

    api sockets bound (fail fast on a taken port)
    → gossip (serf child + RPC + membership view)
    → node identity saved (only once the join has succeeded)
    → API served, state copied from peers, blobs, logs, jobs
    → etcd member (bootstrapped, restarted or joined as a learner) and the election
    → leader duties (catch-up and claims, scheduler, deploy watcher, etcd autopilot)
    … until SIGINT/SIGTERM: jobs drained and stopped, graceful serf leave, children stopped.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

import flynnp2p
from flynnp2p.api.app import create_app
from flynnp2p.api.apps import AppsApi, apps_blueprint
from flynnp2p.api.blobs import blobs_blueprint
from flynnp2p.api.coord import coord_blueprint
from flynnp2p.api.git import GitApi, GitLeaderApi, git_blueprint, git_scratch
from flynnp2p.api.images import ImagesApi, images_blueprint
from flynnp2p.api.internal import internal_blueprint
from flynnp2p.api.jobs import jobs_blueprint
from flynnp2p.api.logs import LogFanout, internal_log_blueprint, logs_blueprint
from flynnp2p.api.router import router_blueprint
from flynnp2p.api.server import ApiServer
from flynnp2p.build.blobs import BlobService
from flynnp2p.build.blobstore import BlobStore
from flynnp2p.build.cache import BuildCaches
from flynnp2p.build.deploy import BuildStep
from flynnp2p.build.hooks import HookServer
from flynnp2p.build.push import LeaderLink, PushLocks
from flynnp2p.build.repo import RepoStore
from flynnp2p.build.reposweep import RepoSweeper
from flynnp2p.config import (
    NodeConfig,
    build_wait_s,
    coord_dead_after_s,
    etcd_binary,
    job_drain_delay_s,
    job_stop_grace_s,
    save_node,
    serf_binary,
    slug_max_mb,
    state_gc_interval_s,
)
from flynnp2p.coord.ca import ClusterCA
from flynnp2p.coord.claims import Claims
from flynnp2p.coord.election import LeaderElection
from flynnp2p.coord.member import EtcdSettings
from flynnp2p.coord.service import Coord
from flynnp2p.errors import ConfigError
from flynnp2p.gossip.heartbeat import Heartbeats
from flynnp2p.gossip.peers import GossipPeers
from flynnp2p.gossip.ping import UdpPinger
from flynnp2p.gossip.serf_agent import SerfSettings
from flynnp2p.gossip.service import Gossip
from flynnp2p.gossip.tags import role_list, serf_tags
from flynnp2p.host.backend import JobBackend
from flynnp2p.host.loghub import LogHub
from flynnp2p.host.ports import PortAllocator
from flynnp2p.host.process import ProcessBackend
from flynnp2p.host.runner import HostRunner
from flynnp2p.host.slugsweep import SlugSweeper
from flynnp2p.leader import LeaderDuties
from flynnp2p.netaddr import url_host
from flynnp2p.node import NodeContext
from flynnp2p.peering import Peer
from flynnp2p.router.applog import RouterLog
from flynnp2p.router.feed import feed_routes
from flynnp2p.router.service import Router
from flynnp2p.router.sticky import derive_key
from flynnp2p.router.table import RouteTable
from flynnp2p.router.tls import CertStore
from flynnp2p.router.workers import RouterWorkers
from flynnp2p.scheduler.service import Scheduler, hosts_from_members
from flynnp2p.scheduler.watcher import DeployWatcher
from flynnp2p.state.errors import StoreError
from flynnp2p.state.service import StateService
from flynnp2p.state.store import SqliteStore
from flynnp2p.token import ClusterToken
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

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
    nursery: trio.Nursery, run: Callable[..., Awaitable[object]], what: str | Callable[[], str],
    option: str | Callable[[], str],
) -> None:
    """Start a service that binds a port; a port it cannot bind is a configuration error
    (`what` and `option` may be asked after the failure: which port it was)."""
    try:
        await nursery.start(run)
    except OSError as exc:
        port = what() if callable(what) else what
        choose = option() if callable(option) else option
        raise ConfigError(f"{port} cannot be used ({exc.strerror}; choose {choose})") from None




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
            rpc_port=0,  # serf_agent picks one and holds it while serf runs
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
            GossipPeers(self.gossip).alive_peers, self.pinger,
            not_alive=lambda: [m.name for m in self.gossip.view.value.members if m.status != "alive"],
        )  # fmt: skip
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
        # What the API sees of this node: its standing, the members, its tags.
        self.ctx = NodeContext(cfg, token, self.state, self.gossip, self.coord, self.election, now_ms)
        self.duties.add(self.ctx.leader_catch_up)
        self.scheduler = Scheduler(
            self.state,
            lambda: hosts_from_members(self.gossip.view.value.members),
            self.gossip.view,
            now_ms,
            lambda epoch: self.ctx.caught_up.value == epoch,
            fence=self._leads,
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
            # unpacked slugs that no release here, nor a rollback, would start again
            self.slug_sweeper = SlugSweeper(
                self.state, cfg.name, [jobs_dir / "slugs", jobs_dir / "images"],
                self.runner.prepare.unpacking,
            )  # fmt: skip
        self.fanout = LogFanout(
            self.http, GossipPeers(self.gossip).alive_peers, Peer(cfg.name, self.api_url[7:])
        )
        # The router: every node proxies every app's routes to its jobs anywhere.
        self.routes: Watched[RouteTable] = Watched(RouteTable.build([], {}))
        # HTTPS: the cluster CA's *.<domain> certificate, and routes' own, by SNI.
        self.certs = CertStore(self.ca, cfg.domain, ips=(cfg.addr,))
        # --router-workers 0: in this process; N: N supervised processes (router.workers).
        self.router: Router | RouterWorkers
        if cfg.router_workers == 0:
            self.router = Router(
                self.routes, address=cfg.addr, http_port=cfg.http_port, log=RouterLog(self.loghub),
                https_port=cfg.https_port, certs=self.certs, sticky_key=derive_key(token.admin_secret),
            )  # fmt: skip
        else:
            self.router = RouterWorkers(
                cfg.router_workers, self.routes, address=cfg.addr, http_port=cfg.http_port,
                log_writer=self.loghub, https_port=cfg.https_port, certs=self.certs,
                sticky_key=derive_key(token.admin_secret),
            )  # fmt: skip
        app = create_app(self)
        apps_api = AppsApi(
            self.ctx, slug_path=self.blobs.local_path, slug_size=self.blobs.size, http=self.http
        )
        # Deploys: finish each deployment, or restore the previous release (under the API's app lock).
        self.deploys = DeployWatcher(self.state, now_ms, lambda e: self.ctx.caught_up.value == e,
                                     formations=apps_api.alloc, fence=self._leads)  # fmt: skip
        self.duties.add(self.deploys.duty)
        app.register_blueprint(internal_blueprint(self.state.replication))
        app.register_blueprint(internal_log_blueprint(self.loghub))
        app.register_blueprint(apps_blueprint(self.ctx, api=apps_api))
        app.register_blueprint(jobs_blueprint(self.ctx, apps_api, self.heartbeats.unresponsive))
        app.register_blueprint(logs_blueprint(self.ctx, self.fanout))
        app.register_blueprint(blobs_blueprint(self.blobs))
        app.register_blueprint(images_blueprint(ImagesApi(apps_api, self.blobs, self.http, self.api_url)))
        app.register_blueprint(coord_blueprint(self.coord))
        app.register_blueprint(router_blueprint(self.router))
        # git push to any node: smart HTTP, the push lease and the repo's generation.
        git_dir = cfg.data_dir / "git"
        self.git_hooks = HookServer(git_dir / "hooks")
        locks = PushLocks(lambda: self.coord.client, now_ms, lambda: self.heartbeats.silent.value)
        # A push to main or master is built, released and deployed before it is accepted.
        caches = BuildCaches(
            cfg.data_dir / "builds" / "cache", blobs=self.blobs, state=self.state, node=cfg.name,
            now_ms=now_ms,
        )  # fmt: skip
        self.builds = BuildStep(
            api=self.http, api_url=self.api_url, slugs=self.blobs, work_root=cfg.data_dir / "builds",
            wait_s=build_wait_s(), logs=self.loghub, now_ms=now_ms, slug_max_bytes=slug_max_mb() << 20,
            unpack=self.runner.prepare.unpacked_slug if self.runner is not None else None,
            caches=caches, node=cfg.name,
        )  # fmt: skip
        repos = RepoStore(git_dir, git_dir / "hooks")
        # deleted apps' repos and build caches off this disk
        self.repo_sweeper = RepoSweeper(self.state, repos, caches)
        self.caches = caches
        self.git_api = git_api = GitApi(
            self.ctx, repos=repos, hooks=self.git_hooks,
            blobs=self.blobs, leader=LeaderLink(self.http, self.ctx.leader_api), locks=locks,
            node_name=cfg.name, scratch=git_scratch(cfg.data_dir), step=self.builds,
            prefetch=caches.prefetch,
        )  # fmt: skip
        app.register_blueprint(git_blueprint(self.ctx, git_api, GitLeaderApi(self.ctx, locks)))
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
            jobs_dir, on_lines=self.loghub.publish, shutdown_grace_s=job_stop_grace_s(),
            node_name=self.cfg.name,
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
                await nursery.start(self.git_hooks.run)
                await nursery.start(self.repo_sweeper.run)
                await nursery.start(self.caches.run)
                await nursery.start(self.caches.keep_warm, self.state)
                await nursery.start(
                    partial(
                        feed_routes, self.state, self.routes, api_address=self.api_url[len("http://"):],
                        domain=c.domain, certs=self.certs, silent=self.heartbeats.silent,
                    )
                )  # fmt: skip
                await _start_listening(
                    nursery, self.router.run,
                    lambda: f"router {self.router.failed.upper()} port {c.addr}:"
                    f"{c.https_port if self.router.failed == 'https' else c.http_port}",
                    lambda: f"--{self.router.failed}-port",
                )  # fmt: skip
                await nursery.start(self.fanout.run)
                if self.backend is not None and self.runner is not None:
                    await nursery.start(self.backend.run)
                    await nursery.start(self.runner.run)
                    await nursery.start(self.slug_sweeper.run)
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

    async def _announce_leadership(self) -> None:
        version, lead = self.election.leadership.version, self.election.leadership.value
        while True:
            await self.gossip.announce(lead.epoch if lead.is_leader else None)
            version, lead = await self.election.leadership.wait_change(version)

    async def _leads(self, epoch: int) -> bool:
        """The leader duties' fence: etcd still has this node's leader key of `epoch`."""
        return await Claims(self.coord.client).leads(epoch)

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

    # -- what the API shows -------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        return self.ctx.members()

    def status(self) -> dict[str, Any]:
        e = self.ctx.leader_view()
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
            "ca_fingerprint": self.ca.fingerprint,
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
                "git": {
                    "ok": self.git_hooks.port != 0, **self.git_api.stats, **self.builds.stats,
                    "build_cache": dict(self.caches.stats),
                },
                "coord": self.coord.stats(),
                "leader_duties": {"ok": True, "terms": self.duties.terms},
                "scheduler": dict(self.scheduler.stats),
                "deploys": dict(self.deploys.stats),
                "jobs": {
                    "ok": self.runner is not None,
                    "backend": self.backend.name if self.backend else None,
                    "isolation": getattr(self.backend, "isolation", None),
                    "memory_enforced": self.backend.memory_enforced if self.backend else None,
                    "running": len(self.runner.runs) if self.runner else 0,
                    **(self.runner.stats if self.runner else {}),
                    "slug_sweeper": dict(self.slug_sweeper.stats) if self.runner else None,
                },
            },
            "versions": {"flynnp2p": flynnp2p.__version__},
        }
