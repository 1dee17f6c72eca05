"""Apps' git repositories on this node: bare repos, their generation, bundles.

Theory of operation
-------------------
An app's repository here is ``<data>/git/<app id>.git`` (a bare repo whose hooks
are the shared ``<data>/git/hooks``, see `flynnp2p.build.hooks`). The cluster's
copy is a `Repo` record naming a ``git bundle`` of all refs in the blobstore and
its ``generation``; the local repo remembers the generation it holds in the file
``flynnp2p-generation`` inside it. The invariant every git request relies on:

    before a request is served, the local repo holds the record's generation
    (the record absent: generation 0, an empty repo); otherwise it is restored.

The saved copy is a chain: a full bundle, then the increments of later pushes
(each a bundle of only the objects that push added, its prerequisites the refs
the push began from), with the exact refs of the newest generation; a restore
applies them in order. Where an increment does not pay (it is more than half
the base, or the chain is long, or the repo has many refs) a push saves a full
bundle again (see `flynnp2p.build.push`).

A restore builds a fresh repo beside the old one and swaps the two by rename, so
a fetch already running on the old one finishes on it.

A push is saved before any of its refs moves (`flynnp2p.build.push`): from the
pre-receive hook, `staged` makes a scratch repo that reads the app's objects
and the push's quarantined ones (as alternates) and holds the refs the push
will leave, and the bundles are made from it (`bundle`, `bundle_since`). Once
the leader has recorded the new generation the app's repo is marked with it
(`set_generation`); a push whose refs then did not all move as saved marks it
-1, so the next request restores the cluster's copy.

Each node removes the repos of apps its state no longer holds (`app_ids`,
`remove`; see `flynnp2p.build.reposweep`).

Every git command runs with an environment of our own (no user config: global
and system config are ignored), bounded by ``GIT_TIMEOUT_S``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from flynnp2p.errors import ClusterError

GENERATION_FILE = "flynnp2p-generation"
REPO_SUFFIX = ".git"
SCRATCH_STAGED = ".staged-"  # a push's scratch repo (`RepoStore.staged`)
SCRATCH_GONE = ".gone-"  # a deleted app's repo, being removed
GIT_TIMEOUT_S = 600.0
DEFAULT_BRANCH = "main"


def git_env(home: Path) -> dict[str, str]:
    """An environment for git commands the agent runs: no user or system config."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "LC_ALL": "C",
    }


def head_branch(names: Collection[str]) -> str | None:
    """The branch HEAD names among the refs `names`: main, else master, else the first."""
    heads = sorted(n for n in names if n.startswith("refs/heads/"))
    for branch in ("refs/heads/main", "refs/heads/master", *heads):
        if branch in heads:
            return branch
    return None


