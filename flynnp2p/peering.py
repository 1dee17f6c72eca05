"""What membership and the state replication share: a peer, and the seam between them.

Gossip (`flynnp2p.gossip.peers.GossipPeers`) implements `Peers`; the state
replication (`flynnp2p.state.replication`) consumes it.  Both import this
module and neither imports the other, so gossip knows nothing of the state and
the state knows nothing of serf.  Hints travel as the serf user event
`HINT_EVENT`; their payload is the replication's business
(`flynnp2p.state.wire.hint`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

HINT_EVENT = "f2p-st"  # the serf user event that says "an origin has new writes"


@dataclass(frozen=True)
class Peer:
    name: str
    api: str  # "host:port"


class Peers(Protocol):
    """What replication needs from membership (the gossip service in the agent)."""

    def alive_peers(self) -> list[Peer]: ...

    def electorate(self) -> list[str]:
        """Names of the other members that may come back (alive or failed, not left)."""
        ...

    async def send_hint(self, payload: bytes) -> None:
        """Best effort: a lost hint only delays propagation until anti-entropy."""

    def hints(self) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Every hint payload peers send, while the context is open."""
        ...
