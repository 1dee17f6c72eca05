"""The test app: a tiny slug (Heroku's format) with a web server, a worker and a crasher,
and helpers to deploy it and watch its jobs through a real agent's API."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.harness import wait_for

SERVER = b'''\
import http.server, os, sys
job, port = os.environ["JOB_ID"], int(os.environ["PORT"])
print(f"listening {job} on {port}", flush=True)
print(f"stderr of {job}", file=sys.stderr, flush=True)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{job} {os.environ.get('GREETING', '')}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
'''

PROCFILE = b"""\
web: python3 server.py
worker: python3 -u -c "import time; print('worker up'); time.sleep(100000)"
crash: echo crashing; exit 3
"""


def _add(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    else:
        info.size = len(data)
        info.mode = mode
        tar.addfile(info, io.BytesIO(data))


def make_slug(path: Path, procfile: bytes = PROCFILE) -> tuple[Path, str]:
    """Write the slug tarball; return (path, digest)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _add(tar, "./app", None)
        _add(tar, "./app/.profile.d", None)
        _add(tar, "./app/.profile.d/greeting.sh", b"export GREETING=${GREETING:-hello}\n")
        _add(tar, "./app/Procfile", procfile)
        _add(tar, "./app/server.py", SERVER)
    path.write_bytes(buf.getvalue())
    return path, "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()


async def deploy(c: httpx.AsyncClient, app: str, slug: Path, digest: str) -> dict[str, Any]:
    """Create `app` if needed, upload the slug, release it; return the release response."""
    r = await c.get(f"/v1/apps/{app}")
    if r.status_code == 404:
        r = await c.post("/v1/apps", json={"name": app})
        assert r.status_code == 201, r.text
    r = await c.put(f"/v1/blobs/{digest}", content=slug.read_bytes(), timeout=30)
    assert r.status_code in (200, 201), r.text
    r = await c.post(f"/v1/apps/{app}/releases", json={"slug": digest}, timeout=30)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def scale(c: httpx.AsyncClient, app: str, **counts: int) -> dict[str, Any]:
    r = await c.put(f"/v1/apps/{app}/formation", json={"processes": counts})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def jobs(c: httpx.AsyncClient, app: str, all: bool = False) -> dict[str, Any]:
    r = await c.get(f"/v1/apps/{app}/jobs", params={"all": "1"} if all else None)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def live(body: dict[str, Any], ptype: str = "web") -> list[dict[str, Any]]:
    return [j for j in body["jobs"] if j["process_type"] == ptype and j["state"] not in ("down",)]


async def wait_up(
    c: httpx.AsyncClient,
    app: str,
    count: int,
    ptype: str = "web",
    timeout: float = 30.0,
    check: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Exactly `count` jobs of `ptype`, all up, nothing else live of that type."""

    async def ready() -> list[dict[str, Any]] | None:
        body = await jobs(c, app)
        mine = live(body, ptype)
        ok = len(mine) == count and all(j["state"] == "up" for j in mine)
        return mine if ok and (check is None or check(mine)) else None

    return await wait_for(ready, timeout, f"{count} x {ptype} up in {app}", interval=0.1)


async def answers(address: str) -> str:
    async with httpx.AsyncClient(timeout=3.0) as h:
        r = await h.get(f"http://{address}/")
        assert r.status_code == 200
        return r.text


async def log_lines(
    c: httpx.AsyncClient, app: str, **params: str
) -> list[dict[str, Any]]:
    import json

    out = []
    async with c.stream("GET", f"/v1/apps/{app}/log", params=params, timeout=60) as r:
        assert r.status_code == 200, await r.aread()
        async for raw in r.aiter_lines():
            if raw.strip():
                out.append(json.loads(raw))
    return out
