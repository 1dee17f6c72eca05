"""Errors raised by the replicated state: the ``StateError`` branch of the one
error tree, drawn with its statuses in `flynnp2p.errors`.

::

    StateError (500)              root of everything this package raises
     ├── RecordError (400)        a record, entry or delta failed validation; the message
     │    │                       names the field and what is accepted
     │    └── SchemaVersionError  a record carries a schema version this node does not know
     ├── StaleReplicaError        this replica missed tombstones a peer has already
     │                            collected; it must be reset and resynced from scratch
     └── StoreError (500)         the local database is unusable (in use, corrupt, newer schema)
          └── StoreFullError (507) the disk holding it is full: the change was rolled back, the
                                  store is intact and takes the next change once space frees

`RecordError` is what a peer's bad data or a bad API request produces: its
``status`` makes the API answer 400, the sync service treats it as the peer
misbehaving.  It is also a ``ValueError``, as the validation of a value is.
"""

from __future__ import annotations

from flynnp2p.errors import FlynnError, InsufficientStorage, UserError


class StateError(FlynnError):
    """Root of the errors raised by `flynnp2p.state`."""

    @property
    def http_status(self) -> int:
        """``status``, under the name this package gave it before it joined the tree."""
        return self.status


class RecordError(StateError, ValueError):
    """A record, entry or delta is malformed.

    `field` is the dotted path of the offending value (``"release.processes.web.memory_mb"``).
    """

    status = UserError.status  # answered as any bad input is, but not a UserError: a
    code = UserError.code  # peer's bad delta is not a user's mistake

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class SchemaVersionError(RecordError):
    """A record's schema version is not one this node can read.

    The batch holding it is refused as a whole, so the replica's version vector
    does not move past it and the entry is fetched again once this node is upgraded.
    """


class StaleReplicaError(StateError):
    """A peer collected tombstones this replica never saw.

    Keeping this replica's entries could resurrect deleted keys, so it must be
    emptied (`reset`) and filled again from a peer.
    """


class StoreError(StateError):
    """The local state database cannot be used."""


class StoreFullError(StoreError):
    """The database's disk (or quota) is full; the transaction was rolled back.

    The API answers it as it answers `InsufficientStorage` (507); it stays a
    `StoreError` because the state service treats every failed commit alike.
    """

    status = InsufficientStorage.status
    code = InsufficientStorage.code
