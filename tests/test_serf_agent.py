"""Serf's RPC port is held for serf: nobody can take it before serf starts, nor
while a dead serf waits for its restart (flynnp2p/gossip/serf_agent.py).

The port used to be chosen by binding a socket and closing it: another process
could bind it in between (serf then exits 1, "address already in use"), and
while serf was down for a restart.  Real serf, one agent on a loopback address.
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import trio

from flynnp2p.gossip.rpc import open_serf_rpc
from flynnp2p.gossip.serf_agent import SerfAgent, SerfSettings, reserve_port
from tests.harness import wait_for

ADDR = "127.0.0.1"
GOSSIP_HOST = "127.0.78.2"
AUTH = "rpc-secret"


def assert_taken(port: int) -> None:
    """Another process's plain bind (and listen) of ``port`` fails: it is in use."""
    with socket.socket() as squatter:
        with pytest.raises(OSError) as info:
            squatter.bind((ADDR, port))
            squatter.listen()
        assert info.value.errno == errno.EADDRINUSE


def test_a_reserved_port_cannot_be_bound_by_another_socket() -> None:
    with reserve_port(ADDR) as port:
        assert_taken(port)
    with socket.socket() as later:  # released at the end of the block
        later.bind((ADDR, port))


def gossip_port() -> int:
    """A port free for TCP and UDP on GOSSIP_HOST (only this test uses that address)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind((GOSSIP_HOST, 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind((GOSSIP_HOST, port))
            except OSError:
                continue
            return port


async def members(port: int) -> list[str]:
    async with open_serf_rpc(ADDR, port, AUTH) as rpc:
        return [m.name for m in await rpc.members()]


@pytest.mark.skipif(shutil.which("serf") is None, reason="serf is not installed")
async def test_serf_keeps_its_rpc_port_across_a_restart_while_another_process_tries_to_take_it(
    tmp_path: Path,
) -> None:
    settings = SerfSettings(
        node_name="held", bind_addr=GOSSIP_HOST, bind_port=gossip_port(), rpc_addr=ADDR,
        rpc_port=0, rpc_auth=AUTH, encrypt_key_b64=base64.b64encode(os.urandom(16)).decode(),
        data_dir=tmp_path,
    )  # fmt: skip
    agent = SerfAgent(settings)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            port = await nursery.start(agent.run)
        assert port != 0 and agent.settings.rpc_port == port
        assert await members(port) == ["held"]

        os.kill(int(settings.pid_path.read_text()), signal.SIGKILL)  # the serf we started
        await wait_for(lambda: not agent.running, 10, "serf to be seen dead")
        assert_taken(port)  # down, waiting for its restart: still nobody else's
        await wait_for(lambda: agent.running, 20, "serf to be restarted")
        assert agent.restarts == 1 and agent.settings.rpc_port == port
        with trio.fail_after(10):
            assert await members(port) == ["held"]
        nursery.cancel_scope.cancel()
    assert agent.settings.rpc_port == 0  # no longer held
    with socket.socket() as later:
        later.bind((ADDR, port))
