"""A full disk, for real: one node's data dir on a small tmpfs, filled with a file.

Writes to it answer 507 and it reports itself degraded, it keeps serving reads
and stays alive, and it recovers by itself once the file is deleted.  Started on
a full disk it exits 2 with one line, like any other configuration error.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.diskfill import fill, small_tmpfs
from tests.harness import AgentProc, Cluster, wait_for
from tests.test_cluster_state import converged, create, get_app

pytestmark = pytest.mark.slow

SIZE = "24m"
# No etcd member on the small disk: etcd preallocates 64 MiB of WAL and exits
# on a full disk by itself; this test is about the state and the blobs.
HOST_ONLY = ["--roles", "host"]


@pytest.fixture
def small_disk(tmp_path: Path, cluster: Cluster) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small", SIZE, "0700", before_unmount=cluster.kill_all) as mnt:
        yield mnt


async def state_status(agent: AgentProc) -> dict[str, Any]:
    status = await agent.status()
    assert status is not None, f"{agent.name} does not answer:\n{agent.log_tail()}"
    return status["components"]["state"]  # type: ignore[no-any-return]


async def test_a_full_disk_is_507_degraded_alive_and_recovers(
    cluster: Cluster, small_disk: Path
) -> None:
    a = cluster.add()
    a.start()
    await a.wait_ready()
    b = cluster.add()
    b.data_dir = small_disk / b.name
    b.start(peers=[a.gossip], extra=HOST_ONLY)
    await b.wait_ready()
    await cluster.wait_converged([a, b], alive=2)
    await create(a, "web")
    async with a.client() as c:  # a release, so that b can take one-off runs
        r = await c.post("/v1/apps/web/releases", json={})
        assert r.status_code == 201, r.text
    await wait_for(lambda: get_app(b, "web"), 10, "the app on b")

    filler = fill(small_disk)
    # App writes go to the leader (a); a one-off run request is written where it
    # is asked.  SQLite may still find room in pages its WAL already holds, so
    # ask until it cannot.
    answers = []
    async with b.client() as c:
        for _ in range(200):
            r = await c.post("/v1/apps/web/jobs", json={"args": ["true"], "env": {"K": "x" * 30000}})
            answers.append(r.status_code)
            if r.status_code != 201:
                break
    assert answers[-1] == 507, (answers, r.text)
    error = r.json()["error"]
    assert error["code"] == "insufficient_storage" and error["message"]
    assert b.running
    st = await state_status(b)
    assert st["degraded"] and st["ok"] is False
    assert await get_app(b, "web") is not None  # reads go on
    # A write through the leader: committed on a, b cannot take the push (507),
    # so nobody else holds it: 503, and b lives on.
    async with b.client() as c:
        r = await c.patch("/v1/apps/web", json={"meta": {"from-a": "x" * 4000}})
    assert r.status_code == 503, r.text
    assert b.running

    data = os.urandom(256 << 10)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with b.client() as c:
        r = await c.put(f"/v1/blobs/{digest}", content=data)
    assert r.status_code == 507, r.text
    assert r.json()["error"]["code"] == "insufficient_storage"
    assert b.running and a.running

    filler.unlink()

    async def recovered() -> bool:
        return (await state_status(b))["degraded"] is None

    await wait_for(recovered, 10, "b to clear its degraded state without a write")
    async with b.client() as c:
        r = await c.patch("/v1/apps/web", json={"meta": {"after": "space freed"}})
        assert r.status_code == 200, r.text
        r = await c.put(f"/v1/blobs/{digest}", content=data)
        assert r.status_code == 201, r.text
    await converged([a, b])
    assert (await get_app(a, "web") or {})["meta"]["after"] == "space freed"

    # A restart on a full disk: one line, exit code 2.
    assert b.stop() == 0
    filler = fill(small_disk)
    logged = b.log_path.stat().st_size
    b.start(peers=[a.gossip], extra=HOST_ONLY)
    assert b.proc is not None
    await wait_for(lambda: b.proc.poll() is not None, 30, "b to give up on the full disk")  # type: ignore[union-attr]
    with open(b.log_path, "rb") as f:
        f.seek(logged)
        output = f.read().decode(errors="replace")
    assert b.proc.returncode == 2, output
    assert "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("flynnp2p: error: ") and "disk is full" in last, output

    filler.unlink()
    b.start(peers=[a.gossip], extra=HOST_ONLY)
    await b.wait_ready()
    await converged([a, b])
