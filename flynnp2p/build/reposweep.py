"""Each node removes the git repositories and build caches of deleted apps from its disk.

Theory of operation
-------------------
An app's repo on a node (`flynnp2p.build.repo.RepoStore`: ``<data>/git/<app
id>.git``) is a copy of the cluster's saved one, made only for a git request
naming an app this node's state holds. So a repo whose app the state does not
hold (deleted: a tombstone, or a tombstone since collected) belongs to a deleted
app: nothing needs it again, since a new app of the same name gets a new id
and so a repo of its own. `RepoSweeper` removes such repos once at start (apps
deleted while the node was down) and whenever the state's apps change,
subscribed before it reads the snapshot, so no deletion slips between. A
request that restores a repo for an app deleted a moment later leaves it until
the next change or restart: the sweep is the only place that decides.

The app's build cache directory on this node (`flynnp2p.build.cache.BuildCaches`)
goes by the same rule, in the same sweep.

At start it also removes the scratch repos an agent killed mid-push or
mid-removal left behind (`RepoStore.scratch_before`): those last changed 2 s before
this sweeper was made, so never one a push of this agent is using.

The app's saved copy in the cluster goes with it: its `Repo` record (and its
`BuildCache` record) are in the app's deletion batch
(`flynnp2p.api.ops.app_deletion`; their blobs are then collected by the
blobstore's gc) and its etcd keys are dropped with the app's claims
(`flynnp2p.build.push.forget_repo`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable

import trio

from flynnp2p.build.cache import BuildCaches
from flynnp2p.build.repo import RepoStore
from flynnp2p.state.merge import State
from flynnp2p.state.records import App
from flynnp2p.state.replica import Subscribable

log = logging.getLogger(__name__)


def stale_repos(on_disk: Iterable[str], apps: Iterable[str]) -> list[str]:
    """The app ids of repos on disk that no app of the state has."""
    live = set(apps)
    return sorted(app_id for app_id in on_disk if app_id not in live)


class RepoSweeper:
    def __init__(
        self, state: Subscribable, repos: RepoStore, caches: BuildCaches | None = None
    ) -> None:
        self.state = state
        self.repos = repos
        self.caches = caches
        self.stats = {"removed": 0, "scratch_removed": 0, "caches_removed": 0}
        # Scratch repos last changed before this are a killed agent's (a margin: the
        # file system's clock is coarser than time.time(), and a restart takes longer).
        self.made_at = time.time() - 2.0

    async def remove_scratch(self) -> None:
        for path in await trio.to_thread.run_sync(self.repos.scratch_before, self.made_at):
            await trio.to_thread.run_sync(shutil.rmtree, path, True)
            self.stats["scratch_removed"] += 1
            log.info("removed %s, left behind by an agent that was stopped mid-push", path.name)

    async def sweep(self, state: State) -> list[str]:
        """Remove the repos of apps `state` does not hold; their ids."""
        on_disk = await trio.to_thread.run_sync(self.repos.app_ids)
        removed = []
        for app_id in stale_repos(on_disk, (a.id for a in state.records(App))):
            if await self.repos.remove(app_id):
                removed.append(app_id)
                log.info("removed the git repository of deleted app %s", app_id)
        self.stats["removed"] += len(removed)
        if self.caches is not None:
            caches = self.caches
            on_disk = await trio.to_thread.run_sync(caches.app_ids)
            for app_id in stale_repos(on_disk, (a.id for a in state.records(App))):
                await trio.to_thread.run_sync(caches.remove, app_id)
                self.stats["caches_removed"] += 1
                log.info("removed the build cache of deleted app %s", app_id)
        return removed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:  # a subscriber that falls behind is dropped: subscribe again
            async with self.state.subscribe([App.KIND]) as (snapshot, changes):
                await self.sweep(snapshot)
                if not started:
                    await self.remove_scratch()
                    started = True
                    task_status.started()
                async for _ in changes:
                    await self.sweep(self.state.state)
