"""Component tests of the image deploy API (flynnp2p/api/images.py).

The real quart-trio app with the app API and the image API over a real
`StateService`; the node's call to its own API goes in-process
(`tests.test_api_apps.relay_to`). Archives are real files in the layout ``docker
save`` writes; the engine's inspect is replaced by a table of images (the real
engine is the cluster test's, tests/test_cluster_images.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from flynnp2p.api.app import create_app
from flynnp2p.api.apps import AppsApi, apps_blueprint
from flynnp2p.api.images import ImagesApi, images_blueprint
from flynnp2p.errors import NotFound, UserError
from flynnp2p.state.records import Artifact
from tests.image_archives import config_doc, save_archive
from tests.test_api_apps import TOKEN, Api, Clock, Ctx, Node, relay_to, start_service

IMAGE_ID = "sha256:" + "ab" * 32
IMAGES = {
    "shop:1": {
        "Id": IMAGE_ID,
        "Config": {
            "Entrypoint": ["/bin/tini"],
            "Cmd": ["web", "--port", "8000"],
            "ExposedPorts": {"8000/tcp": {}},
        },
    },
    "empty:1": {"Id": IMAGE_ID, "Config": {"Env": ["A=1"]}},
}


def inspect(ref: str) -> dict[str, Any]:
    if ref not in IMAGES:
        raise UserError(f"image {ref!r} is not on this node's Docker engine")
    return IMAGES[ref]


class Archives:
    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}

    def add(self, path: Path) -> str:
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        self.paths[digest] = path
        return digest

    async def local_path(self, digest: str) -> Path:
        if digest not in self.paths:
            raise NotFound(f"no node holds blob {digest}")
        return self.paths[digest]


@pytest.fixture
async def node(nursery: trio.Nursery) -> tuple[Ctx, Api, Archives]:
    ctx = Ctx(await start_service(nursery), Clock())
    app = create_app(Node())
    apps = AppsApi(ctx)
    archives = Archives()
    own = httpx.AsyncClient(
        transport=relay_to(app, []), headers={"Authorization": f"Bearer {TOKEN.peer_key}"}
    )
    images = ImagesApi(
        apps, archives, own, "http://self.test", inspect=inspect, max_archive_bytes=1 << 20
    )
    app.register_blueprint(apps_blueprint(ctx, api=apps))
    app.register_blueprint(images_blueprint(images))
    api = Api(app)
    status, _ = await api.call("POST", "/v1/apps", {"name": "shop"})
    assert status == 201
    return ctx, api, archives


async def test_an_image_ref_becomes_a_release_of_its_web_process(
    node: tuple[Ctx, Api, Archives],
) -> None:
    ctx, api, _ = node
    status, body = await api.call("POST", "/v1/apps/shop/deploy", {"image": "shop:1"})
    assert status == 201, body
    release, artifact = body["release"], body["artifact"]
    assert release["processes"] == {
        "web": {"command": "/bin/tini web --port 8000", "ports": [8000], "health_check": None,
                "memory_mb": 512, "omni": False}
    }  # fmt: skip
    assert release["meta"] == {"image": "shop:1"} and release["version"] == 1
    assert release["artifacts"] == [artifact["id"]]
    assert artifact["type"] == "docker" and artifact["uri"] == "docker:shop:1"
    assert artifact["meta"] == {"image_id": IMAGE_ID}
    assert body["formation"]["processes"] == {"web": 1}  # the first release runs web=1
    assert ctx.state.state.record(Artifact, artifact["id"]) is not None

    # The next deploy keeps the app's env and moves the formation to it.
    await api.call("PATCH", "/v1/apps/shop/env", {"set": {"GREETING": "hi"}})
    await api.call("PUT", "/v1/apps/shop/formation", {"processes": {"web": 3}})
    status, body = await api.call("POST", "/v1/apps/shop/deploy", {"image": "shop:1"})
    assert status == 201, body
    assert body["release"]["env"] == {"GREETING": "hi"} and body["release"]["version"] == 3
    assert body["formation"]["processes"] == {"web": 3}
    assert body["formation"]["release_id"] == body["release"]["id"]
    assert body["artifact"]["id"] != artifact["id"]


async def test_image_deploy_errors_name_what_is_wrong(node: tuple[Ctx, Api, Archives]) -> None:
    _, api, _ = node
    for body, status, message in [
        ({"image": "nope:1"}, 400, "image 'nope:1' is not on this node's Docker engine"),
        ({"image": "empty:1"}, 400, "image empty:1 has neither ENTRYPOINT nor CMD"),
        ({"image": "-x"}, 400, "image: "),
        ({"image": "shop:1", "image_tar": "sha256:" + "0" * 64}, 400, "give one of 'image'"),
        ({}, 400, "give one of"),
        (
            {"resolved": {"uri": "docker:x", "image_id": "latest", "web": {"command": "x"}}},
            400,
            "resolved.image_id",
        ),
        ({"resolved": {"uri": "http://x", "web": {}}}, 400, "resolved.uri"),
    ]:
        got, answer = await api.call("POST", "/v1/apps/shop/deploy", body)
        assert got == status and message in answer["error"]["message"], (body, answer)
    got, answer = await api.call("POST", "/v1/apps/nope/deploy", {"image": "shop:1"})
    assert got == 404


async def test_an_archive_becomes_a_release_and_bad_ones_are_refused(
    node: tuple[Ctx, Api, Archives], tmp_path: Path
) -> None:
    _, api, archives = node
    config = config_doc(Cmd=["/bin/sh", "/srv/run.sh"], Env=["A=1"])
    digest = archives.add(
        save_archive(tmp_path / "img.tar", [[("srv/run.sh", "file", b"x", 0o755)]], config)
    )
    status, body = await api.call("POST", "/v1/apps/shop/deploy", {"image_tar": digest})
    assert status == 201, body
    artifact = body["artifact"]
    assert artifact["uri"] == f"docker-archive:{digest}" and artifact["digest"] == digest
    assert artifact["meta"] == {"image_id": "sha256:" + hashlib.sha256(config).hexdigest()}
    assert body["release"]["processes"]["web"]["ports"] == [0]  # no EXPOSE: $PORT
    assert body["release"]["meta"] == {"image_tar": digest, "image": "test:1"}

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"junk" * 100)
    big = tmp_path / "big.tar"
    big.write_bytes(b"\0" * ((1 << 20) + 1))
    hostile = save_archive(tmp_path / "evil.tar", [[("../etc/passwd", "file", b"x", 0o644)]])
    for path, status, message in [
        (junk, 400, "not a docker save archive"),
        (big, 413, "over the limit of 1048576 bytes"),
        (hostile, 400, "climbs out with '..'"),
    ]:
        got, answer = await api.call(
            "POST", "/v1/apps/shop/deploy", {"image_tar": archives.add(path)}
        )
        assert got == status and message in answer["error"]["message"], (path, answer)
    got, answer = await api.call(
        "POST", "/v1/apps/shop/deploy", {"image_tar": "sha256:" + "1" * 64}
    )
    assert got == 400 and "upload the archive first" in answer["error"]["message"]
