"""The serf RPC client against real `serf agent` processes on loopback.

Every agent gets its own 127.0.77.x bind address, free ports, a JSON config
with an RPC auth key and a gossip encryption key, and is killed at teardown.
Readiness is the RPC port accepting connections; every wait is a predicate
polled under a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
import trio
import trio.testing

from flynnp2p.gossip.codec import COMMANDS
from flynnp2p.gossip.rpc import (
    Member,
    QueryResponse,
    SerfAuthError,
    SerfCommandError,
    SerfConnectionError,
    SerfRPC,
    StreamEvent,
    open_serf_rpc,
)

pytestmark = pytest.mark.skipif(shutil.which("serf") is None, reason="serf is not installed")

AUTH = "rpc-secret"
T = TypeVar("T")


def free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` (serf gossips on both)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind((host, port))
            except OSError:
                continue
            return port


@dataclass
class Agent:
    name: str
    bind_host: str
    bind_port: int
    rpc_port: int
    tags: dict[str, str]
    config: Path
    log: Path
    proc: trio.Process | None = field(default=None, repr=False)

    @property
    def bind_addr(self) -> str:
        return f"{self.bind_host}:{self.bind_port}"

    def rpc(self, auth_key: str | None = AUTH) -> AbstractAsyncContextManager[SerfRPC]:
        return open_serf_rpc("127.0.0.1", self.rpc_port, auth_key, reconnect_backoff_s=(0.02, 0.2))


class Agents:
    def __init__(self, root: Path) -> None:
        self._root = root
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._next_host = 2
        self.all: list[Agent] = []

    async def start(self, name: str, *, rpc_auth: str = AUTH, **tags: str) -> Agent:
        host = f"127.0.77.{self._next_host}"
        self._next_host += 1
        config = self._root / f"{name}.json"
        settings = {"rpc_auth": rpc_auth, "encrypt_key": self._key} if rpc_auth else {}
        config.write_text(json.dumps(settings))
        agent = Agent(
            name, host, free_port(host), free_port("127.0.0.1"), tags, config,
            self._root / f"{name}.log",
        )  # fmt: skip
        self.all.append(agent)
        await self.launch(agent)
        return agent

    async def launch(self, agent: Agent) -> None:
        args = [
            "serf", "agent", "-node", agent.name, "-bind", agent.bind_addr,
            "-rpc-addr", f"127.0.0.1:{agent.rpc_port}", "-profile=lan",
            "-config-file", str(agent.config),
        ]  # fmt: skip
        for key, value in sorted(agent.tags.items()):
            args += ["-tag", f"{key}={value}"]
        with agent.log.open("ab") as log:
            agent.proc = await trio.lowlevel.open_process(args, stdout=log, stderr=log)
        with trio.fail_after(10):
            while True:
                if agent.proc.returncode is not None:
                    raise AssertionError(f"serf {agent.name} exited: {agent.log.read_text()}")
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", agent.rpc_port)
                except OSError:
                    await trio.sleep(0.01)
                    continue
                await stream.aclose()
                return

    async def kill(self, agent: Agent) -> None:
        proc, agent.proc = agent.proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await proc.wait()


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    pool = Agents(tmp_path)
    try:
        yield pool
    finally:
        for agent in pool.all:
            await pool.kill(agent)


async def wait_for(predicate: Callable[[], Awaitable[T | None]], what: str, within_s: float) -> T:
    last: T | None = None
    with trio.move_on_after(within_s):
        while True:
            last = await predicate()
            if last:
                return last
            await trio.sleep(0.05)
    raise AssertionError(f"timed out after {within_s}s waiting for {what}; last: {last!r}")


async def next_event(
    events: trio.MemoryReceiveChannel[StreamEvent], match: Callable[[StreamEvent], bool]
) -> StreamEvent:
    async for event in events:
        if match(event):
            return event
    raise AssertionError("stream ended")


async def joined(a: Agent, b: Agent) -> None:
    async with a.rpc() as rpc:
        assert await rpc.join([b.bind_addr]) == 1

        async def both_alive() -> list[Member] | None:
            alive = [m for m in await rpc.members() if m.status == "alive"]
            return alive if len(alive) == 2 else None

        await wait_for(both_alive, "two alive members", 5)


# -- tests ------------------------------------------------------------------------


async def test_handshake_auth_members_stats(agents: Agents) -> None:
    a1 = await agents.start("a1", role="web", zone="z1")
    with trio.fail_after(10):
        async with a1.rpc() as rpc:
            members = await rpc.members()
            assert members == [
                Member("a1", a1.bind_host, a1.bind_port, {"role": "web", "zone": "z1"}, "alive")
            ]
            assert await rpc.members_filtered(tags={"role": "w.*"}, status="alive") == members
            assert await rpc.members_filtered(name="nobody") == []
            stats = await rpc.stats()
            assert stats["agent"]["name"] == "a1"
            assert stats["serf"]["encrypted"] == "true"


@pytest.mark.parametrize(
    ("key", "message"), [("wrong", "Invalid authentication token"), (None, "Invalid auth")]
)
async def test_bad_or_missing_auth_key_fails_at_connect(
    agents: Agents, key: str | None, message: str
) -> None:
    a1 = await agents.start("a1")
    with trio.fail_after(10), pytest.raises(SerfAuthError, match=message):
        async with a1.rpc(auth_key=key):
            pytest.fail("connected with a bad auth key")


async def test_no_key_for_a_keyless_agent(agents: Agents) -> None:
    a1 = await agents.start("a1", rpc_auth="")  # the empty auth the client always sends passes
    with trio.fail_after(10):
        async with a1.rpc(auth_key=None) as rpc:
            assert [m.name for m in await rpc.members()] == ["a1"]
            assert (await rpc.stats())["serf"]["encrypted"] == "false"


async def test_connect_refused_is_a_connection_error(agents: Agents) -> None:
    with trio.fail_after(10), pytest.raises(SerfConnectionError, match="cannot connect"):
        async with open_serf_rpc("127.0.0.1", free_port("127.0.0.1"), AUTH):
            pass


async def test_join_and_user_event_through_a_stream(agents: Agents) -> None:
    a1, a2 = await agents.start("a1"), await agents.start("a2")
    with trio.fail_after(15):
        async with a1.rpc() as r1, a2.rpc() as r2:
            with pytest.raises(SerfCommandError, match=r"Failed to join 127\.0\.77\.250"):
                await r1.join(["127.0.77.250:1"])
            await joined(a1, a2)
            async with r2.stream("user:deploy") as events:
                await r1.user_event("other", b"ignored")
                await r1.user_event("deploy", b"v42\x00")
                event = await next_event(events, lambda e: e["Event"] == "user")
            assert (event["Name"], event["Payload"], event["Coalesce"]) == (
                "deploy",
                b"v42\x00",
                False,
            )
            with pytest.raises(SerfCommandError, match="exceeds configured limit"):
                await r1.user_event("big", b"x" * 600)


async def test_tags_update_seen_by_the_other_member(agents: Agents) -> None:
    a1, a2 = await agents.start("a1", role="web", zone="z1"), await agents.start("a2")
    with trio.fail_after(15):
        await joined(a1, a2)
        async with a1.rpc() as r1, a2.rpc() as r2, r2.stream("member-update") as events:
            await r1.set_tags({"role": "db", "v": "2"}, delete=["zone"])

            def a1_updated(event: StreamEvent) -> bool:
                return any(m.name == "a1" for m in event.get("Members", []))

            event = await next_event(events, a1_updated)
            [member] = [m for m in event["Members"] if m.name == "a1"]
            assert member.tags == {"role": "db", "v": "2"}
            assert event["Event"] == "member-update"


async def test_query_and_respond_round_trip(agents: Agents) -> None:
    a1, a2 = await agents.start("a1"), await agents.start("a2")
    with trio.fail_after(15):
        await joined(a1, a2)
        async with a1.rpc() as r1, a2.rpc() as r2, trio.open_nursery() as nursery:
            answered = trio.Event()

            async def responder(
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                async with r2.stream("query:ping") as queries:
                    task_status.started()
                    async for event in queries:
                        await r2.respond(event["ID"], b"pong:" + event["Payload"])
                        answered.set()

            await nursery.start(responder)
            async with r1.query("ping", b"x", timeout_s=5, request_ack=True) as responses:
                async for response in responses:
                    assert response == QueryResponse("a2", b"pong:x")
                    break
            await answered.wait()  # respond() returned without error
            with pytest.raises(SerfCommandError, match="No pending queries"):
                await r2.respond(12345, b"late")
            nursery.cancel_scope.cancel()


async def test_protocol_error_fails_the_call_and_reconnects(agents: Agents) -> None:
    a1 = await agents.start("a1")
    with trio.fail_after(10):
        async with a1.rpc() as rpc, rpc.stream("user") as events:
            with pytest.raises(SerfConnectionError, match="closed the connection"):
                await rpc.members_filtered(name="(")  # serf hangs up on an invalid regexp
            assert await next_event(events, lambda e: True) == {"Event": "reconnected"}
            assert [m.name for m in await rpc.members()] == ["a1"]
            await rpc.user_event("again", b"")
            event = await next_event(events, lambda e: True)
            assert event["Name"] == "again"


async def test_reconnects_after_agent_restart(agents: Agents) -> None:
    a1 = await agents.start("a1")
    with trio.fail_after(20):
        async with a1.rpc() as rpc, rpc.stream("user") as events, trio.open_nursery() as nursery:
            await agents.kill(a1)
            await wait_for(lambda: _true(not rpc.connected), "the client to see the drop", 5)
            waited: list[list[Member]] = []

            async def members_while_down() -> None:  # waits for the reconnect, no error
                waited.append(await rpc.members())

            nursery.start_soon(members_while_down)
            await agents.launch(a1)
            assert await next_event(events, lambda e: True) == {"Event": "reconnected"}
            await rpc.user_event("after-restart", b"1")
            event = await next_event(events, lambda e: e["Event"] == "user")
            assert (event["Name"], event["Payload"]) == ("after-restart", b"1")
            await wait_for(lambda: _value(waited), "the waiting call", 5)
            assert [m.name for m in waited[0]] == ["a1"]


async def _value(items: list[T]) -> list[T] | None:
    return items or None


async def _true(value: bool) -> bool:
    return value


async def test_in_flight_query_fails_when_the_agent_dies(agents: Agents) -> None:
    a1 = await agents.start("a1")
    with trio.fail_after(10):
        async with a1.rpc() as rpc, rpc.query("slow", b"", timeout_s=30) as responses:
            await agents.kill(a1)
            with pytest.raises(SerfConnectionError):
                async for _ in responses:
                    pass


# -- component tests: a scripted fake agent on memory streams, virtual time ----------
#
# For what a real agent cannot be made to do on cue: a call left in flight when
# the connection drops, refused reconnects, and a consumer falling behind.


class FakeSerf:
    """Speaks just enough of the agent side: handshake, auth, stream, members, event."""

    def __init__(self) -> None:
        self.down = False  # refuse new connections
        self.hang = {"stats"}  # commands never answered
        self.connections = 0
        self._server: trio.abc.Stream | None = None
        self._stream_seqs: list[int] = []
        self._accept_send, self._accept_receive = trio.open_memory_channel[trio.abc.Stream](4)

    async def connect(self) -> trio.abc.Stream:
        if self.down:
            raise OSError("connection refused (fake)")
        client, server = trio.testing.memory_stream_pair()
        self.connections += 1
        await self._accept_send.send(server)
        return client

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for server in self._accept_receive:
                nursery.start_soon(self._serve_one, server)

    async def _serve_one(self, server: trio.abc.Stream) -> None:
        self._server, self._stream_seqs = server, []
        unpacker = msgpack.Unpacker(raw=False)
        header: dict[str, Any] | None = None
        with suppress(trio.ClosedResourceError):  # drop() closed it under us
            while data := await server.receive_some():
                unpacker.feed(data)
                for obj in unpacker:
                    if header is None and COMMANDS[obj["Command"]].takes_body:
                        header = obj
                        continue
                    request, header = header or obj, None
                    await self._answer(server, request["Command"], request["Seq"])

    async def _answer(self, server: trio.abc.Stream, command: str, seq: int) -> None:
        if command in self.hang:
            return
        reply = pack_objs({"Seq": seq, "Error": ""})
        if command == "members":
            reply += pack_objs({"Members": []})
        if command == "stream":
            self._stream_seqs.append(seq)
        await server.send_all(reply)

    async def push_user_event(self, name: str) -> None:
        assert self._server is not None
        for seq in self._stream_seqs:
            record = {"Event": "user", "LTime": 1, "Name": name, "Payload": b"", "Coalesce": False}
            await self._server.send_all(pack_objs({"Seq": seq, "Error": ""}, record))

    async def drop(self) -> None:
        assert self._server is not None
        await self._server.aclose()


def pack_objs(*objs: object) -> bytes:
    return b"".join(msgpack.packb(o, use_bin_type=True) for o in objs)


@asynccontextmanager
async def fake_client(fake: FakeSerf) -> AsyncIterator[SerfRPC]:
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        async with open_serf_rpc(
            "fake", 0, None, connect=fake.connect, reconnect_backoff_s=(0.1, 0.4)
        ) as rpc:
            yield rpc
        nursery.cancel_scope.cancel()


async def test_lagging_consumer_gets_an_overflow_marker(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeSerf()
    async with fake_client(fake) as rpc, rpc.stream("user", max_buffer=2) as events:
        for name in ("e1", "e2", "e3", "e4"):
            await fake.push_user_event(name)
        await rpc.members()  # its reply follows the records: all of them are routed now
        assert [(await events.receive())["Name"] for _ in range(2)] == ["e1", "e2"]
        await fake.push_user_event("e5")
        await rpc.members()
        assert await events.receive() == {"Event": "overflow", "Dropped": 2}
        assert (await events.receive())["Name"] == "e5"


async def test_in_flight_call_fails_and_later_calls_wait_for_reconnect(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeSerf()
    async with fake_client(fake) as rpc, rpc.stream("user") as events:
        async with trio.open_nursery() as nursery:

            async def in_flight() -> None:
                with pytest.raises(SerfConnectionError, match="closed the connection"):
                    await rpc.stats()  # the fake never answers stats

            nursery.start_soon(in_flight)
            await trio.testing.wait_all_tasks_blocked()
            fake.down = True
            await fake.drop()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rpc.members)  # made while disconnected: waits
            await trio.sleep(3)
            assert fake.connections == 1 and not rpc.connected
            fake.down = False
        # refused at 0, 0.1, 0.3, 0.7, 1.1, ..., 2.7 (backoff 0.1 doubling to 0.4)
        assert trio.current_time() - start == pytest.approx(3.1)
        assert fake.connections == 2
        assert await events.receive() == {"Event": "reconnected"}
        await fake.push_user_event("after")
        assert (await events.receive())["Name"] == "after"
