"""Heartbeat pings over UDP on loopback: answered when authentic, ignored otherwise."""

from __future__ import annotations

import socket

import trio

from flynnp2p.gossip.ping import PING, PONG, UdpPinger, decode, encode


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
    a = UdpPinger("cluster-peer-key", "127.0.0.1", 0)
    b = UdpPinger("cluster-peer-key", "127.0.0.1", 0)
    stranger = UdpPinger("another-cluster", "127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        a_port, b_port, _ = [await nursery.start(p.run) for p in (a, b, stranger)]
        with trio.fail_after(5):
            assert await a(f"127.0.0.1:{b_port}")
            assert await b(f"127.0.0.1:{a_port}")
        with trio.move_on_after(0.3) as waited:
            await stranger(f"127.0.0.1:{a_port}")
        assert waited.cancelled_caught  # no answer to a datagram it cannot authenticate
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
            silent.bind(("127.0.0.1", 0))
            with trio.move_on_after(0.3) as waited:
                await a(f"127.0.0.1:{silent.getsockname()[1]}")
        assert waited.cancelled_caught
        assert await a("not-an-address") is False
        nursery.cancel_scope.cancel()
