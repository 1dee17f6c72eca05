"""Membership as the state replication sees it (`flynnp2p.peering.Peers`): alive
peers and hint events."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from flynnp2p.gossip.codec import SerfError
from flynnp2p.gossip.service import Gossip
from flynnp2p.netaddr import ip_port
from flynnp2p.peering import HINT_EVENT, Peer

log = logging.getLogger(__name__)


class GossipPeers:
    def __init__(self, gossip: Gossip) -> None:
        self.gossip = gossip

    def alive_peers(self) -> list[Peer]:
        """Alive members with a well-formed ``api`` tag (a malformed one, from a
        broken or hostile member, is never turned into a URL)."""
        view = self.gossip.view.value
        return [
            Peer(m.name, m.tags["api"])
            for m in view.members
            if m.status == "alive" and m.name != view.self_name
            and ip_port(m.tags.get("api", "")) is not None
        ]

    def electorate(self) -> list[str]:
        view = self.gossip.view.value
        return [
            m.name
            for m in view.members
            if m.status in ("alive", "failed") and m.name != view.self_name
        ]

    async def send_hint(self, payload: bytes) -> None:
        try:
            with trio.move_on_after(2.0):
                await self.gossip.rpc.user_event(HINT_EVENT, payload, coalesce=False)
        except SerfError as exc:  # serf restarting: anti-entropy repairs what is missed
            log.debug("state hint not sent: %s", exc)

    @asynccontextmanager
    async def hints(self) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self.gossip.rpc.stream(f"user:{HINT_EVENT}") as events:

            async def payloads() -> AsyncIterator[bytes]:
                async for event in events:
                    if event.get("Event") == "user" and event.get("Name") == HINT_EVENT:
                        yield bytes(event.get("Payload", b""))

            yield payloads()
