"""An app's formation generation: which formation write was acknowledged last.

Theory of operation
-------------------
A `Formation` is one last-writer-wins record in the replicated state, keyed by
its app.  That alone cannot keep an acknowledged scale: a new leader that has
not yet received the old leader's last write would build the next formation
write (an env change moves the formation to a new release *with the counts it
sees*) on the older record, and its newer clock would make the old counts win.

So every formation write on the leader is also numbered in etcd, as the
release counter numbers releases (`flynnp2p.coord.claims`): the key
``f2p/formation/<app id>`` holds ``{"g": N, "digest": D, "at": ms}``, where ``D``
is the digest of the formation that write N made.  A write

1. reads the generation (``seen``);
2. builds only on a local formation whose digest is ``seen.digest``
   (`base_verdict`): the local record is the one write N made; otherwise it
   waits, bounded, for that record to reach this node, and then refuses (503,
   retry) rather than write over counts it has not seen;
3. commits by compare-and-swap on the key's modification revision, with
   ``N + 1`` and the new formation's digest, before it writes the record, so of
   two leaders building on the same generation only one can win.

The record follows the swap, so a leader may die between the two: its
generation names a formation no node holds.  After ``ORPHAN_MS`` the next write
builds on the newest formation there is (the dead leader's write was never
acknowledged: it reached no peer).  An app with no generation yet (a formation
written before these existed, or after ``cluster recover`` emptied etcd) builds
on its local record, and the first write makes generation 1.

Plain functions only: no I/O, ``now_ms`` is an argument.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass

from flynnp2p.state.records import Formation

FORMATION_PREFIX = "f2p/formation/"
ORPHAN_MS = 30_000


def formation_key(app_id: str) -> str:
    return f"{FORMATION_PREFIX}{app_id}"


def formation_digest(formation: Formation | None) -> str:
    """A short digest of the record as every replica encodes it ("" for none)."""
    if formation is None:
        return ""
    raw = json.dumps(formation.to_wire(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class FormationGeneration:
    """What etcd says of an app's formation writes (``number`` 0: none yet)."""

    number: int
    digest: str
    mod_revision: int
    at_ms: int = 0


NO_GENERATION = FormationGeneration(0, "", 0)


def decode_generation(raw: bytes, mod_revision: int) -> FormationGeneration | None:
    """The generation in an etcd value; None if it is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or type(data.get("g")) is not int or data["g"] < 1:
        return None
    digest, at = data.get("digest"), data.get("at")
    return FormationGeneration(
        data["g"], digest if isinstance(digest, str) else "", mod_revision,
        at if type(at) is int else 0,
    )  # fmt: skip


def next_generation(seen: FormationGeneration, formation: Formation, now_ms: int) -> str:
    """The etcd value of the write after ``seen`` that makes ``formation``."""
    return json.dumps(
        {"g": seen.number + 1, "digest": formation_digest(formation), "at": now_ms}, sort_keys=True
    )


class Base(enum.Enum):
    """Whether a formation write may build on this node's formation record."""

    CURRENT = "current"  # it is the one the last write made (or there is no generation)
    BEHIND = "behind"  # the last write's record has not reached this node: wait, then refuse
    ORPHANED = "orphaned"  # no node got the last write's record in ORPHAN_MS: build on it


def base_verdict(seen: FormationGeneration, local: Formation | None, now_ms: int) -> Base:
    if seen.number == 0 or formation_digest(local) == seen.digest:
        return Base.CURRENT
    if now_ms - seen.at_ms > ORPHAN_MS:
        return Base.ORPHANED
    return Base.BEHIND
