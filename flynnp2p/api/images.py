"""Docker image deploys: a release whose artifact is an image, not a slug.

    POST /v1/apps/<app>/deploy   {"image": REF}          an image this node's Docker engine has
                                 {"image_tar": DIGEST}   a ``docker save`` archive uploaded to the
                                                         blobstore (PUT /v1/blobs/<digest>)
                                 → 201 {"release", "formation", "artifact", "replicas"}

Theory of operation
-------------------
Two steps, because the image is looked at where it is and the release is made where
releases are numbered:

1. *Resolve*, on the node that receives the request: ``image`` is inspected on this
   node's engine (a ref it lacks is a 400 naming it: there is no registry to pull
   from); ``image_tar`` is read from the blobstore and checked as an archive
   (`flynnp2p.host.rootfs.read_archive`: not one is a 400 saying so, one over
   `MAX_ARCHIVE_BYTES` a 413 naming the limit). Either way the image's config
   gives the release's ``web`` process (`flynnp2p.host.image.web_process`) and its
   id. The resolved deploy is sent to this node's own API as ``{"resolved": ...}``,
   as a git push sends its slug release (`flynnp2p.build.deploy`).
2. *Release*, on the leader: ``{"resolved"}`` is forwarded there like any change
   (`flynnp2p.api.forward`), and the leader writes the artifact, the release and the
   formation in one batch, numbered under the app's lock, with the slug release's
   rule (`flynnp2p.api.ops.slug_release`: the app's env carries over, the
   formation moves to it, the first one runs ``web=1``).

The artifact is ``type="docker"`` with ``uri="docker:REF"`` or
``uri="docker-archive:DIGEST"`` (and that digest, so the blob is kept), and the
image's id in ``meta["image_id"]``; how a host runs each is `flynnp2p.host.prepare`'s.
The image's ``Env`` is not copied into the release: hosts merge it under the
release's env when a job starts (`flynnp2p.host.image`).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import trio
from quart import Blueprint, Response

from flynnp2p import vocab
from flynnp2p.api import edge, ops
from flynnp2p.api.apps import AppsApi
from flynnp2p.api.render import wire
from flynnp2p.errors import ClusterError, NotFound, UserError
from flynnp2p.host.image import ImageConfig, image_config, web_process
from flynnp2p.host.prepare import ARCHIVE_SCHEME
from flynnp2p.host.rootfs import inspect_archive
from flynnp2p.state.merge import Change
from flynnp2p.state.records import META, App, Artifact, Formation, ProcessSpec, Release
from flynnp2p.state.schema import Str

MAX_ARCHIVE_BYTES = 2 << 30  # the largest docker save archive taken (2 GiB)
IMAGE_SCHEME = "docker:"
# A local image reference: NAME[:TAG][@DIGEST] or an image id, as docker spells them.
IMAGE_REF = Str(
    r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*", "an image reference like NAME:TAG or an image id",
    max_len=255,
)  # fmt: skip
IMAGE_ID = Str(r"sha256:[0-9a-f]{64}", "sha256: and 64 lowercase hex digits", max_len=71)
RESOLVE_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class ArchiveTooLarge(UserError):
    status = 413
    code = "too_large"


class Archives(Protocol):
    """What the API needs of `flynnp2p.build.blobs.BlobService`."""

    async def local_path(self, digest: str) -> Path: ...


def inspect_on_engine(ref: str) -> dict[str, Any]:
    """``docker image inspect REF`` on this node's engine (blocking)."""
    import docker  # the SDK is slow to import; only image deploys need it here
    import docker.errors

    try:
        client = docker.from_env(timeout=30)
    except docker.errors.DockerException as exc:
        raise UserError(
            f"image {ref!r}: this node has no Docker engine to find it in ({exc}); send the "
            "deploy to a node that has the image, or deploy a docker save archive with --image-tar"
        ) from None
    try:
        attrs: dict[str, Any] = client.api.inspect_image(ref)
    except docker.errors.NotFound:
        raise UserError(
            f"image {ref!r} is not on this node's Docker engine, and there is no registry to pull "
            "it from: build, import or load it there first (see 'docker images'), or deploy a "
            "docker save archive with --image-tar"
        ) from None
    except docker.errors.DockerException as exc:
        raise ClusterError(f"image {ref!r}: this node's Docker engine failed: {exc}") from None
    finally:
        client.close()
    return attrs


