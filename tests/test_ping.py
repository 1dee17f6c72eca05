"""Heartbeat pings over UDP on loopback: answered when authentic, ignored otherwise."""

from __future__ import annotations

import socket

import trio

from flynnp2p.gossip.ping import PING, PONG, UdpPinger, decode, encode


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_datagrams_round_trip_and_forgeries_are_refused() -> None:
    nonce = b"n" * 12
    data = encode(b"key", PING, nonce)
    assert decode(b"key", data) == (PING, nonce)
    assert decode(b"other key", data) is None
    assert decode(b"key", data[:-1] + bytes([data[-1] ^ 1])) is None
    assert decode(b"key", data + b"x") is None
    assert decode(b"key", b"") is None
    assert decode(b"key", encode(b"key", PONG, nonce)) == (PONG, nonce)


async def test_a_peer_answers_and_a_stranger_gets_nothing() -> None:
    a_port, b_port, c_port = free_udp_port(), free_udp_port(), free_udp_port()
    a = UdpPinger("cluster-peer-key", "127.0.0.1", a_port)
    b = UdpPinger("cluster-peer-key", "127.0.0.1", b_port)
    stranger = UdpPinger("another-cluster", "127.0.0.1", c_port)
    async with trio.open_nursery() as nursery:
        for p in (a, b, stranger):
            await nursery.start(p.run)
        with trio.fail_after(5):
            assert await a(f"127.0.0.1:{b_port}")
            assert await b(f"127.0.0.1:{a_port}")
        with trio.move_on_after(0.3) as waited:
            await stranger(f"127.0.0.1:{a_port}")
        assert waited.cancelled_caught  # no answer to a datagram it cannot authenticate
        with trio.move_on_after(0.3) as waited:
            await a(f"127.0.0.1:{free_udp_port()}")  # nobody there
        assert waited.cancelled_caught
        assert await a("not-an-address") is False
        nursery.cancel_scope.cancel()
