"""How the replication reaches a peer: the `Transport` seam, and HTTP behind it.

The replication (`flynnp2p.state.replication`) sends bytes and reads bytes;
what carries them is a `Transport`.  In the agent it is `HttpTransport`, the
client of the two endpoints `flynnp2p.api.internal` serves.  Tests can join two
replicators in memory with a transport that calls the other side's server
functions (`Replicator.accept_push`, `Replicator.serve_sync`) directly.

Failures.  A peer that answers "no" raises `PeerRefused` (its reason in the
message); anything else that goes wrong (a refused connection, a timeout, a
malformed address) raises whatever the carrier raises.  Either is one failed
attempt to the replication, never the end of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import httpx

from flynnp2p.peering import Peer
from flynnp2p.state.wire import MSGPACK

PUSH_TIMEOUT_S = 3.0
# 30 s between chunks of a big copy, but a peer behind a partition (its SYNs
# dropped) is given up in 2 s: a node restarted inside a partition tries every
# peer it still believes alive before it is ready.
SYNC_TIMEOUT = httpx.Timeout(30.0, connect=2.0)


class PeerRefused(Exception):
    """The peer answered, and not with success."""


class Transport(Protocol):
    async def push(self, peer: Peer, body: bytes) -> None:
        """Deliver a push (`wire.pack_delta`); returns once `peer` has committed it."""
        ...

    def sync(self, peer: Peer, request: bytes) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Send a sync request (`wire.sync_request`); the reply as a stream of
        byte chunks (cut anywhere: the reader reassembles the msgpack messages)."""
        ...


class HttpTransport:
    """The peer endpoints ``/v1/internal/state/push`` and ``/sync`` over `http`."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def push(self, peer: Peer, body: bytes) -> None:
        r = await self.http.post(
            f"http://{peer.api}/v1/internal/state/push",
            content=body,
            headers={"Content-Type": MSGPACK},
            timeout=PUSH_TIMEOUT_S,
        )
        if r.status_code != 200:
            raise PeerRefused(f"answered {r.status_code}: {r.text[:200]}")

    @asynccontextmanager
    async def sync(self, peer: Peer, request: bytes) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self.http.stream(
            "POST",
            f"http://{peer.api}/v1/internal/state/sync",
            content=request,
            headers={"Content-Type": MSGPACK},
            timeout=SYNC_TIMEOUT,
        ) as resp:
            if resp.status_code != 200:
                raise PeerRefused(f"sync answered {resp.status_code}")
            yield resp.aiter_bytes()
