"""Ambiguous HTTP framing and oversized bodies against a real agent, over raw sockets.

A request whose length could be read two ways (Content-Length and
Transfer-Encoding, two Content-Lengths, a length that is not a number) is what
request smuggling through a proxy is made of: it is refused with 400 and
``Connection: close`` before the app sees it.  A length far over the limit is
413 at once.  Every error names its reason.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from tests.harness import AgentProc, Cluster, wait_for
from tests.test_cluster_state import get_app

pytestmark = pytest.mark.slow

SMUGGLED = b'{"name":"smuggled"}'


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def raw(agent: AgentProc, head: list[str], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send one request as bytes; (status, headers, body) of the answer, read until close
    or until the answer's Content-Length is complete."""
    lines = [*head, f"Host: {agent.addr}", f"Authorization: Bearer {agent.token.api_key}"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    with socket.create_connection((agent.addr, agent.api_port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        head_bytes, _, rest = got.partition(b"\r\n\r\n")
        status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(status_line.split()[1]), headers, rest


def post_apps(*extra: str) -> list[str]:
    return ["POST /v1/apps HTTP/1.1", "Content-Type: application/json", *extra]


# Both framings at once: h11 lets them through (Transfer-Encoding wins), the
# API's guard refuses them with a reason.
GUARDED = [
    pytest.param(post_apps(f"Content-Length: {len(SMUGGLED)}", "Transfer-Encoding: chunked"),
                 chunked(SMUGGLED), id="cl-and-te"),
    pytest.param(post_apps("Transfer-Encoding: chunked", "Content-Length: 4"),
                 chunked(SMUGGLED), id="te-and-cl"),
    pytest.param(post_apps("Transfer-Encoding: chunked", "content-length: 0"),
                 chunked(SMUGGLED), id="te-and-cl-lowercase"),
]  # fmt: skip

# What h11 refuses itself, before any ASGI code runs: hypercorn answers these
# with an empty body (no reason can be added without replacing its protocol).
H11_REFUSED = [
    pytest.param(post_apps(f"Content-Length: {len(SMUGGLED)}", f"Content-Length: {len(SMUGGLED) + 1}"),
                 SMUGGLED + b" ", 400, id="conflicting-cl"),
    pytest.param(post_apps(f"Content-Length: {len(SMUGGLED)}, {len(SMUGGLED) + 1}"),
                 SMUGGLED + b" ", 400, id="conflicting-cl-list"),
    pytest.param(post_apps("Content-Length: abc"), SMUGGLED, 400, id="cl-not-a-number"),
    pytest.param(post_apps("Content-Length: -19"), SMUGGLED, 400, id="cl-negative"),
    pytest.param(post_apps("Content-Length: +19"), SMUGGLED, 400, id="cl-plus"),
    pytest.param(post_apps("Transfer-Encoding: gzip, chunked"), chunked(SMUGGLED), 501,
                 id="te-not-chunked"),
    pytest.param(post_apps("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
                 chunked(SMUGGLED), 501, id="te-twice"),
]  # fmt: skip


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """One agent for the whole module (starting one per test took 3.5 s of each)."""
    cluster = Cluster(tmp_path_factory.mktemp("edge-http"))
    try:
        (a,) = trio.run(cluster.start, 1)
        yield a
    finally:
        cluster.kill_all()


@pytest.fixture
async def agent(shared: AgentProc) -> AsyncIterator[AgentProc]:
    """The module's agent, alive; no app "smuggled" before or after each test."""
    assert shared.running, shared.log_tail()
    assert await get_app(shared, "smuggled") is None
    yield shared
    async with shared.client() as c:
        r = await c.delete("/v1/apps/smuggled", timeout=15)
        assert r.status_code in (200, 204, 404), r.text


async def no_app_then_one(agent: AgentProc) -> None:
    """Nothing was created; the same body framed one way only is taken."""
    assert await get_app(agent, "smuggled") is None
    status, _, answer = await trio.to_thread.run_sync(
        raw, agent, post_apps(f"Content-Length: {len(SMUGGLED)}"), SMUGGLED
    )
    assert status == 201, answer


@pytest.mark.parametrize(("head", "body"), GUARDED)
async def test_both_framings_are_400_with_a_reason_and_close(
    agent: AgentProc, head: list[str], body: bytes
) -> None:
    status, headers, answer = await trio.to_thread.run_sync(raw, agent, head, body)
    assert status == 400, (status, answer)
    assert headers.get("connection", "").lower() == "close"
    assert "Content-Length and Transfer-Encoding" in json.loads(answer)["error"]["message"]
    await no_app_then_one(agent)


@pytest.mark.parametrize(("head", "body", "expected"), H11_REFUSED)
async def test_malformed_lengths_are_refused_and_close(
    agent: AgentProc, head: list[str], body: bytes, expected: int
) -> None:
    status, headers, answer = await trio.to_thread.run_sync(raw, agent, head, body)
    assert status == expected, (status, answer)
    assert headers.get("connection", "").lower() == "close"
    await no_app_then_one(agent)


@pytest.mark.parametrize(
    "lengths", [["Content-Length: 19", "Content-Length: 19"], ["Content-Length: 19, 19"]]
)
async def test_identical_duplicate_lengths_are_one_length(agent: AgentProc, lengths: list[str]) -> None:
    """RFC 9110 §8.6 lets a server merge identical values; h11 does, so every reader
    agrees on the length and the bytes after it are the next request, not this body."""
    assert len(SMUGGLED) == 19
    status, _, answer = await trio.to_thread.run_sync(raw, agent, post_apps(*lengths), SMUGGLED)
    assert status == 201, answer
    assert json.loads(answer)["app"]["name"] == "smuggled"


async def test_a_length_far_over_the_limit_is_413_at_once(agent: AgentProc) -> None:
    for path in ("/v1/apps", "/v1/internal/state/push", "/v1/blobs/sha256:" + "0" * 64):
        method = "PUT" if "blobs" in path else "POST"
        status, headers, answer = await trio.to_thread.run_sync(
            raw, agent, [f"{method} {path} HTTP/1.1", "Content-Length: 5000000000000"], b"{}"
        )
        assert status == 413, (path, status, answer)
        assert headers.get("connection", "").lower() == "close"
        assert json.loads(answer)["error"]["message"]
    # The node is fine, and logged no traceback for any of it (the one thing this
    # test reads the log for: a traceback is what the defect was).
    assert agent.running and await agent.status() is not None
    assert "Traceback" not in agent.log_path.read_text(errors="replace")


@pytest.mark.parametrize("body", [b"", b"\xc1", b"garbage", b"\x81\x91\x01\x02", b"\xd9"])
async def test_garbage_msgpack_to_peer_endpoints_names_a_reason(agent: AgentProc, body: bytes) -> None:
    for path in ("/v1/internal/state/push", "/v1/internal/state/sync"):
        async with agent.client(token=agent.token.peer_key) as c:
            r = await c.post(path, content=body, headers={"Content-Type": "application/x-msgpack"})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert message.startswith("body is not msgpack: ") and message.split(": ", 1)[1].strip()
    await wait_for(agent.status, 5, "the agent to answer")


async def test_a_path_with_a_control_character_is_400_with_a_reason(agent: AgentProc) -> None:
    async with agent.client() as c:
        for method, path in (("DELETE", "/v1/apps/%00/jobs/%00"), ("GET", "/v1/apps/a%0Ab")):
            r = await c.request(method, path)
            assert r.status_code == 400, r.text
            assert "control character" in r.json()["error"]["message"]


def answer_then_late_body(agent: AgentProc) -> bytes | None:
    """A 404 that goes out before its request's body has arrived; then the body
    and a second request on the same connection.  What the second read gets
    (b"" for a closed connection), or None if nothing came at all."""
    body = b'{"x": 1}'
    with socket.create_connection((agent.addr, agent.api_port), timeout=5) as s:
        s.sendall(
            f"DELETE /v1/apps/nope HTTP/1.1\r\nHost: {agent.addr}\r\n"
            f"Authorization: Bearer {agent.token.api_key}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        got = b""
        while not got.endswith(b"}\n"):  # the whole JSON error
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 404"), got
        assert b"\r\nconnection: close\r\n" in got.lower(), got  # so no client reuses it
        try:
            s.sendall(body)
            time.sleep(0.1)  # part of the input: the body and the next request as two segments
            s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {agent.addr}\r\n\r\n".encode())
            return s.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        except TimeoutError:
            return None


async def test_a_connection_is_answered_or_closed_after_an_early_answer(agent: AgentProc) -> None:
    """Never left hanging: the next request is answered, or the connection closed."""
    for _ in range(3):
        second = await trio.to_thread.run_sync(answer_then_late_body, agent)
        assert second is not None, "the connection hung"
        assert second == b"" or second.startswith(b"HTTP/1.1 200"), second
