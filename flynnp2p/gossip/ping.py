"""Heartbeat pings over UDP: one datagram each way, authenticated, no HTTP.

Theory of operation
-------------------
`flynnp2p.gossip.heartbeat` asks every alive member "are you there?" twice a
second.  Over the HTTP API that cost each node about 1.5 % of a core at three
nodes (hypercorn and quart spend ~1.5 ms on a request), growing with the
cluster; a UDP datagram costs tens of microseconds.  Every node listens on UDP
at its API address and port number.  A ping is ``b"f2p-ping" + nonce + mac``,
the pong ``b"f2p-pong" + nonce + mac``; the MAC is HMAC-SHA256 (truncated to
16 bytes) under the peer credential, so nobody outside the cluster can make a
dead node look alive, and an unauthenticated datagram gets no answer at all
(the responder can never be used to amplify traffic).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket

import trio

from flynnp2p.netaddr import ip_port

log = logging.getLogger(__name__)

PING = b"f2p-ping"
PONG = b"f2p-pong"
_NONCE = 12
_MAC = 16
_SIZE = len(PING) + _NONCE + _MAC


def _mac(key: bytes, kind: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, kind + nonce, hashlib.sha256).digest()[:_MAC]


def encode(key: bytes, kind: bytes, nonce: bytes) -> bytes:
    return kind + nonce + _mac(key, kind, nonce)


def decode(key: bytes, data: bytes) -> tuple[bytes, bytes] | None:
    """(kind, nonce) of a well-formed, authentic datagram; None for anything else."""
    if len(data) != _SIZE:
        return None
    kind, nonce, mac = data[: len(PING)], data[len(PING) : -_MAC], data[-_MAC:]
    if kind not in (PING, PONG) or not hmac.compare_digest(mac, _mac(key, kind, nonce)):
        return None
    return kind, nonce


class UdpPinger:
    """Answers pings on ``(addr, port)`` and sends them (``await pinger(api)``)."""

    def __init__(self, key: str, addr: str, port: int) -> None:
        self.key = key.encode()
        self.addr = addr
        self.port = port
        self._sock: trio.socket.SocketType | None = None
        self._waiting: dict[bytes, trio.Event] = {}

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer pings until cancelled; reports the bound port (``port`` 0 picks one)."""
        family = socket.AF_INET6 if ":" in self.addr else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.bind((self.addr, self.port))
            self._sock = sock
            task_status.started(sock.getsockname()[1])
            while True:
                data, sender = await sock.recvfrom(256)
                decoded = decode(self.key, data)
                if decoded is None:
                    continue
                kind, nonce = decoded
                if kind == PING:
                    try:
                        await sock.sendto(encode(self.key, PONG, nonce), sender)
                    except OSError as exc:  # the sender vanished: nothing to answer
                        log.debug("pong to %s failed: %s", sender, exc)
                else:
                    waiter = self._waiting.get(nonce)
                    if waiter is not None:
                        waiter.set()

    async def __call__(self, api: str) -> bool:
        """Ping the node whose API is ``api`` (``host:port``); True once it answers.
        The caller bounds the wait."""
        if self._sock is None:
            return False
        nonce = os.urandom(_NONCE)
        answered = trio.Event()
        self._waiting[nonce] = answered
        target = ip_port(api)
        if target is None:
            return False
        try:
            try:
                await self._sock.sendto(encode(self.key, PING, nonce), target)
            except OSError:
                return False
            await answered.wait()
            return True
        finally:
            del self._waiting[nonce]
