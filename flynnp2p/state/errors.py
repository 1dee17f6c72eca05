"""Errors raised by the replicated state.

::

    StateError                    root of everything this package raises
     ├── RecordError (400)        a record, entry or delta failed validation; the message
     │    │                       names the field and what is accepted
     │    └── SchemaVersionError  a record carries a schema version this node does not know
     ├── StaleReplicaError        this replica missed tombstones a peer has already
     │                            collected; it must be reset and resynced from scratch
     └── StoreError (500)         the local database is unusable (in use, corrupt, newer schema)
          └── StoreFullError      the disk holding it is full: the change was rolled back, the
                                  store is intact and takes the next change once space frees

`RecordError` is what a peer's bad data or a bad API request produces: the API
returns it as a 400, the sync service treats it as the peer misbehaving.
"""

from __future__ import annotations


class StateError(Exception):
    """Root of the errors raised by `flynnp2p.state`."""

    http_status: int = 500


class RecordError(StateError, ValueError):
    """A record, entry or delta is malformed.

    `field` is the dotted path of the offending value (``"release.processes.web.memory_mb"``).
    """

    http_status = 400

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
    """The database's disk (or quota) is full; the transaction was rolled back."""
