"""The pure parts of git push: which requests reach git http-backend, the CGI
environment and header block, hook input, basic auth and the credential helper
(synchronous, no git, no sockets)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest

from flynnp2p.api.app import basic_password
from flynnp2p.build.githttp import (
    CgiError,
    GitRequest,
    cgi_environ,
    parse_git_request,
    split_cgi_head,
)
from flynnp2p.build.hooks import RefUpdate, install_hooks, parse_updates
from flynnp2p.cli.git import credential_answer, helper_command, read_credential_request, remote_url
from flynnp2p.errors import NotFound, UserError
from flynnp2p.token import ClusterToken

ZERO = "0" * 40


@pytest.mark.parametrize(
    ("method", "path", "service", "expected"),
    [
        ("GET", "/git/hello.git/info/refs", "git-upload-pack", GitRequest("hello", "git-upload-pack", True)),
        ("GET", "/git/hello.git/info/refs", "git-receive-pack", GitRequest("hello", "git-receive-pack", True)),
        ("POST", "/git/hello.git/git-upload-pack", None, GitRequest("hello", "git-upload-pack", False)),
        ("POST", "/git/my-app-2.git/git-receive-pack", None, GitRequest("my-app-2", "git-receive-pack", False)),
    ],
)  # fmt: skip
def test_the_three_smart_requests(method: str, path: str, service: str | None, expected: GitRequest) -> None:
    assert parse_git_request(method, path, service) == expected
    assert expected.is_push == (expected.service == "git-receive-pack")


@pytest.mark.parametrize(
    ("method", "path", "service", "error", "says"),
    [
        ("GET", "/git/../x.git/info/refs", "git-upload-pack", NotFound, "no such git endpoint"),
        ("GET", "/git/hello/info/refs", "git-upload-pack", NotFound, "APP.git"),
        ("GET", "/git/hello.git", None, NotFound, "no such git endpoint"),
        ("GET", "/git/Bad_Name.git/info/refs", "git-upload-pack", UserError, "lowercase letters"),
        ("GET", "/git/a/../b.git/info/refs", "git-upload-pack", NotFound, "no such git endpoint"),
        ("GET", "/git/hello.git/info/refs", None, UserError, "smart HTTP"),
        ("GET", "/git/hello.git/info/refs", "git-daemon", UserError, "smart HTTP"),
        ("GET", "/git/hello.git/HEAD", None, NotFound, "no such git endpoint"),
        ("GET", "/git/hello.git/objects/info/packs", None, NotFound, "no such git endpoint"),
        ("GET", "/git/hello.git/git-upload-pack", None, NotFound, "no such git endpoint"),
        ("POST", "/git/hello.git/info/refs", "git-upload-pack", NotFound, "no such git endpoint"),
        ("POST", "/git/hello.git/git-receive-pack/x", None, NotFound, "no such git endpoint"),
    ],
)  # fmt: skip
def test_everything_else_is_refused(
    method: str, path: str, service: str | None, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says) as caught:
        parse_git_request(method, path, service)
    assert type(caught.value) is error


def test_cgi_environment_is_built_from_scratch() -> None:
    req = GitRequest("hello", "git-receive-pack", False)
    env = cgi_environ(
        req, project_root="/d/git", repo_name="abc.git", method="POST", query="",
        headers={"Content-Type": "application/x-git-receive-pack-request", "Content-Encoding": "gzip",
                 "Git-Protocol": "version=2", "X-Other": "dropped"},
        remote_addr="127.0.0.1", base={"PATH": "/usr/bin", "HOME": "/d/git"},
    )  # fmt: skip
    assert env["GIT_PROJECT_ROOT"] == "/d/git" and env["PATH_INFO"] == "/abc.git/git-receive-pack"
    assert env["HTTP_CONTENT_ENCODING"] == "gzip" and env["HTTP_GIT_PROTOCOL"] == "version=2"
    assert env["CONTENT_TYPE"] == "application/x-git-receive-pack-request"
    assert "CONTENT_LENGTH" not in env  # chunked: read to the end of stdin
    assert env["REMOTE_USER"] == "flynnp2p" and env["GIT_HTTP_EXPORT_ALL"] == "1"
    assert not any("OTHER" in k for k in env)
    advert = cgi_environ(
        GitRequest("hello", "git-upload-pack", True), project_root="/r", repo_name="abc.git",
        method="GET", query="service=git-upload-pack", headers={"Content-Length": "0"},
        remote_addr="", base={},
    )  # fmt: skip
    assert advert["PATH_INFO"] == "/abc.git/info/refs" and advert["CONTENT_LENGTH"] == "0"
    assert advert["QUERY_STRING"] == "service=git-upload-pack"


def test_cgi_head_split_at_either_line_ending() -> None:
    crlf = b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nbody"
    head, rest = split_cgi_head(crlf) or (None, b"")
    assert head is not None and head.status == 404 and head.headers == (("Content-Type", "text/plain"),)
    assert rest == b"body"
    head, rest = split_cgi_head(b"Content-Type: application/x-git\nExpires: never\n\n\x00\x01") or (None, b"")
    assert head is not None and head.status == 200 and len(head.headers) == 2 and rest == b"\x00\x01"
    assert split_cgi_head(b"Content-Type: application/x-git\r\n") is None  # not yet complete
    with pytest.raises(CgiError, match="bad header"):
        split_cgi_head(b"nonsense\n\n")
    with pytest.raises(CgiError, match="bad status"):
        split_cgi_head(b"Status: soon\n\n")
    with pytest.raises(CgiError, match="64 KiB"):
        split_cgi_head(b"X: " + b"a" * (70 << 10))


def test_hook_input_lines() -> None:
    sha = "a" * 40
    text = f"{ZERO} {sha} refs/heads/main\n{sha} {ZERO} refs/heads/old\ngarbage\n"
    assert parse_updates(text) == [
        RefUpdate(ZERO, sha, "refs/heads/main"), RefUpdate(sha, ZERO, "refs/heads/old")
    ]  # fmt: skip
    assert [u.deleted for u in parse_updates(text)] == [False, True]


def test_basic_password() -> None:
    def basic(raw: bytes) -> str:
        return "Basic " + base64.b64encode(raw).decode()

    assert basic_password(basic(b"anyone:s3cret")) == "s3cret"
    assert basic_password(basic(b"x:with:colons")) == "with:colons"
    assert basic_password(basic(b"nocolon")) is None
    assert basic_password("Basic !!!notbase64") is None
    assert basic_password("Bearer abc") is None
    assert basic_password("") is None


def test_credential_helper_answers_for_the_cluster_host_only() -> None:
    token = ClusterToken.generate()
    asked = read_credential_request(io.StringIO("protocol=http\nhost=10.0.0.1:7100\npath=x\n\nignored=1\n"))
    assert asked == {"protocol": "http", "host": "10.0.0.1:7100", "path": "x"}
    answer = credential_answer(asked, "http://10.0.0.1:7100", token.encode())
    assert answer == f"username=flynnp2p\npassword={token.api_key}\n"  # the API key, not the whole token
    for other in ({"protocol": "https", "host": "10.0.0.1:7100"}, {"protocol": "http", "host": "10.0.0.1"},
                  {"protocol": "http", "host": "evil.example:7100"}, {}):  # fmt: skip
        assert credential_answer(other, "http://10.0.0.1:7100", token.encode()) == ""


def test_remote_url_and_helper_command() -> None:
    assert remote_url("http://n1:7100/", "hello") == "http://n1:7100/git/hello.git"
    assert helper_command(None).startswith("!") and helper_command(None).endswith(" -m flynnp2p git-credentials")
    assert " -c prod git-credentials" in helper_command("prod")


def test_hooks_are_installed_and_the_retired_post_receive_is_removed(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "post-receive").write_text("#!/bin/sh\nexec python3 -I /x/flynnp2p-hook.py post-receive\n")
    install_hooks(hooks)
    assert sorted(p.name for p in hooks.iterdir()) == ["flynnp2p-hook.py", "pre-receive"]
    assert os.access(hooks / "pre-receive", os.X_OK)
    (hooks / "post-receive").write_text("#!/bin/sh\necho the operator's own\n")
    install_hooks(hooks)  # one it did not write stays
    assert (hooks / "post-receive").read_text().endswith("the operator's own\n")