class ImagesApi:
    """`apps`: the node's app API (its forwarder and release numbering); `api`/`api_url`:
    a client of this node's own API carrying the peer credential; `inspect`: the engine
    (tests may pass another)."""

    def __init__(
        self, apps: AppsApi, archives: Archives, api: httpx.AsyncClient, api_url: str, *,
        inspect: Callable[[str], dict[str, Any]] = inspect_on_engine,
        max_archive_bytes: int = MAX_ARCHIVE_BYTES,
    ) -> None:  # fmt: skip
        self.apps = apps
        self.archives = archives
        self.api = api
        self.api_url = api_url.rstrip("/")
        self.inspect = inspect
        self.max_archive_bytes = max_archive_bytes

    async def deploy(self, app: str) -> Response:
        body = await edge.json_body({"image", "image_tar", "resolved"})
        found = self.apps.app(app)
        given = [k for k in ("image", "image_tar", "resolved") if k in body]
        if len(given) != 1:
            raise UserError(
                "body: give one of 'image' (an image on this node's Docker engine, NAME:TAG) or "
                "'image_tar' (the digest of a docker save archive uploaded to /v1/blobs)"
            )
        if "resolved" in body:
            return await self._release(found, body["resolved"])
        if "image" in body:
            resolved = await self._resolve_image(IMAGE_REF.decode("image", body["image"]))
        else:
            resolved = await self._resolve_archive(
                edge.DIGEST.decode("image_tar", body["image_tar"])
            )
        return await self._send_on(found, resolved)

    # -- 1. resolve, here ------------------------------------------------------------

    async def _resolve_image(self, ref: str) -> dict[str, Any]:
        attrs = await trio.to_thread.run_sync(self.inspect, ref)
        config = image_config(attrs.get("Config"))
        return _resolved(
            f"{IMAGE_SCHEME}{ref}", str(attrs.get("Id", "")), config, f"image {ref}", {"image": ref}
        )

    async def _resolve_archive(self, digest: str) -> dict[str, Any]:
        try:
            path = await self.archives.local_path(digest)
        except NotFound:
            raise UserError(
                f"image_tar: no node holds blob {digest}; upload the archive first (PUT /v1/blobs/{digest})"
            ) from None
        size = (await trio.to_thread.run_sync(path.stat)).st_size
        if size > self.max_archive_bytes:
            raise ArchiveTooLarge(
                f"image_tar: the archive is {size} bytes, over the limit of {self.max_archive_bytes} bytes"
            )
        info = await inspect_archive(path)
        resolved = _resolved(
            f"{ARCHIVE_SCHEME}{digest}", info.image_id, info.config, f"image archive {digest}",
            {"image_tar": digest, **({"image": info.manifest.tags[0]} if info.manifest.tags else {})},
        )  # fmt: skip
        return {**resolved, "digest": digest, "size": size}

    async def _send_on(self, app: App, resolved: dict[str, Any]) -> Response:
        """The resolved deploy, through this node's own API (and so to the leader)."""
        url = f"{self.api_url}/v1/apps/{quote(app.name, safe='')}/deploy"
        try:
            resp = await self.api.post(url, json={"resolved": resolved}, timeout=RESOLVE_TIMEOUT)
        except httpx.HTTPError as exc:
            raise ClusterError(f"this node's API did not take the deploy: {exc}; retry") from None
        return Response(
            resp.content, status=resp.status_code,
            content_type=resp.headers.get("content-type", "application/json"),
        )  # fmt: skip

    # -- 2. release, on the leader -----------------------------------------------------

    async def _release(self, app: App, given: Any) -> Response:
        artifact, web, meta = _decode_resolved(given)
        relayed = await self.apps.forwarder.via_leader()
        if relayed is not None:
            return relayed
        now = self.apps.ctx.now_ms()
        artifact = dataclasses.replace(artifact, id=uuid.uuid4().hex, created_at=now)

        def build(base: Release | None, number: int) -> tuple[Release, list[Change]]:
            formation = self.apps.state.record(Formation, app.id)
            release, moved = ops.slug_release(
                app, base, formation, number, artifact=artifact, types={"web": web.command},
                env={}, meta=meta, now=now,
            )  # fmt: skip
            deploy = ops.deployment_changes(self.apps.state, app, moved, now)
            return dataclasses.replace(release, processes={"web": web}), [artifact, moved, *deploy]

        release, extra, result = await self.apps.next_release(app, build)
        formation = next(c for c in extra if isinstance(c, Formation))
        return edge.answer(
            {
                "release": wire(release),
                "formation": wire(formation),
                "artifact": wire(artifact),
                "replicas": result.replicas,
            },
            201,
        )


def _resolved(
    uri: str, image_id: str, config: ImageConfig, what: str, meta: dict[str, str]
) -> dict[str, Any]:
    web = web_process(config, what)
    return {"uri": uri, "image_id": image_id, "web": web.to_wire(), "meta": meta}


def _decode_resolved(given: Any) -> tuple[Artifact, ProcessSpec, dict[str, str]]:
    """The artifact (id and time still to fill in), web process and release meta of
    ``{"resolved"}``; a 400 naming the field if any is off."""
    if not isinstance(given, dict):
        raise UserError("resolved: expected an object")
    unknown = sorted(set(given) - {"uri", "image_id", "web", "meta", "digest", "size"})
    if unknown:
        raise UserError(f"resolved: unknown field(s) {vocab.show(unknown)}")
    uri = given.get("uri")
    digest = given.get("digest")
    if not isinstance(uri, str) or not uri.startswith((IMAGE_SCHEME, ARCHIVE_SCHEME)):
        raise UserError(f"resolved.uri: expected {IMAGE_SCHEME}REF or {ARCHIVE_SCHEME}DIGEST")
    if uri.startswith(ARCHIVE_SCHEME) and uri != f"{ARCHIVE_SCHEME}{digest}":
        raise UserError("resolved.digest: must be the archive's digest, as in its uri")
    fields: dict[str, Any] = {
        "id": "0", "type": "docker", "uri": uri, "created_at": 0,
        "meta": {"image_id": IMAGE_ID.decode("resolved.image_id", given.get("image_id"))},
    }  # fmt: skip
    if digest is not None:
        fields["digest"] = digest
    if given.get("size") is not None:
        fields["size"] = given["size"]
    artifact = Artifact.decode_fields("resolved", fields)
    web = ProcessSpec.decode_fields("resolved.web", given.get("web"))
    return artifact, web, dict(META.decode("resolved.meta", given.get("meta", {})))


def images_blueprint(images: ImagesApi) -> Blueprint:
    bp = Blueprint("images", __name__)
    rules: Iterable[tuple[str, str, Any]] = (("POST", "/v1/apps/<app>/deploy", images.deploy),)
    for method, rule, view in rules:
        bp.add_url_rule(rule, view.__name__, view, methods=[method])
    return bp
