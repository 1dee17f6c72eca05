"""git smart HTTP, the pure part: which requests reach `git http-backend`, with
what CGI environment, and how its answer's header block is read.

Theory of operation
-------------------
Only the three requests of the smart protocol are served, for one app's
repository; everything else (the dumb protocol's ``objects/…`` and ``HEAD``
files, other names, ``..``) is refused here, before any process starts::

    GET  /git/<app>.git/info/refs?service=git-upload-pack | git-receive-pack
    POST /git/<app>.git/git-upload-pack
    POST /git/<app>.git/git-receive-pack

``<app>`` is an app's name (`flynnp2p.vocab.APP_NAME`); the repository on disk
is named by the app's id, so the URL never names a file. The CGI environment is
built from scratch (nothing of the agent's own environment but ``PATH`` and
``HOME``), per RFC 3875 and git-http-backend(1): ``GIT_PROJECT_ROOT`` and
``PATH_INFO`` select the repository, ``REMOTE_USER`` and ``http.receivepack``
allow pushes, ``HTTP_CONTENT_ENCODING`` lets the backend inflate gzip bodies,
``HTTP_GIT_PROTOCOL`` carries protocol v2. ``CONTENT_LENGTH`` is set only when the
client sent one; a chunked body is read to its end (the backend's stdin closes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flynnp2p import vocab
from flynnp2p.errors import NotFound, UserError
from flynnp2p.vocab import show

GIT_PREFIX = "/git/"
SERVICES = ("git-upload-pack", "git-receive-pack")
MAX_CGI_HEADER = 64 << 10


@dataclass(frozen=True)
class GitRequest:
    app: str  # the app's name, as the URL gave it
    service: str  # git-upload-pack or git-receive-pack
    advertise: bool  # GET info/refs (the refs), else the POST of the service itself

    @property
    def is_push(self) -> bool:
        return self.service == "git-receive-pack"


def parse_git_request(method: str, path: str, service_arg: str | None) -> GitRequest:
    """The request `path` (under ``/git/``) names, or a `UserError` (400 for a bad
    app name, 404 for anything that is not one of the three smart requests)."""
    rest = path[len(GIT_PREFIX) :]
    repo, sep, tail = rest.partition("/")
    if not repo.endswith(".git") or not sep:
        raise NotFound(f"no such git endpoint: {show(path)} (use http://NODE:PORT/git/APP.git)")
    app = vocab.APP_NAME.check("app", repo[: -len(".git")])
    if tail == "info/refs" and method in ("GET", "HEAD"):
        if service_arg not in SERVICES:
            raise UserError(
                "only git's smart HTTP protocol is served: expected ?service=git-upload-pack "
                f"or git-receive-pack, got {show(service_arg)}"
            )
        return GitRequest(app, service_arg, advertise=True)
    if tail in SERVICES and method == "POST":
        return GitRequest(app, tail, advertise=False)
    raise NotFound(f"no such git endpoint: {method} {show(path)}")


def cgi_environ(
    req: GitRequest, *, project_root: str, repo_name: str, method: str, query: str,
    headers: Mapping[str, str], remote_addr: str, base: Mapping[str, str],
) -> dict[str, str]:  # fmt: skip
    """The environment of one `git http-backend` run (`base`: PATH, HOME and the
    hook's variables)."""
    tail = "info/refs" if req.advertise else req.service
    env = {
        **base,
        "GATEWAY_INTERFACE": "CGI/1.1",
        "GIT_PROJECT_ROOT": project_root,
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": f"/{repo_name}/{tail}",
        "REQUEST_METHOD": method,
        "QUERY_STRING": query,
        "REMOTE_USER": "flynnp2p",
        "REMOTE_ADDR": remote_addr,
        "SERVER_PROTOCOL": "HTTP/1.1",
    }
    lower = {k.lower(): v for k, v in headers.items()}
    if "content-type" in lower:
        env["CONTENT_TYPE"] = lower["content-type"]
    if "content-length" in lower:
        env["CONTENT_LENGTH"] = lower["content-length"]
    if "content-encoding" in lower:
        env["HTTP_CONTENT_ENCODING"] = lower["content-encoding"]
    if "git-protocol" in lower:
        env["HTTP_GIT_PROTOCOL"] = lower["git-protocol"]
    return env


@dataclass(frozen=True)
class CgiHead:
    status: int
    headers: tuple[tuple[str, str], ...]


class CgiError(Exception):
    """The backend's answer did not start with a CGI header block."""


def split_cgi_head(buf: bytes) -> tuple[CgiHead, bytes] | None:
    """The CGI header block at the start of `buf` and the body bytes after it, or
    None while the block is incomplete."""
    end, skip = buf.find(b"\r\n\r\n"), 4
    lf = buf.find(b"\n\n")
    if lf != -1 and (end == -1 or lf < end):
        end, skip = lf, 2
    if end == -1:
        if len(buf) > MAX_CGI_HEADER:
            raise CgiError("git http-backend sent a header block over 64 KiB")
        return None
    status = 200
    headers: list[tuple[str, str]] = []
    for raw in buf[:end].decode("latin-1").splitlines():
        if not raw.strip():
            continue
        name, colon, value = raw.partition(":")
        if not colon:
            raise CgiError(f"git http-backend sent a bad header line {show(raw)}")
        name, value = name.strip(), value.strip()
        if name.lower() == "status":
            try:
                status = int(value.split()[0])
            except (ValueError, IndexError):
                raise CgiError(f"git http-backend sent a bad status {show(value)}") from None
        else:
            headers.append((name, value))
    return CgiHead(status, tuple(headers)), buf[end + skip :]
