"""What the API needs from its node: the seam between the handlers and the agent.

The agent implements it with `flynnp2p.node.NodeContext`; tests with a small
class of their own over a real `StateService` (no agent, no serf).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from flynnp2p.coord.claims import Claims
from flynnp2p.state.replica import ReplicatedState


class ClusterContext(Protocol):
    @property
    def state(self) -> ReplicatedState: ...

    @property
    def peer_key(self) -> str:
        """The peer credential this node presents when it forwards a request."""
        ...

    @property
    def cluster_domain(self) -> str:
        """Apps get the default route ``<name>.<cluster_domain>``."""
        ...

    def is_leader(self) -> bool: ...

    async def acting_leader(self) -> bool:
        """Whether this node acts as the leader; a node just elected first waits
        (bounded) until it has caught up, rather than refusing."""
        ...

    def leader_api(self) -> str | None:
        """The leader's API as ``host:port``, or None while there is no leader."""
        ...

    def now_ms(self) -> int: ...

    def claims(self) -> Claims:
        """The etcd claims (on the leader, whose etcd member is a voter)."""
        ...


class JobsContext(ClusterContext, Protocol):
    """What the jobs and hosts API needs besides."""

    @property
    def node_name(self) -> str: ...

    def leader_epoch(self) -> int: ...

    def members(self) -> list[dict[str, Any]]: ...

    async def set_host_tags(self, tags: Mapping[str, str | None]) -> dict[str, str]: ...
