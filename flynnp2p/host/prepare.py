"""Everything a run needs before the backend starts it: its records, its slug, its port.

Theory of operation
-------------------
A placement can reach this node before the release, app or artifact it names
(they replicate independently). `wait_record` subscribes to that kind *before*
reading the snapshot, so no write lands unseen between the two, and returns as
soon as the record arrives (`RECORD_WAIT_S` at most). `prepare_spec` then fetches
and unpacks the slug (or names the Docker image) and allocates the port, or says
why it cannot with `StartFailed`: the reason reported on the crashed job.

A Docker artifact is an image on the engine (``docker:REF``: docker backend only)
or a ``docker save`` archive in the blobstore (``docker-archive:DIGEST``): fetched
here, then loaded by the docker backend when its engine lacks the image (named by
its id, ``meta["image_id"]``), or unpacked into a root filesystem for the process
backend (`flynnp2p.host.rootfs`). A job of an image runs the image's own command;
a one-off runs its command with ``sh -c`` in the image. The ``web`` process's port
(``ports[0]``, the image's first exposed port; 0 if none) is where it listens in
its container.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from flynnp2p.errors import FlynnError
from flynnp2p.host.backend import ImageRoot, JobSpec
from flynnp2p.host.ports import PortAllocator
from flynnp2p.host.rootfs import unpack_image
from flynnp2p.host.slug import adopt_built, make_spare, unpack_slug
from flynnp2p.state.records import App, Artifact, Placement, ProcessSpec, Release
from flynnp2p.state.replica import wait_for_record
from flynnp2p.state.service import StateService

ARCHIVE_SCHEME = "docker-archive:"  # an image saved with docker save, in the blobstore
RECORD_WAIT_S = 30.0  # how long a run waits for its release/artifact to replicate here

_R = TypeVar("_R", Release, App, Artifact)


class Blobs(Protocol):
    """What a run needs from `flynnp2p.build.blobs.BlobService`."""

    async def local_path(self, digest: str) -> Path: ...


class StartFailed(Exception):
    """A run could not start; the text is the reason reported on the job."""


async def wait_record(state: StateService, cls: type[_R], key: str, node: str) -> _R:
    """Record `cls`/`key` once it has reached this replica; StartFailed after `RECORD_WAIT_S`."""
    with trio.move_on_after(RECORD_WAIT_S):
        return await wait_for_record(state, cls, key)
    raise StartFailed(f"{cls.KIND} {key} has not reached node {node}")


@dataclass(frozen=True)
class Preparer:
    node: str
    addr: str
    state: StateService
    backend_name: str
    blobs: Blobs
    ports: PortAllocator
    work_dir: Path
    _unpacking: dict[str, trio.Event] = field(default_factory=dict, compare=False, repr=False)
    _unpacking_images: set[str] = field(default_factory=set, compare=False, repr=False)

    async def unpacked_slug(self, tarball: Path, digest: str, built: Path | None = None) -> Path:
        """Slug `digest` (the file `tarball`) unpacked on this node (`unpack_slug`): its
        ``app`` directory. One unpack of a digest at a time: a caller that comes while
        one runs waits for it and then finds the slug there. The git push's build
        calls this on the node that built the slug while the release is made, with
        the build's own tree as `built` (moved into place instead of unpacking:
        `adopt_built`, and a job's copy of it made ahead: `make_spare`), so a job
        placed here (`flynnp2p.scheduler.rank` prefers the node that built the
        slug) finds it unpacked and its copy made."""
        while (busy := self._unpacking.get(digest)) is not None:
            await busy.wait()
        done = self._unpacking[digest] = trio.Event()
        try:
            if built is not None and (app := await adopt_built(built, self.work_dir, digest)):
                await make_spare(app)
                return app
            return await unpack_slug(tarball, self.work_dir, digest)
        finally:
            del self._unpacking[digest]
            done.set()

    def unpacking(self) -> Collection[str]:
        """The digests of the slugs and image archives being unpacked or taken in
        right now (`host.slugsweep` leaves them)."""
        return self._unpacking.keys() | self._unpacking_images

    async def spec(self, p: Placement) -> JobSpec:
        """Everything the backend needs to run `p`; StartFailed with the reason if it cannot."""
        release = await wait_record(self.state, Release, p.release_id, self.node)
        app = await wait_record(self.state, App, p.app_id, self.node)
        spec_of = release.processes.get(p.process_type)
        if p.one_off:
            command = p.args[0] if len(p.args) == 1 else shlex.join(p.args)
            proc = ProcessSpec(command=command or "true", memory_mb=p.memory_mb or 512)
        elif spec_of is None:
            raise StartFailed(f"release {release.id} has no process type {p.process_type}")
        else:
            proc = spec_of
        slug_dir: Path | None = None
        image = _ImageJob()
        for artifact_id in release.artifacts[:1]:
            artifact = await wait_record(self.state, Artifact, artifact_id, self.node)
            if artifact.type == "docker":
                image = await self._image(artifact)
            else:
                assert artifact.digest is not None
                try:
                    tarball = await self.blobs.local_path(artifact.digest)
                    slug_dir = await self.unpacked_slug(tarball, artifact.digest)
                except FlynnError as exc:
                    raise StartFailed(f"cannot get slug {artifact.digest}: {exc}") from None
        if slug_dir is None and image.image is None and image.root is None:
            slug_dir = self.work_dir / "empty" / "app"
            slug_dir.mkdir(parents=True, exist_ok=True)
        port = None
        if proc.ports or (not p.one_off and p.process_type == "web"):
            try:
                port = self.ports.allocate(p.id)
            except FlynnError as exc:
                raise StartFailed(str(exc)) from None
        return JobSpec(
            job_id=p.id,
            app_name=app.name,
            app_id=app.id,
            release_id=release.id,
            process_type=p.process_type,
            command="" if image.runs_own_command(p.one_off) else proc.command,
            env={**release.env, **p.env},
            port=port,
            slug_dir=slug_dir,
            memory_mb=proc.memory_mb,
            image=image.image,
            host_addr=self.addr,
            container_port=(proc.ports[0] or None) if image.is_image and proc.ports else None,
            image_archive=image.archive,
            root=image.root,
        )

    async def _image(self, artifact: Artifact) -> _ImageJob:
        """What the backend needs to run a Docker artifact here (see the module docstring)."""
        if artifact.uri.startswith(ARCHIVE_SCHEME):
            digest = artifact.digest
            assert digest is not None
            try:
                archive = await self.blobs.local_path(digest)
                if self.backend_name == "docker":
                    image_id = artifact.meta.get("image_id")
                    if not image_id:
                        raise StartFailed(f"artifact {artifact.id} does not name its image's id")
                    return _ImageJob(image=image_id, archive=archive)
                self._unpacking_images.add(digest)
                try:
                    unpacked = await unpack_image(archive, self.work_dir, digest, node=self.node)
                finally:
                    self._unpacking_images.discard(digest)
            except FlynnError as exc:
                raise StartFailed(f"cannot get image archive {digest}: {exc}") from None
            return _ImageJob(root=ImageRoot(unpacked.rootfs, unpacked.config))
        if self.backend_name != "docker":
            raise StartFailed(
                f"artifact {artifact.id} is a Docker image and node {self.node} "
                "runs jobs as processes (start it with --backend docker, or deploy the "
                "image with --image-tar)"
            )
        return _ImageJob(image=artifact.uri.removeprefix("docker://").removeprefix("docker:"))


@dataclass(frozen=True)
class _ImageJob:
    image: str | None = None
    archive: Path | None = None
    root: ImageRoot | None = None

    @property
    def is_image(self) -> bool:
        return self.image is not None or self.root is not None

    def runs_own_command(self, one_off: bool) -> bool:
        return self.is_image and not one_off
