"""The cluster token: everything a node needs to join, in one secret string.

Layout (then base64url without padding)::

    b"F2P" | version (1 byte, = 1) | cluster id (16 bytes) | gossip key (32) | admin secret (32)

The gossip key encrypts serf traffic (AES-256-GCM); the admin secret is what the
HTTP API accepts as its bearer token (``api_key``).  A token is a secret: it is
written 0600 and never logged.

Nodes talk to each other with a third credential, ``peer_key``: an HMAC-SHA256 of
the admin secret under a fixed label.  Every node derives the same one from the
token, it cannot be turned back into the user's key, and a user's key (or the
whole token) is not it, so the API can keep ``/v1/internal/*`` (raw state deltas)
and the ``X-Flynnp2p-Forwarded`` mark to the nodes themselves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from flynnp2p.errors import UserError

_MAGIC = b"F2P"
_VERSION = 1
_LEN = len(_MAGIC) + 1 + 16 + 32 + 32
# Changing the label changes every node's peer key: nodes of mixed versions would
# refuse each other's state pushes, so it is versioned with the token layout.
_PEER_LABEL = b"flynnp2p peer credential v1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    text = text.strip()
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise UserError("token is not valid base64url") from exc


@dataclass(frozen=True)
class ClusterToken:
    cluster_id: bytes
    gossip_key: bytes
    admin_secret: bytes

    @classmethod
    def generate(cls) -> ClusterToken:
        return cls(secrets.token_bytes(16), secrets.token_bytes(32), secrets.token_bytes(32))

    @classmethod
    def parse(cls, text: str) -> ClusterToken:
        raw = _unb64(text)
        if len(raw) != _LEN or not raw.startswith(_MAGIC):
            raise UserError(
                "not a flynnp2p cluster token (expected the string printed by "
                "'flynnp2p token generate' or by the first 'flynnp2p join')"
            )
        if raw[3] != _VERSION:
            raise UserError(f"cluster token version {raw[3]} is not supported (accepted: 1)")
        body = raw[4:]
        return cls(body[:16], body[16:48], body[48:80])

    def encode(self) -> str:
        return _b64(_MAGIC + bytes([_VERSION]) + self.cluster_id + self.gossip_key + self.admin_secret)

    @property
    def cluster_id_hex(self) -> str:
        return self.cluster_id.hex()

    @property
    def gossip_key_b64(self) -> str:
        """The key in the form ``serf agent -encrypt`` takes (standard base64)."""
        return base64.b64encode(self.gossip_key).decode("ascii")

    @property
    def api_key(self) -> str:
        return _b64(self.admin_secret)

    @property
    def peer_key(self) -> str:
        """The bearer credential nodes present to each other (never given to users)."""
        return _b64(hmac.new(self.admin_secret, _PEER_LABEL, hashlib.sha256).digest())

    def accepts_bearer(self, presented: str) -> bool:
        """True if ``presented`` is this cluster's API key or its whole token."""
        presented = presented.strip()
        if hmac.compare_digest(presented.encode(), self.api_key.encode()):
            return True
        return hmac.compare_digest(presented.encode(), self.encode().encode())

    def accepts_peer(self, presented: str) -> bool:
        """True if ``presented`` is this cluster's peer credential."""
        return hmac.compare_digest(presented.strip().encode(), self.peer_key.encode())

    def __repr__(self) -> str:  # never print the secrets
        return f"ClusterToken(cluster_id={self.cluster_id_hex})"


def api_key_from(text: str) -> str:
    """A CLI user may give either the cluster token or the bare API key."""
    try:
        return ClusterToken.parse(text).api_key
    except UserError:
        return text.strip()
