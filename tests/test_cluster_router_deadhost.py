"""A node cut off from the others stops getting new requests from a router about
2 s after the cut (its heartbeats are missed), not 6-9 s (when the leader stops
its jobs as lost, after serf calls it failed).

Three real agents, shop at web=3 (one job per node), GET and POST load through
one node's router (the front); a node that is neither the front nor the leader
is cut off with iptables (`tests.partition`, root only). The test measures when
the front's ``/v1/router/status`` stops listing the cut-off node's job (and
shows it skipped as unresponsive), and asserts that this comes within
`DROPPED_WITHIN_S` of the cut, that `CHECKS` requests sent then all succeed
(none waits on the cut-off node), and that no request of the load begun after
it fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.harness import Cluster, wait_for
from tests.jobs_app import deploy, scale, wait_up
from tests.partition import Partition
from tests.test_cluster_deploy_faults import Load, leader_of, under_load
from tests.test_cluster_drain import HOST, make_slug

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="partitions need root (iptables)"),
]

# Heartbeats: 2 s of silence, seen at the end of a 0.5 s round; the rest is slack
# for a noisy 2-core machine. (The leader's "lost" comes 6-9 s after the cut.)
DROPPED_WITHIN_S = 4.0
AFTER_S = 2.0  # load kept on the front once its router dropped the job
CHECKS = 20  # requests sent through the front once its router dropped the job
CHECK_TIMEOUT_S = 3.0  # each (a POST takes 0.2 s at the job)
MARGIN_S = 0.25  # a table the agent swapped reaches its router worker within this


async def test_a_cut_off_node_stops_getting_new_requests_within_seconds(
    cluster: Cluster, tmp_path: Path
) -> None:
    agents = await cluster.start(3, own_gids=True)
    await cluster.wait_converged(agents, alive=3)
    leader = await leader_of(agents)
    front, victim = [a for a in agents if a is not leader]
    slug, digest = make_slug(tmp_path / "app.tgz")
    async with front.client() as c:
        c.timeout = 15.0
        await deploy(c, "shop", slug, digest)
        await scale(c, "shop", web=3)
        up = await wait_up(c, "shop", 3, timeout=60, check=lambda js: len({j["host"] for j in js}) == 3)
    on_victim = {j["address"] for j in up if j["host"] == victim.name}
    url = f"http://{front.addr}:8080/"

    async def serves() -> bool:
        async with httpx.AsyncClient(timeout=5) as h:
            return (await h.get(url, headers={"Host": HOST})).status_code == 200

    await wait_for(serves, 15, "the front's router to serve shop")
    seen: dict[str, Any] = {}

    async def cut_off(load: Load) -> None:
        await trio.sleep(1.0)  # load on every job, pooled connections to each
        async with front.client() as c:
            with Partition([victim], [front, leader]):
                seen["cut_at"] = trio.current_time()
                with trio.move_on_after(15):
                    while True:
                        r = await c.get("/v1/router/status")
                        if r.status_code == 200:
                            st = r.json()
                            listed = {a for bs in st["backends"].values() for a in bs}
                            if not listed & on_victim:
                                seen["dropped_at"] = trio.current_time()
                                seen["status"] = st
                                break
                        await trio.sleep(0.05)
                if "dropped_at" in seen:  # (many load clients may be held on the cut-off job)
                    seen["checked"] = await _check(url)
                await trio.sleep(AFTER_S)

    load = await under_load(url, cut_off)
    cut_at = seen["cut_at"]
    dropped_at = seen.get("dropped_at")
    took = None if dropped_at is None else dropped_at - cut_at
    late = [r for r in load.failures if dropped_at is not None and r.start > dropped_at + MARGIN_S]
    print(f"\n{victim.name} cut off; {front.name}'s router stopped listing its job "
          f"{'never (15 s)' if took is None else f'{took:.2f}s'} after the cut; "
          f"{load.summary(cut_at)}; failures begun after that: {len(late)}; "
          f"of {CHECKS} requests sent after it, failed: {seen.get('checked')}")  # fmt: skip
    assert took is not None and took < DROPPED_WITHIN_S, took
    skipped = {a for bs in seen["status"]["unresponsive"]["skipped"].values() for a in bs}
    assert on_victim <= skipped, seen["status"]["unresponsive"]
    assert seen["checked"] == [], seen["checked"]
    assert not late, load.summary(cut_at)
    async with front.client() as c:  # healed: nothing skipped, three jobs take traffic
        await wait_for(lambda: _healed(c), 30, "the front's router to skip nothing again")


async def _check(url: str) -> list[str]:
    """`CHECKS` requests one after the other, GET and POST in turn, each within
    `CHECK_TIMEOUT_S`; the failures."""
    failed = []
    async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_S) as c:
        for i in range(CHECKS):
            try:
                if i % 2:
                    r = await c.post(url + "work", headers={"Host": HOST}, content=b"x" * 100)
                else:
                    r = await c.get(url, headers={"Host": HOST})
            except httpx.TransportError as exc:
                failed.append(f"{i}: {type(exc).__name__}: {exc}")
            else:
                if r.status_code != 200:
                    failed.append(f"{i}: {r.status_code}: {r.text[:100]}")
    return failed


async def _healed(c: httpx.AsyncClient) -> bool:
    """(The cut-off node's job again, or, if the leader stopped it as lost, its replacement.)"""
    r = await c.get("/v1/router/status")
    if r.status_code != 200:
        return False
    st = r.json()
    listed = [a for svc, bs in st["backends"].items() if svc.endswith("/web") for a in bs]
    return not st["unresponsive"]["addresses"] and len(listed) == 3
