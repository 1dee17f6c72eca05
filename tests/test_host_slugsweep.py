"""`host.slugsweep`: which unpacked slugs and images a host keeps, and the sweep on real
directories."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from flynnp2p.host.slugsweep import SlugSweeper, wanted
from flynnp2p.state.merge import State
from flynnp2p.state.records import App, Artifact, Formation, Job, Placement, Record, Release
from tests.test_scheduler_model import state_of


def digest(n: int) -> str:
    return "sha256:" + f"{n:02d}" * 32


def releases(app: str, versions: range) -> list[Record]:
    """Release v<n> of `app` with its slug artifact (digest n)."""
    out: list[Record] = []
    for v in versions:
        out.append(Artifact(f"{app}-a{v}", "slug", f"blob:{digest(v)}", 0, digest=digest(v), size=1))
        out.append(Release(f"{app}-r{v}", app, v, artifacts=(f"{app}-a{v}",), version=v))
    return out


def placement(job: str, app: str, release: str, host: str) -> Placement:
    return Placement(job, app, release, "web", host, "start", 1, 0)


def the_state() -> State:
    return state_of(
        App("a1", "shop", 0),
        *releases("a1", range(1, 8)),  # v1..v7
        Formation("a1", "a1-r2", 0, processes={"web": 1}),  # rolled back to v2
        placement("p-old", "a1", "a1-r1", "n1"),  # a placement of v1 here
        placement("p-there", "a1", "a1-r4", "n2"),  # v4, on another host
        Job("j-old", "a1", "a1-r3", "web", "n1", "crashed", 0, 0),  # v3's job here
        Artifact("img", "docker", "docker:img", 0),
        Release("a1-rimg", "a1", 8, artifacts=("img",), version=0),  # an image by name: nothing unpacked
        App("a2", "tarred", 0),
        Artifact("tar", "docker", f"docker-archive:{digest(50)}", 0, digest=digest(50), size=1),
        Release("a2-r1", "a2", 9, artifacts=("tar",), version=1),  # an image archive
    )


def test_a_host_keeps_the_newest_releases_the_formation_and_its_own_jobs() -> None:
    keep = wanted(the_state(), "n1", keep=3)
    # v7, v6, v5 (newest), v2 (the formation's), v1 (a placement here), v3 (a job here);
    # not v4: its placement is on n2.
    assert keep == {digest(v) for v in (7, 6, 5, 2, 1, 3, 50)}
    assert digest(4) in wanted(the_state(), "n2", keep=3)


async def test_the_sweep_removes_old_unwanted_slugs_and_leftovers_only(tmp_path: Path) -> None:
    slugs = tmp_path / "slugs"
    now = 1_000_000.0
    old, young = now - 3600, now - 10

    def entry(name: str, mtime: float) -> None:
        (slugs / name / "app").mkdir(parents=True)
        os.utime(slugs / name, (mtime, mtime))

    for v in range(1, 8):
        entry(digest(v), old)
    entry(digest(40), old)  # no release names it
    entry(digest(41), young)  # unpacked for a release this replica lacks yet
    entry(digest(42), old)  # being unpacked right now
    entry(f".{digest(43)}.x1y2", old)  # a killed agent's half-done unpack
    entry(f".{digest(42)}.k3j4", old)  # the unpack under way, however long it takes
    entry(".spare.abcd", young)  # a copy being made right now
    images = tmp_path / "images"
    for name in (digest(50), digest(51)):  # the archive a2 runs, and one nothing names
        (images / name / "rootfs").mkdir(parents=True)
        os.utime(images / name, (old, old))
    state = the_state()

    class Replica:
        @property
        def state(self) -> State:
            return state

    sweeper = SlugSweeper(
        Replica(), "n1", [slugs, images], lambda: {digest(42)}, grace_s=600, keep=3,
        clock=lambda: now,
    )  # fmt: skip
    removed = await sweeper.sweep()
    assert sorted(removed) == sorted([digest(4), digest(40), f".{digest(43)}.x1y2", digest(51)])
    assert [p.name for p in images.iterdir()] == [digest(50)]
    left = sorted(p.name for p in slugs.iterdir())
    assert left == sorted([
        *(digest(v) for v in (1, 2, 3, 5, 6, 7)), digest(41), digest(42), f".{digest(42)}.k3j4",
        ".spare.abcd",
    ])  # fmt: skip
    assert sweeper.stats == {"sweeps": 1, "removed": 4}
    assert await sweeper.sweep() == []  # nothing more to do

    # No slugs directory yet (a host that never ran a slug): nothing to do.
    none = SlugSweeper(Replica(), "n1", [tmp_path / "none"], set, clock=lambda: now)
    assert await none.sweep() == []
    await trio.lowlevel.checkpoint()
