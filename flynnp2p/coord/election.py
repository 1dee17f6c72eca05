"""Leader election on etcd: one key, one lease, the key's revision as the epoch.

Theory of operation
-------------------
The leader is whoever holds ``f2p/leader``: a candidate (a node whose etcd
member is a voter) creates it in a transaction that succeeds only if the key
does not exist, attached to a lease of ``ttl_s`` seconds.  etcd's consensus
makes that create succeed for exactly one candidate per term, in any
partition: a minority cannot commit it.  The key's create revision is the
term's **epoch**: etcd revisions only grow, so a later term always has a higher
epoch, and hosts fence placements by it.

The leader renews its lease every ``renew_s``.  Its own clock bounds its term:
a renewal *sent* at time t that succeeds proves the lease lives until at least
t + TTL on etcd's side (etcd measured from a later moment), so the leader
treats itself as leader only until ``t + TTL - margin_s`` unless a later
renewal succeeds.  When that deadline passes, or etcd says the lease is gone,
it demotes itself at once: the leader duties are cancelled before etcd could
let anyone else take the key.  On a clean stop it revokes its lease, so a
successor takes over without waiting for the TTL.

Every voter also reads the key (linearizably) to publish who leads, for
forwarding and status, then watches it: the leader's key deleted (its lease
revoked or expired) wakes the followers at once.  The read is repeated every
``reread_s`` anyway, since a member cut off from its quorum hears nothing; a
failed read says "no quorum here".
Learners and nodes without a member follow the leader's gossip tag instead
(a learner's local read could be stale forever behind a partition).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from flynnp2p.coord.client import KV, CoordError
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

LEADER_KEY = "f2p/leader"


@dataclass(frozen=True)
class Leadership:
    """This node's own leadership: ``epoch`` is the fencing token of its term."""

    is_leader: bool
    epoch: int


@dataclass(frozen=True)
class LeaderView:
    """Who leads, as this node last read it from etcd."""

    name: str | None
    api: str | None
    epoch: int
    quorum: bool
    reason: str


class LeaseStore(Protocol):
    """The part of `flynnp2p.coord.client.EtcdClient` the election uses."""

    async def get(self, key: str) -> KV | None: ...

    async def create(self, puts: dict[str, bytes | str], lease: int = 0) -> tuple[bool, int]: ...

    async def grant(self, ttl_s: int) -> tuple[int, int]: ...

    async def keepalive(self, lease: int) -> int: ...

    async def revoke(self, lease: int) -> None: ...

    async def wait_deleted(self, key: str, from_revision: int) -> None: ...


class LeaderElection:
    def __init__(
        self,
        store: LeaseStore,
        name: str,
        api: str,
        *,
        is_voter: Callable[[], bool],
        ttl_s: int = 2,
        renew_s: float = 0.6,
        margin_s: float = 0.5,
        poll_s: float = 0.25,
        reread_s: float = 2.0,
    ) -> None:
        self.store = store
        self.name = name
        self.api = api
        self.is_voter = is_voter
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.margin_s = margin_s
        self.poll_s = poll_s
        self.reread_s = reread_s
        self.leadership: Watched[Leadership] = Watched(Leadership(False, 0))
        self.view: Watched[LeaderView] = Watched(
            LeaderView(None, None, 0, False, "etcd has not answered yet")
        )
        self.terms = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self.is_voter():  # learners and clients follow the ring's hint
                self.view.set(LeaderView(None, None, 0, False, "this node's etcd member is not a voter"))
                await trio.sleep(self.poll_s)
                continue
            try:
                kv = await self.store.get(LEADER_KEY)
            except CoordError as exc:
                reason = f"no quorum: etcd cannot answer here ({exc.message})"
                self.view.set(LeaderView(None, None, 0, False, reason))
                await trio.sleep(self.poll_s)
                continue
            self._publish(kv)
            if kv is None:
                await self._campaign()
                await trio.sleep(self.poll_s)
                continue
            # Someone leads: wait for its key to go (a watch, so a successor starts
            # at once), reading again every `reread_s` to keep "quorum" honest.
            with trio.move_on_after(self.reread_s):
                try:
                    await self.store.wait_deleted(LEADER_KEY, kv.mod_revision + 1)
                except CoordError as exc:
                    log.debug("leader watch failed: %s", exc)
                    await trio.sleep(self.poll_s)

    def _publish(self, kv: KV | None) -> None:
        if kv is None:
            self.view.set(LeaderView(None, None, 0, True, "no node holds the leader lease"))
            return
        holder = kv.json()
        name = holder.get("name") if isinstance(holder, dict) else None
        api = holder.get("api") if isinstance(holder, dict) else None
        self.view.set(
            LeaderView(
                name if isinstance(name, str) else None,
                api if isinstance(api, str) else None,
                kv.create_revision,
                True,
                f"{name} holds the leader lease (epoch {kv.create_revision})",
            )
        )

    async def _campaign(self) -> None:
        try:
            sent = trio.current_time()
            lease, ttl = await self.store.grant(self.ttl_s)
        except CoordError as exc:
            log.debug("could not grant a leader lease: %s", exc)
            return
        value = json.dumps({"name": self.name, "api": self.api})
        try:
            try:
                won, revision = await self.store.create({LEADER_KEY: value}, lease)
            except CoordError as exc:
                log.debug("campaign failed: %s", exc)
                return
            if won:
                await self._lead(lease, revision, sent + ttl - self.margin_s)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await self.store.revoke(lease)
                except CoordError as exc:
                    log.debug("could not revoke the leader lease: %s", exc)

    async def _lead(self, lease: int, epoch: int, valid_until: float) -> None:
        self.terms += 1
        log.info("this node is now the leader, epoch %d", epoch)
        self.leadership.set(Leadership(True, epoch))
        self.view.set(LeaderView(self.name, self.api, epoch, True, f"this node holds the leader lease (epoch {epoch})"))
        try:
            while True:
                now = trio.current_time()
                if now >= valid_until:
                    log.warning("leader lease not renewed in time: stepping down (epoch %d)", epoch)
                    return
                sent = now
                ttl = 0
                with trio.move_on_at(valid_until):
                    try:
                        ttl = await self.store.keepalive(lease)
                    except CoordError as exc:
                        log.info("leader lease renewal failed: %s", exc)
                        ttl = -1
                if ttl == 0:
                    log.warning("the leader lease is gone: stepping down (epoch %d)", epoch)
                    return
                if ttl > 0:
                    valid_until = max(valid_until, sent + ttl - self.margin_s)
                await trio.sleep_until(min(sent + self.renew_s, valid_until))
        finally:
            self.leadership.set(Leadership(False, epoch))
            log.info("leader term %d ended", epoch)