class RepoStore:
    def __init__(self, root: Path, hooks_dir: Path) -> None:
        # Absolute: git resolves a relative core.hooksPath against each repo.
        self.root = root.absolute()
        self.hooks_dir = hooks_dir.absolute()
        self.env = git_env(root)
        self._locks: dict[str, trio.Lock] = {}

    def path(self, app_id: str) -> Path:
        return self.root / f"{app_id}{REPO_SUFFIX}"

    def app_ids(self) -> list[str]:
        """The apps that have a repo on this node (scratch and half-made repos aside)."""
        try:
            names = [p.name for p in self.root.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []
        return sorted(n[: -len(REPO_SUFFIX)] for n in names if n.endswith(REPO_SUFFIX) and not n.startswith("."))

    def scratch_before(self, when: float) -> list[Path]:
        """The scratch repos (a push's staged one, a deleted one being removed) last
        changed before `when` (time.time()): what a killed agent left behind."""
        found = []
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        for path in entries:
            if path.name.startswith((SCRATCH_STAGED, SCRATCH_GONE)) and path.name.endswith(REPO_SUFFIX):
                with contextlib.suppress(OSError):
                    if path.lstat().st_mtime < when:
                        found.append(path)
        return sorted(found)

    async def remove(self, app_id: str) -> bool:
        """Delete the app's repo here (under its lock); False if there was none."""
        async with self.lock(app_id):
            target = self.path(app_id)
            if not target.exists():
                return False
            gone = self.root / f"{SCRATCH_GONE}{uuid.uuid4().hex}{REPO_SUFFIX}"
            target.rename(gone)  # at once: a request after this one finds no repo
            await trio.to_thread.run_sync(shutil.rmtree, gone, True)
        self._locks.pop(app_id, None)
        return True

    def lock(self, app_id: str) -> trio.Lock:
        """Held while the repo is checked and restored (one restore at a time)."""
        return self._locks.setdefault(app_id, trio.Lock())

    async def git(self, *args: str, cwd: Path | None = None) -> str:
        with trio.fail_after(GIT_TIMEOUT_S):
            done = await trio.run_process(
                ["git", *args], cwd=cwd, env=self.env, capture_stdout=True, capture_stderr=True,
                check=False,
            )  # fmt: skip
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[-500:]
            raise ClusterError(f"git {args[0]} failed ({done.returncode}): {err}")
        return bytes(done.stdout).decode(errors="replace")

    def generation(self, app_id: str) -> int:
        """The generation the local repo holds; -1 if there is none (or unreadable)."""
        try:
            return int((self.path(app_id) / GENERATION_FILE).read_text().strip())
        except (OSError, ValueError):
            return -1

    def set_generation(self, app_id: str, generation: int) -> None:
        path = self.path(app_id) / GENERATION_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{generation}\n")
        tmp.replace(path)

    async def _init(self, path: Path) -> None:
        await self.git("init", "--quiet", "--bare", f"--initial-branch={DEFAULT_BRANCH}", str(path))
        for key, value in (
            ("http.receivepack", "true"),
            ("core.hooksPath", str(self.hooks_dir)),
            ("receive.fsckObjects", "true"),  # a corrupt pack is refused, never stored
            ("gc.auto", "0"),  # no background gc child outliving the request
        ):
            await self.git("config", key, value, cwd=path)

    async def restore(
        self, app_id: str, bundles: Sequence[Path], generation: int,
        refs: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        """Make the local repo the cluster's `generation`: the objects and refs of
        `bundles` applied in order (none: an empty repo), then, when given, exactly
        the refs `refs` (increments do not list the refs they left alone)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fresh = self.root / f".new-{uuid.uuid4().hex}.git"
        try:
            await self._init(fresh)
            for bundle in bundles:
                await self.git("fetch", "--quiet", str(bundle), "+refs/*:refs/*", cwd=fresh)
            if refs:
                await self._set_refs(fresh, refs)
            if bundles:
                await self._point_head(fresh)
            (fresh / GENERATION_FILE).write_text(f"{generation}\n")
            target = self.path(app_id)
            old = self.root / f".old-{uuid.uuid4().hex}.git"
            if target.exists():
                target.rename(old)
            fresh.rename(target)
        finally:
            for leftover in (fresh, *self.root.glob(".old-*.git")):
                if leftover.exists():
                    await trio.to_thread.run_sync(shutil.rmtree, leftover, True)

    async def _set_refs(
        self, path: Path, refs: Mapping[str, str], have: Mapping[str, str] | None = None
    ) -> None:
        """Make the refs of `path` exactly `refs` (`have`: what it holds, if known)."""
        have = await self._refs(path) if have is None else have
        lines = [f"update {name} {oid}" for name, oid in sorted(refs.items()) if have.get(name) != oid]
        lines += [f"delete {name}" for name in sorted(have) if name not in refs]
        if lines:
            with trio.fail_after(GIT_TIMEOUT_S):
                done = await trio.run_process(
                    ["git", "update-ref", "--stdin"], cwd=path, env=self.env,
                    stdin=("\n".join(lines) + "\n").encode(), capture_stderr=True, check=False,
                )  # fmt: skip
            if done.returncode != 0:
                raise ClusterError(f"git update-ref failed: {done.stderr.decode(errors='replace')[-300:]}")

    async def point_head(self, app_id: str, names: Collection[str]) -> None:
        """Point the app's HEAD as a restore would (`names`: its refs now), so a clone
        from this node checks out what a clone from any other does."""
        await self._point_head(self.path(app_id), names)

    async def _point_head(self, path: Path, names: Collection[str] | None = None) -> None:
        """HEAD to main, else master, else the first branch (`names`: the repo's refs, if known)."""
        if names is None:
            names = (await self.git("for-each-ref", "--format=%(refname)", "refs/heads", cwd=path)).split()
        branch = head_branch(names)
        if branch is not None:
            await self.git("symbolic-ref", "HEAD", branch, cwd=path)

    @asynccontextmanager
    async def staged(
        self, app_id: str, objects: Mapping[str, str], refs: Mapping[str, str]
    ) -> AsyncIterator[Path]:
        """A scratch bare repo: the app's objects and a push's quarantined ones
        (`objects`: the hook's ``GIT_OBJECT_DIRECTORY`` and
        ``GIT_ALTERNATE_OBJECT_DIRECTORIES``) as alternates, and exactly `refs`,
        the refs the app's repo will hold once the push's refs move; removed on exit."""
        self.root.mkdir(parents=True, exist_ok=True)
        repo = self.path(app_id)
        path = self.root / f"{SCRATCH_STAGED}{uuid.uuid4().hex}{REPO_SUFFIX}"
        dirs = [objects[k] for k in ("GIT_OBJECT_DIRECTORY",) if objects.get(k)]
        dirs += [d for d in objects.get("GIT_ALTERNATE_OBJECT_DIRECTORIES", "").split(os.pathsep) if d]
        dirs.append(str(repo / "objects"))
        absolute = list(dict.fromkeys(str((repo / d).resolve()) for d in dirs))  # relative: to the repo
        try:
            await self.git("init", "--quiet", "--bare", str(path))
            (path / "objects" / "info" / "alternates").write_text("".join(f"{d}\n" for d in absolute))
            await self._set_refs(path, refs, have={})
            await self._point_head(path, refs)
            yield path
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, path, True)

    async def bundle(self, repo: Path, dest: Path) -> None:
        """Write a bundle of all the refs of `repo` (it has some) to `dest`."""
        await self.git("bundle", "create", "--quiet", str(dest), "--all", cwd=repo)

    async def bundle_since(self, repo: Path, dest: Path, old: Collection[str]) -> bool:
        """Write a bundle of what the refs of `repo` reach that the commits `old`
        do not; False when that is nothing (refs deleted, or moved back)."""
        with trio.fail_after(GIT_TIMEOUT_S):
            done = await trio.run_process(
                ["git", "bundle", "create", "--quiet", str(dest), "--all", "--not", *sorted(old)],
                cwd=repo, env=self.env, capture_stderr=True, check=False,
            )  # fmt: skip
        if done.returncode == 0:
            return True
        err = done.stderr.decode(errors="replace")
        if "empty bundle" in err:
            return False
        raise ClusterError(f"git bundle failed ({done.returncode}): {err.strip()[-500:]}")

    async def refs(self, app_id: str) -> dict[str, str]:
        """Ref name → object id of the local repo."""
        return await self._refs(self.path(app_id))

    async def _refs(self, path: Path) -> dict[str, str]:
        out = await self.git("for-each-ref", "--format=%(objectname) %(refname)", cwd=path)
        return {name: oid for oid, name in (line.split(" ", 1) for line in out.splitlines() if line)}
