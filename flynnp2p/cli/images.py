"""``flynnp2p deploy --image REF | --image-tar FILE``: deploy a Docker image, no build.

``--image`` names an image on the Docker engine of the node the CLI talks to (it
is inspected there; there is no registry). ``--image-tar`` uploads a ``docker
save`` archive to the cluster's blobstore first (streamed; content addressed, so
an archive already there is not stored twice), and then any node can run it:
docker-backend nodes load it, process-backend nodes unpack its root filesystem.
Both make a release whose ``web`` process is the image's (`flynnp2p.api.images`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import httpx

from flynnp2p.cli.apps import UPLOAD_TIMEOUT, release_summary, slug_digest
from flynnp2p.cli.client import ApiClient
from flynnp2p.cli.common import app_options, app_path, client_for, print_json
from flynnp2p.errors import UserError

MAX_ARCHIVE_BYTES = 2 << 30  # as the API takes them (flynnp2p.api.images)
CHUNK = 1 << 20
DEPLOY_TIMEOUT = httpx.Timeout(10.0, read=300.0)  # the node reads the whole archive


def _chunks(path: Path) -> Any:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def upload_archive(client: ApiClient, path: Path) -> str:
    """The archive in the cluster's blobstore; its digest."""
    try:
        size = path.stat().st_size
        if size > MAX_ARCHIVE_BYTES:
            raise UserError(
                f"{str(path)!r} is {size} bytes, over the limit of {MAX_ARCHIVE_BYTES} bytes "
                "for an image archive"
            )
        digest, size = slug_digest(path)
        client.request(
            "PUT", f"/v1/blobs/{digest}", content=_chunks(path), timeout=UPLOAD_TIMEOUT,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )  # fmt: skip
    except OSError as exc:
        raise UserError(f"cannot read image archive {str(path)!r}: {exc.strerror or exc}") from None
    return digest


def cmd_deploy(args: argparse.Namespace) -> int:
    client = client_for(args)
    if args.image is not None:
        body = {"image": args.image}
    else:
        body = {"image_tar": upload_archive(client, Path(args.image_tar))}
    resp = client.request("POST", app_path(args, "deploy"), json=body, timeout=DEPLOY_TIMEOUT)
    if args.json:
        print_json(resp)
        return 0
    web = resp["release"]["processes"].get("web", {})
    print(release_summary(resp))
    print(f"web: {web.get('command', '?')}  (see 'flynnp2p ps' and 'flynnp2p log')")
    return 0


def add_image_commands(sub: Any) -> None:
    p = sub.add_parser(
        "deploy",
        parents=[app_options(nested=False)],
        help="deploy a Docker image (no build): --image REF or --image-tar FILE",
        description="Make a release of a Docker image and deploy it: its ENTRYPOINT/CMD is the "
        "web process, its ENV is under the app's env, and it listens on its first EXPOSEd port "
        "(else on $PORT).",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", metavar="REF", help="an image on the Docker engine of the node "
                       "this CLI talks to, e.g. NAME:TAG")  # fmt: skip
    which.add_argument("--image-tar", metavar="FILE", help="a 'docker save' archive to upload: "
                       "nodes without the image, and process-backend nodes, can run it")  # fmt: skip
    p.set_defaults(func=cmd_deploy)
