"""The gossip service: serf child + RPC client + this node's view of the cluster.

Theory of operation
-------------------
One task (``_refresh_loop``) owns the membership view.  It re-reads
``members`` from serf whenever a member event arrives on the stream (events come
1-3 s late, coalesced) and at least every ``POLL_S`` seconds, and publishes an
immutable ``ClusterView`` through a ``Watched``.  Everything else (the API, the
scheduler, the epoch tag) reads or waits on that value.  Leadership is etcd's
(`flynnp2p.coord.election`); the ring only carries its hints and epochs
(`flynnp2p.gossip.election`): the leader announces itself with `announce`.

Serf alone leaves stragglers for a minute after a partition heals or a node
restarts, so while this node knows of failed members (or sees nobody but
itself) it re-joins a random one of them every few seconds.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from flynnp2p.errors import ConfigError
from flynnp2p.gossip.codec import SerfError
from flynnp2p.gossip.election import TagView, leader_hint, max_epoch, parse_tags
from flynnp2p.gossip.rpc import Member, SerfRPC, open_serf_rpc
from flynnp2p.gossip.serf_agent import SerfAgent, SerfSettings
from flynnp2p.netaddr import url_host
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

POLL_S = 1.0
REJOIN_S = 3.0
JOIN_TIMEOUT_S = 10.0
DEFAULT_GOSSIP_PORT = 7946
MEMBER_EVENTS = "member-join,member-leave,member-failed,member-update,member-reap"
LEADER_EVENT = "f2p-leader"


@dataclass(frozen=True)
class ClusterView:
    self_name: str
    members: tuple[Member, ...]
    max_epoch: int = 0
    leader_hint: TagView | None = None

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


def _empty_view(name: str) -> ClusterView:
    return ClusterView(name, ())


def gossip_target(peer: str) -> str:
    """``HOST`` or ``HOST:PORT`` → ``HOST:PORT`` (serf's join syntax)."""
    peer = peer.strip()
    if not peer:
        raise ConfigError("empty peer address")
    if peer.startswith("["):
        return peer if "]:" in peer else f"{peer}:{DEFAULT_GOSSIP_PORT}"
    try:
        ipaddress.IPv6Address(peer)
        return f"[{peer}]:{DEFAULT_GOSSIP_PORT}"
    except ValueError:
        pass
    return peer if ":" in peer else f"{peer}:{DEFAULT_GOSSIP_PORT}"


class Gossip:
    def __init__(self, settings: SerfSettings, peers: Sequence[str] = ()) -> None:
        self.settings = settings
        self.serf = SerfAgent(settings)
        self.peers = [gossip_target(p) for p in peers]
        # Serf's snapshot did not always hold the peers of a node killed a few
        # seconds after joining (measured: only its own entry), so the agent
        # keeps its own list of the members it last saw alive.
        self.known_path = settings.data_dir / "known-peers.json"
        self.known = _load_known(self.known_path)
        self.tags: dict[str, str] = dict(settings.tags)
        self.view: Watched[ClusterView] = Watched(_empty_view(settings.node_name))
        self.leading = 0  # the epoch this node announces as leader (0: none)
        self._rpc: SerfRPC | None = None
        self._poke = trio.Event()

    @property
    def rpc(self) -> SerfRPC:
        if self._rpc is None:
            raise RuntimeError("gossip is not running")
        return self._rpc

    async def run(self, *, task_status: trio.TaskStatus[Gossip] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        async with trio.open_nursery() as nursery:
            rpc_port = await nursery.start(self.serf.run)  # the one serf holds (rpc_port=0)
            # Serf answers one RPC connection's commands in order, and a join of
            # a peer behind a partition blocks for serf's 10 s TCP timeout: joins
            # get a connection of their own, so membership reads never wait.
            async with open_serf_rpc(s.rpc_addr, rpc_port, s.rpc_auth) as rpc, open_serf_rpc(
                s.rpc_addr, rpc_port, s.rpc_auth
            ) as joins:
                self._rpc = rpc
                if self.peers:
                    await self.join(self.peers)
                else:
                    nursery.start_soon(self._rejoin_known, joins)
                await self._refresh()
                nursery.start_soon(self._watch_member_events)
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._rejoin_loop, joins)
                task_status.started(self)
                await trio.sleep_forever()

    async def _rejoin_known(self, joins: SerfRPC) -> None:
        """A restarted node rejoins the members it last saw, without holding up its start."""
        if not self.known:
            return
        with trio.move_on_after(JOIN_TIMEOUT_S):
            try:
                await joins.join(self.known)
            except SerfError as exc:
                log.info("could not rejoin known peers yet: %s", exc)
        self._poke.set()

    async def join(self, targets: Sequence[str]) -> int:
        """Join through any of ``targets``, retrying an unreachable peer for up to
        ``JOIN_TIMEOUT_S`` (hosts booting together); a clear ConfigError otherwise."""
        where = ", ".join(targets)
        last = "no answer"
        with trio.move_on_after(JOIN_TIMEOUT_S):
            while True:
                try:
                    return await self.rpc.join(list(targets))
                except SerfError as exc:
                    last = " ".join(str(exc).split())
                    if not _unreachable(last):
                        raise ConfigError(f"could not join {where}: {_join_reason(last)}") from None
                await trio.sleep(0.5)
        raise ConfigError(
            f"could not join {where} within {JOIN_TIMEOUT_S:.0f} s: {_join_reason(last)}"
        )

    async def set_tags(self, tags: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        self.tags.update(tags)
        for key in delete:
            self.tags.pop(key, None)
        await self.rpc.set_tags(dict(tags), delete)
        self._poke.set()

    async def _watch_member_events(self) -> None:
        async with self.rpc.stream(f"{MEMBER_EVENTS},user:{LEADER_EVENT}") as events:
            async for _event in events:
                self._poke.set()

    async def _refresh_loop(self) -> None:
        while True:
            with trio.move_on_after(POLL_S):
                await self._poke.wait()
            self._poke = trio.Event()
            try:
                await self._refresh()
            except SerfError as exc:  # serf restarting: keep the last view
                log.debug("members refresh failed: %s", exc)

    async def _refresh(self) -> None:
        members = tuple(sorted(await self.rpc.members(), key=lambda m: m.name))
        tags = [parse_tags(m.name, m.status, m.tags) for m in members]
        view = ClusterView(self.settings.node_name, members, max_epoch(tags), leader_hint(tags))
        self.view.set(view)
        self._remember(view)
        await self._publish_epoch(view)

    async def announce(self, epoch: int | None) -> None:
        """Tell the ring this node leads in ``epoch`` (None: it stopped leading)."""
        old = self.leading
        self.leading = epoch or 0
        try:
            if epoch:
                await self.set_tags({"ep": str(max(epoch, self.view.value.max_epoch)), "ld": str(epoch)})
                # Everyone refreshes at once (member-update events lag 1-3 s).
                await self.rpc.user_event(
                    LEADER_EVENT, f"{self.settings.node_name} {epoch}".encode(), coalesce=False
                )
            elif old:
                await self.set_tags({}, ["ld"])
        except SerfError as exc:
            log.warning("could not announce the leader tags (will retry): %s", exc)
            self._poke.set()

    async def _publish_epoch(self, view: ClusterView) -> None:
        """Keep ``ep`` at the highest epoch seen, and ``ld`` as announced.

        Serf answers a tag change only once it has broadcast it, and under load
        that times out ("timeout waiting for update broadcast"); then nothing
        changes here and the next refresh tries again."""
        mine = int(self.tags.get("ep", "0"))
        announced = int(self.tags.get("ld", "0"))
        try:
            if self.leading and announced != self.leading:
                await self.set_tags({"ld": str(self.leading)})
            elif not self.leading and "ld" in self.tags:
                await self.set_tags({}, ["ld"])
            if view.max_epoch > mine:
                await self.set_tags({"ep": str(view.max_epoch)})
        except SerfError as exc:
            log.warning("could not publish the epoch tag (will retry): %s", exc)
            self._poke.set()

    async def _rejoin_loop(self, joins: SerfRPC) -> None:
        rng = random.Random()
        while True:
            await trio.sleep(REJOIN_S * (0.5 + rng.random()))
            view = self.view.value
            alive = [m for m in view.members if m.status == "alive"]
            targets = [f"{url_host(m.addr)}:{m.port}" for m in view.members if m.status == "failed"]
            if len(alive) <= 1:
                targets += self.peers or self.known
            if not targets:
                continue
            target = rng.choice(targets)
            with trio.move_on_after(JOIN_TIMEOUT_S):
                try:
                    await joins.join([target])
                except SerfError as exc:
                    log.debug("re-join %s failed: %s", target, exc)


    def _remember(self, view: ClusterView) -> None:
        known = sorted(
            f"{url_host(m.addr)}:{m.port}"
            for m in view.members
            if m.status == "alive" and m.name != view.self_name
        )
        if known and known != self.known:
            self.known = known
            tmp = self.known_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(self.known_path)


def _load_known(path: Path) -> list[str]:
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [k for k in known if isinstance(k, str)] if isinstance(known, list) else []




def _unreachable(text: str) -> bool:
    low = text.lower()
    return any(s in low for s in ("connection refused", "i/o timeout", "no route", "no such host"))


def _join_reason(text: str) -> str:
    low = text.lower()
    if "encrypt" in low or "decrypt" in low or "keys" in low:
        return (
            "the peer uses a different gossip key: --token must be this cluster's token "
            f"(serf: {text.strip()})"
        )
    if _unreachable(text):
        return f"the peer is unreachable (serf: {text.strip()})"
    return text.strip()
