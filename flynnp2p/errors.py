"""The one error tree of flynnp2p.

    FlynnError                      root; ``status`` is the HTTP status the API answers with
    ├── UserError (400)             bad input from a user: says what was wrong and what is accepted
    │   ├── Unauthorized (401)
    │   ├── Forbidden (403)         authenticated, but not for this (a user's key on a peer endpoint)
    │   ├── NotFound (404)
    │   └── Conflict (409)
    ├── ConfigError                 the node cannot start as configured (exit code 2)
    ├── ClusterError (503)          the cluster cannot do it right now (no leader, no quorum, peer down)
    └── InsufficientStorage (507)   this node's disk is full: nothing was stored; reads still work

The gossip client has its own tree rooted at ``flynnp2p.gossip.codec.SerfError``;
the agent turns those into ``ConfigError`` or ``ClusterError`` at its edge.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TypeVar

E = TypeVar("E", bound=BaseException)

# A full disk, as the OS says it (a quota counts as full too).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def first_in(exc: BaseException, cls: type[E], match: Callable[[E], bool] = lambda _: True) -> E | None:
    """The first ``cls`` error (that ``match`` accepts) in ``exc`` or its exception groups."""
    if isinstance(exc, cls) and match(exc):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_in(inner, cls, match)
            if found is not None:
                return found
    return None


class FlynnError(Exception):
    status: int = 500
    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class UserError(FlynnError):
    status = 400
    code = "bad_request"


class Unauthorized(UserError):
    status = 401
    code = "unauthorized"


class Forbidden(UserError):
    status = 403
    code = "forbidden"


class NotFound(UserError):
    status = 404
    code = "not_found"


class Conflict(UserError):
    status = 409
    code = "conflict"


class ConfigError(FlynnError):
    status = 500
    code = "config"


class ClusterError(FlynnError):
    status = 503
    code = "unavailable"


class InsufficientStorage(FlynnError):
    status = 507
    code = "insufficient_storage"
