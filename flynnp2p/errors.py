"""The one error tree of flynnp2p.

Every error flynnp2p raises for a caller to see descends from `FlynnError`, and
its ``status`` is the HTTP status the API answers with (``code`` is the short
name in the body).  The API has one handler for the whole tree
(`flynnp2p.api.app`): an error needs no translation into another kind to be
answered with its status.  A 500 is not an answer the API means to give: it is
logged, and the body says only "internal error" (the message may name paths).

    FlynnError (500)                  root
    ├── UserError (400)               bad input from a user: says what was wrong and what is accepted
    │   ├── Unauthorized (401)
    │   ├── Forbidden (403)           authenticated, but not for this (a user's key on a peer endpoint)
    │   ├── NotFound (404)
    │   ├── Conflict (409)
    │   ├── SlugError                 host.slug: a slug tarball is malformed or unsafe
    │   ├── ArchiveError              host.imagearchive: a docker save archive is malformed or unsafe
    │   ├── ImageConfigError          host.image: an image's config cannot be run as a web process
    │   └── ArchiveTooLarge (413)     api.images: an image archive over the limit
    ├── ConfigError (500)             the node cannot start as configured (exit code 2)
    ├── ClusterError (503)            the cluster cannot do it right now (no leader, no quorum, peer down)
    │   └── Untouched (503)            … and it did nothing: any request may be sent again
    │   ├── CoordError                coord.client: etcd is not running, has no quorum, or refused
    │   ├── DockerError               host.docker: the Docker engine refused or failed
    │   ├── StreamBroken              cli.jobs: a log stream broke on the network
    │   └── SerfError                 gossip.codec: the serf agent cannot be used right now
    │       ├── LocalProtocolError (500)   this process misused serf's protocol (a bug here)
    │       ├── RemoteProtocolError        the agent sent something the protocol does not allow
    │       ├── SerfConnectionError        gossip.rpc: no connection, it dropped, client closed
    │       └── SerfCommandError           gossip.rpc: the agent answered with an error
    │           └── SerfAuthError          the handshake or the RPC auth key was refused
    ├── InsufficientStorage (507)     this node's disk is full: nothing was stored; reads still work
    └── StateError (500)              state.errors: the replicated state
        ├── RecordError (400)         a record, entry or delta failed validation (also a ValueError)
        │   └── SchemaVersionError    a schema version this node does not know
        ├── StaleReplicaError         this replica must be reset and resynced
        └── StoreError                the local database is unusable
            └── StoreFullError (507)  its disk is full: the change was rolled back

(Each module's docstring says more about its part.)  ``StoreFullError`` takes
its status and code from ``InsufficientStorage`` but stays a ``StoreError``: the
state service catches every ``StoreError`` of a commit as one kind.

Outside the tree, on purpose: exceptions that carry control flow inside one
component and never reach a caller of it -- ``host.prepare.StartFailed`` and
``host.health.HealthTimeout`` (the host's runner turns both into a job's failure
reason), ``router.proxy``'s ``_Refused``, ``_ClientGone`` and ``_UpstreamFailed``,
``router.http1.HeadersTooLarge`` (stops the header parser; the router answers 431)
and ``router.sock.ConnectError`` (an ``OSError``, as socket errors are),
``build.githttp.CgiError`` (git http-backend's answer was not CGI: the git API
answers 502), ``state.transport.PeerRefused`` (a peer said no to a push or
sync: the replicator counts it and tries another peer or round) and
``leader.Deposed`` (a leader duty's term is over: the duty stops).  In the
tree but private: ``gossip.rpc._NotSentError``, a ``SerfConnectionError`` that the
client retries on the next connection and never raises to its caller.

This module imports only the standard library, so any module may import it.
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
    """Root of the tree drawn above; ``status`` and ``code`` are what the API answers."""

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


UNTOUCHED_HEADER = "Flynnp2p-Untouched"  # on a 503: nothing was done, any method may retry


class Untouched(ClusterError):
    """A 503 raised before the request did anything (no leader to forward it to, the
    leader unreachable): the answer carries `UNTOUCHED_HEADER`, so a client may send
    even a POST again (the CLI does); other 503s may come after a write."""


class InsufficientStorage(FlynnError):
    status = 507
    code = "insufficient_storage"
