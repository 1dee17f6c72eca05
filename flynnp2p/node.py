"""This node as the API sees it: its standing (leader or not, caught up or not),
the cluster's members, and its own host tags.

`NodeContext` implements `flynnp2p.api.context.JobsContext` over the agent's
parts. Leadership comes from etcd (`flynnp2p.coord.election`): this node *acts*
as the leader only once, in the term it won, it has pulled from its peers and
made sure etcd holds a claim for every app and route the state holds
(`leader_catch_up`, a leader duty), so no name it allocates is taken. A node
without a voting etcd member learns who leads from the ring's hint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import trio

from flynnp2p.config import NodeConfig, save_node
from flynnp2p.coord.claims import Claims
from flynnp2p.coord.client import CoordError
from flynnp2p.coord.election import LeaderElection, LeaderView
from flynnp2p.coord.service import Coord
from flynnp2p.errors import ClusterError
from flynnp2p.gossip.codec import SerfError
from flynnp2p.gossip.service import Gossip
from flynnp2p.gossip.tags import role_list, serf_names, serf_tags, user_tags
from flynnp2p.state.records import ClusterConfig
from flynnp2p.state.service import StateService
from flynnp2p.token import ClusterToken
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

CLAIM_SWEEP_S = 30.0
CATCH_UP_S = 3.0


class NodeContext:
    def __init__(
        self, cfg: NodeConfig, token: ClusterToken, state: StateService, gossip: Gossip,
        coord: Coord, election: LeaderElection, now_ms: Callable[[], int],
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.token = token
        self.state = state
        self.gossip = gossip
        self.coord = coord
        self.election = election
        self._now_ms = now_ms
        self.caught_up: Watched[int] = Watched(-1)  # the term whose catch-up is done

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

    async def leader_catch_up(self, epoch: int) -> None:
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
        lo, hi = self.cfg.tcp_route_range()
        if config is None:
            await self.state.write([
                ClusterConfig(
                    domain=self.cfg.domain, created_at=self._now_ms(), tcp_port_min=lo, tcp_port_max=hi
                )
            ])  # fmt: skip
        elif (config.domain, config.tcp_port_min, config.tcp_port_max) != (self.cfg.domain, lo, hi):
            log.warning(
                "this cluster was created with --domain %s --tcp-route-ports %d-%d; "
                "this node's settings are ignored",
                config.domain, config.tcp_port_min, config.tcp_port_max,
            )
        while True:
            await trio.sleep(CLAIM_SWEEP_S)
            try:
                await self._reconcile_claims()
            except CoordError as exc:
                log.info("claim sweep failed: %s", exc)

    async def _reconcile_claims(self) -> None:
        await Claims(self.coord.client).reconcile(self.state.state, self._now_ms())

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

    def now_ms(self) -> int:
        return self._now_ms()

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
