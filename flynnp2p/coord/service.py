"""The node's etcd member: started, joined, supervised; and the leader's autopilot.

Theory of operation
-------------------
A scheduler-role node runs one etcd member (``Coord.run``):

* with etcd data in its data dir, it restarts that member as it is (a node
  restart, or a whole-cluster reboot: no manual step);
* the node that creates the cluster bootstraps a one-member cluster;
* any other node asks the API of an alive peer to add it as a learner
  (``POST /v1/internal/coord/members``; the peer removes a stale identity of
  the same name first) and starts with ``--initial-cluster-state existing``.
  etcd allows one learner at a time, so a node that gets no slot stays a plain
  client and asks again every few seconds; the leader's autopilot promotes
  learners to voters up to ``voters_wanted``, and replaces dead voters.

If the member exits, it is started again with backoff; if etcd says it was
removed from the cluster (the autopilot removed it while the node was gone),
its etcd data is wiped and the node joins again as a new learner.

``role`` says what the local member is: ``voter``, ``learner``, ``client``
(no member: a non-scheduler node, or one waiting for a learner slot) or
``starting``.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import trio

from flynnp2p.coord.autopilot import initial_cluster, plan_membership, stale_identities
from flynnp2p.coord.ca import ClusterCA
from flynnp2p.coord.client import CoordError, EtcdClient
from flynnp2p.coord.member import (
    EtcdSettings,
    find_etcd,
    log_tail,
    run_member,
    stop_stale,
    was_removed,
)

log = logging.getLogger(__name__)

JOIN_RETRY_S = 1.0
ROLE_POLL_S = 0.5
VOTER_POLL_S = 5.0
AUTOPILOT_S = 2.0
MEMBERS_PATH = "/v1/internal/coord/members"


class Coord:
    def __init__(
        self,
        settings: EtcdSettings,
        ca: ClusterCA,
        http: httpx.AsyncClient,
        peer_apis: Callable[[], Sequence[str]],
        *,
        enabled: bool,
        bootstrap: bool,
        binary: str = "etcd",
        voters_wanted: int = 5,
        dead_after_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.ca = ca
        self.http = http
        self.peer_apis = peer_apis
        self.enabled = enabled
        self.bootstrap = bootstrap
        self.binary = binary
        self.voters_wanted = voters_wanted
        self.dead_after_s = dead_after_s
        self.client = EtcdClient(settings.client_url)
        self.role = "starting" if enabled else "client"
        self.member_id: int | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.force_new = trio.Event()
        self._restart = trio.Event()

    def is_voter(self) -> bool:
        return self.role == "voter"

    def has_member(self) -> bool:
        return self.role in ("voter", "learner")

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- the member's life ---------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.enabled:
            task_status.started()
            await trio.sleep_forever()
        binary = find_etcd(self.binary)
        s = self.settings
        await trio.to_thread.run_sync(stop_stale, s)
        await trio.to_thread.run_sync(s.write_tls, self.ca, dt.datetime.now(dt.UTC))
        task_status.started()
        backoff = 1.0
        while True:
            args = await self._prepare(binary)
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_role)
                status = await self._run_until_restart(args)
                nursery.cancel_scope.cancel()
            self.role = "starting"
            if status is None:
                continue  # asked to restart (cluster recover)
            tail = await trio.to_thread.run_sync(log_tail, s)
            last = [ln for ln in tail.splitlines() if ln.strip()][-1:] or [f"status {status}"]
            self.last_error = f"etcd exited with status {status}: {last[0].strip()[:300]}"
            self.restarts += 1
            if was_removed(tail):
                log.warning("this node's etcd member was removed from the cluster: joining again")
                await trio.to_thread.run_sync(s.wipe)
                backoff = 1.0
                continue
            if trio.current_time() - started > 60:
                backoff = 1.0
            log.warning("%s; restarting in %.0f s", self.last_error, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _run_until_restart(self, args: list[str]) -> int | None:
        """The member's exit status, or None when a restart was asked for."""
        result: list[int] = []
        self._restart = trio.Event()
        async with trio.open_nursery() as nursery:

            async def member() -> None:
                result.append(await run_member(self.settings, args))
                nursery.cancel_scope.cancel()

            nursery.start_soon(member)
            await self._restart.wait()
            nursery.cancel_scope.cancel()
        return result[0] if result else None

    async def _prepare(self, binary: str) -> list[str]:
        """etcd's command line: restart, bootstrap, or join as a learner (waits for a slot)."""
        s = self.settings
        if self.force_new.is_set():
            self.force_new = trio.Event()
            log.warning("starting etcd as a new one-member cluster from this node's data (recover)")
            return s.args(binary, None, "existing", force_new=True)
        if s.has_data():
            return s.args(binary, None, "existing")
        await trio.to_thread.run_sync(s.wipe)  # what a failed first start left
        if self.bootstrap:
            self.bootstrap = False
            return s.args(binary, f"{s.name}={s.peer_url}", "new")
        self.role = "client"
        rng = random.Random()
        while True:
            joined = await self._ask_to_join()
            if joined is not None:
                self.role = "starting"
                return s.args(binary, joined, "existing")
            await trio.sleep(JOIN_RETRY_S * (0.5 + rng.random()))

    async def _ask_to_join(self) -> str | None:
        s = self.settings
        body = {"name": s.name, "peer_url": s.peer_url}
        for api in self.peer_apis():
            try:
                with trio.fail_after(5):
                    resp = await self.http.post(f"http://{api}{MEMBERS_PATH}", json=body)
            except (httpx.HTTPError, trio.TooSlowError) as exc:
                self.last_error = f"cannot reach {api} to join etcd: {str(exc) or type(exc).__name__}"
                continue
            if resp.status_code == 200:
                cluster = resp.json().get("initial_cluster")
                if isinstance(cluster, str) and cluster:
                    log.info("added to etcd as a learner through %s", api)
                    return cluster
            self.last_error = f"{api} did not add this node to etcd: {_reason(resp)}"
        return None

    async def _watch_role(self) -> None:
        while True:
            try:
                members = await self.client.members()
            except CoordError as exc:
                self.last_error = exc.message
            else:
                mine = next((m for m in members if m.name == self.settings.name), None)
                if mine is not None:
                    self.member_id = mine.id
                    self.settings.mark_joined(mine.id)
                    self.role = "learner" if mine.is_learner else "voter"
            # A learner waits for its promotion; a voter stays one until removed.
            await trio.sleep(ROLE_POLL_S if self.role != "voter" else VOTER_POLL_S)

    def recover(self) -> None:
        """Restart the local member as a one-member cluster keeping its data
        (etcd's ``--force-new-cluster``): for a quorum lost for good."""
        self.force_new.set()
        self._restart.set()

    # -- what peers ask (the API's /v1/internal/coord/members) ---------------

    async def add_learner(self, name: str, peer_url: str) -> str:
        """Add a joining node as a learner; its ``--initial-cluster``."""
        members = await self.client.members()
        for stale in stale_identities(members, name, peer_url):
            log.info("removing the stale etcd member %s (%x) before it joins again", stale.name, stale.id)
            await self.client.member_remove(stale.id)
        new, members = await self.client.member_add(peer_url, learner=True)
        return initial_cluster(members, new.id, name)

    async def member_list(self) -> list[dict[str, Any]]:
        return [
            {"id": f"{m.id:x}", "name": m.name, "peer_urls": list(m.peer_urls), "learner": m.is_learner}
            for m in await self.client.members()
        ]

    # -- the leader's autopilot duty -----------------------------------------

    async def autopilot(self, statuses: Callable[[], Mapping[str, str]]) -> None:
        """Leader duty: one membership change per round (`plan_membership`)."""
        first_down: dict[str, float] = {}
        while True:
            await trio.sleep(AUTOPILOT_S)
            try:
                members = await self.client.members()
            except CoordError as exc:
                log.debug("autopilot: %s", exc)
                continue
            now = trio.current_time()
            seen = statuses()
            down_keys = {n for n, st in seen.items() if st != "alive"}
            down_keys |= {m.name for m in members if m.name and m.name not in seen}
            down_keys |= {f"url:{m.peer_urls[0]}" for m in members if not m.name and m.peer_urls}
            first_down = {k: first_down.get(k, now) for k in down_keys}
            down_for = {k: now - t for k, t in first_down.items()}
            change = plan_membership(
                members, seen, down_for, self_name=self.settings.name,
                voters_wanted=self.voters_wanted, dead_after_s=self.dead_after_s,
            )  # fmt: skip
            if change is None:
                continue
            try:
                if change.action == "remove":
                    await self.client.member_remove(change.member_id)
                else:
                    await self.client.member_promote(change.member_id)
            except CoordError as exc:
                log.debug("autopilot could not %s %s: %s", change.action, change.name, exc)
                continue
            log.info("autopilot: %s etcd member %s (%s)", change.action, change.name or "?", change.reason)

    def stats(self) -> dict[str, Any]:
        return {
            "ok": self.role in ("voter", "learner", "client"),
            "role": self.role,
            "member_id": None if self.member_id is None else f"{self.member_id:x}",
            "client_url": self.settings.client_url if self.has_member() else None,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }


def _reason(resp: httpx.Response) -> str:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200]
    return f"{resp.status_code} {message}"
