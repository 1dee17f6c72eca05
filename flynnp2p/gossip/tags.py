"""The serf tags that say what a member is: its roles and the host tags users set.

Host tags (``--tag disk=ssd``, ``flynnp2p host tag``) travel as serf tags under
``USER_PREFIX`` so they never clash with the agent's own (``api``, ``ep``, ...).
Pure: the gossip service, the election, the scheduler and the API read them here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

USER_PREFIX = "t."


def role_list(tags: Mapping[str, str]) -> list[str]:
    """A member's roles, in the order it gave them."""
    return [r for r in tags.get("roles", "").split(",") if r]


def roles(tags: Mapping[str, str]) -> frozenset[str]:
    return frozenset(role_list(tags))


def user_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The host tags among a member's serf tags."""
    return {k[len(USER_PREFIX) :]: v for k, v in tags.items() if k.startswith(USER_PREFIX)}


def serf_tags(user: Mapping[str, str]) -> dict[str, str]:
    """Host tags as serf tags."""
    return {USER_PREFIX + k: v for k, v in user.items()}


def serf_names(user: Iterable[str]) -> list[str]:
    return [USER_PREFIX + k for k in user]
