"""Component tests of a release of a slug given its process types (flynnp2p/api/apps.py).

The real quart-trio app with the app API over a real `StateService` and a real
`BlobService` (one node, no peers) holding the slugs. A git push's build read the
slug's Procfile already (it wrote it), so it gives the types with the release and
the API does not decompress the slug again (nor fetch it to the leader) to read
them: a blob that is no tarball at all shows that it was not read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from flynnp2p.api.app import create_app
from flynnp2p.api.apps import AppsApi, apps_blueprint
from flynnp2p.build.blobs import BlobService
from flynnp2p.build.blobstore import BlobStore
from flynnp2p.peering import Peer
from flynnp2p.state.records import Artifact
from tests.test_api_apps import Api, Clock, Ctx, Node, start_service


class NoPeers:
    def alive_peers(self) -> list[Peer]:
        return []


def slug_bytes(procfile: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("./app/Procfile")
        info.size = len(procfile.encode())
        tar.addfile(info, io.BytesIO(procfile.encode()))
    return gzip.compress(buf.getvalue())


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def store(blobs: BlobService, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await blobs.put(digest, _one(data), replicate=False)
    return digest


@pytest.fixture
async def node(nursery: trio.Nursery, tmp_path: Path) -> tuple[Ctx, Api, BlobService]:
    ctx = Ctx(await start_service(nursery), Clock())
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    blobs = BlobService(BlobStore(tmp_path / "blobs"), ctx.state, NoPeers(), http, "n1", ctx.now_ms)
    app = create_app(Node())
    apps = AppsApi(ctx, slug_path=blobs.local_path, slug_size=blobs.size)
    app.register_blueprint(apps_blueprint(ctx, api=apps))
    api = Api(app)
    status, _ = await api.call("POST", "/v1/apps", {"name": "shop"})
    assert status == 201
    return ctx, api, blobs


async def release(api: Api, body: dict[str, Any]) -> tuple[int, Any]:
    return await api.call("POST", "/v1/apps/shop/releases", body)


async def test_given_process_types_make_the_release_without_reading_the_slug(
    node: tuple[Ctx, Api, BlobService],
) -> None:
    ctx, api, blobs = node
    junk = b"not a gzipped tar: reading it would fail"
    digest = await store(blobs, junk)
    types = {"web": "python app.py", "worker": "python work.py --fast"}
    status, body = await release(api, {"slug": digest, "process_types": types})
    assert status == 201, body
    assert {t: p["command"] for t, p in body["release"]["processes"].items()} == types
    assert body["release"]["processes"]["web"]["ports"] == [0]  # web gets a port, as in a Procfile
    assert body["formation"]["processes"] == {"web": 1}
    artifact = ctx.state.state.record(Artifact, body["release"]["artifacts"][0])
    assert artifact is not None and artifact.digest == digest and artifact.size == len(junk)

    # Without them the slug is read, as before: this one is not a slug.
    status, body = await release(api, {"slug": digest})
    assert status == 400 and "not a gzipped tar" in body["error"]["message"], body


async def test_without_process_types_the_slugs_procfile_gives_them(
    node: tuple[Ctx, Api, BlobService],
) -> None:
    _, api, blobs = node
    digest = await store(blobs, slug_bytes("web: ./serve\n"))
    status, body = await release(api, {"slug": digest})
    assert status == 201, body
    assert body["release"]["processes"]["web"]["command"] == "./serve"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["web"], "expected an object of TYPE: COMMAND strings"),
        ({"web": 3}, "expected an object of TYPE: COMMAND strings"),
        ({"web": "a\nworker: b"}, "expected an object of TYPE: COMMAND strings"),
        ({"we b": "x"}, "release.process_types: Procfile line 1: expected 'TYPE: COMMAND'"),
        ({"web": ""}, "release.process_types: Procfile line 1: expected 'TYPE: COMMAND'"),
        ({"web": " x"}, "commands must not start or end with spaces"),
        ({"web": "x" * 5000}, "longer than 4096 characters"),
        ({}, "the slug has no ./app/Procfile"),
    ],
)
async def test_bad_process_types_are_refused_naming_the_field(
    node: tuple[Ctx, Api, BlobService], given: Any, message: str
) -> None:
    _, api, blobs = node
    digest = await store(blobs, slug_bytes("web: ./serve\n"))
    status, body = await release(api, {"slug": digest, "process_types": given})
    assert status == 400 and message in body["error"]["message"], body


async def test_a_slug_no_node_holds_is_refused_with_the_hint(
    node: tuple[Ctx, Api, BlobService],
) -> None:
    _, api, _ = node
    digest = "sha256:" + "0" * 64
    status, body = await release(api, {"slug": digest, "process_types": {"web": "x"}})
    assert status == 400, body
    assert body["error"]["message"] == (
        f"release.slug: no node holds blob {digest}; upload it first (PUT /v1/blobs/{digest})"
    )
