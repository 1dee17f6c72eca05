"""What must be decided once, as etcd transactions: unique names, routes, release numbers.

Theory of operation
-------------------
A claim is a key under ``f2p/claim/`` created by a transaction that succeeds
only if none of its keys exists (compare-and-create): two nodes, or two
leaders in a partition, can never both own an app name, an HTTP domain+path or
a TCP port.  Its value names the owner: ``{"app": id, "idem": key, "at": ms}``
(``idem`` is the client's Idempotency-Key, so a retried create is recognised).

An app's release numbers are a counter ``f2p/release/<app id>`` holding
``{"n": N, "id": release id, "at": ms}``, advanced by compare-and-swap on its
modification revision: concurrent changes serialise, each one built on the
release the counter names.  A leader that died between advancing the counter
and committing the release leaves a number no node holds: after
``ORPHAN_RELEASE_MS`` the next change builds on the newest release there is.
Formation writes are numbered the same way (`flynnp2p.coord.generation`); a
change that makes a release and moves the formation to it advances both in one
transaction.  A leader duty's swap can also be fenced: it commits only while
the leader key still has the create revision of the duty's term (`leads`).

Everything here can be derived again from the replicated state (`expected`):
after ``cluster recover`` the leader re-creates the claims of every app and
route the state holds, and drops claims no record owns any more.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from flynnp2p.coord.client import KV, CoordError
from flynnp2p.coord.election import LEADER_KEY
from flynnp2p.coord.generation import (
    NO_GENERATION,
    FormationGeneration,
    decode_generation,
    formation_key,
    next_generation,
)
from flynnp2p.state.merge import State
from flynnp2p.state.records import App, Formation, Route

CLAIM_PREFIX = "f2p/claim/"
RELEASE_PREFIX = "f2p/release/"


def app_key(name: str) -> str:
    return f"{CLAIM_PREFIX}app/{name}"


def http_key(domain: str, path: str) -> str:
    return f"{CLAIM_PREFIX}http/{domain}{path}"


def tcp_key(port: int) -> str:
    return f"{CLAIM_PREFIX}tcp/{port}"


def release_key(app_id: str) -> str:
    return f"{RELEASE_PREFIX}{app_id}"


def route_keys(route: Route) -> list[str]:
    """The claims a route needs: its TCP port, or its HTTP domain+path."""
    if route.type == "tcp" and route.port is not None:
        return [tcp_key(route.port)]
    if route.type == "http" and route.domain is not None:
        return [http_key(route.domain, route.path)]
    return []


ORPHAN_CLAIM_MS = 120_000


def wanted_claims(state: State) -> dict[str, str]:
    """Claim key → owning app id, for every app and route the state holds (the
    oldest record wins a key two of them want, as the claim it was made with did)."""
    wanted: dict[str, str] = {}
    for app in sorted(state.records(App), key=lambda a: (a.created_at, a.id)):
        wanted.setdefault(app_key(app.name), app.id)
    for route in sorted(state.records(Route), key=lambda r: (r.created_at, r.id)):
        for key in route_keys(route):
            wanted.setdefault(key, route.app_id)
    return wanted


def orphans(held: Mapping[str, Owner | None], state: State, now_ms: int) -> list[tuple[str, Owner]]:
    """Claims no record wants whose app is deleted, or that no record has owned
    for ``ORPHAN_CLAIM_MS`` (its creator died before the record spread)."""
    wanted = wanted_claims(state)
    out = []
    for key, owner in held.items():
        if key in wanted or owner is None:
            continue
        entry = state.get(App.KIND, owner.app_id)
        if (entry is not None and entry.value is None) or now_ms - owner.at_ms > ORPHAN_CLAIM_MS:
            out.append((key, owner))
    return out


def owner_value(app_id: str, idem: str | None, now_ms: int) -> bytes:
    return json.dumps({"app": app_id, "idem": idem, "at": now_ms}, sort_keys=True).encode()


@dataclass(frozen=True)
class Owner:
    app_id: str
    idem: str | None
    at_ms: int
    raw: bytes


@dataclass(frozen=True)
class ReleaseCounter:
    number: int
    release_id: str | None
    mod_revision: int
    at_ms: int = 0


def _owner(raw: bytes) -> Owner | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("app"), str):
        return None
    idem = data.get("idem")
    at = data.get("at")
    return Owner(data["app"], idem if isinstance(idem, str) else None, at if isinstance(at, int) else 0, raw)


class KeyStore(Protocol):
    """The part of `flynnp2p.coord.client.EtcdClient` the claims use."""

    async def get(self, key: str) -> KV | None: ...

    async def get_prefix(self, prefix: str) -> list[KV]: ...

    async def create(self, puts: dict[str, bytes | str], lease: int = 0) -> tuple[bool, int]: ...

    async def swap(self, key: str, value: bytes | str, mod_revision: int) -> bool: ...

    async def swap_many(
        self, swaps: Mapping[str, tuple[bytes | str, int]], created: Mapping[str, int] | None = None
    ) -> bool: ...

    async def delete_if(self, key: str, value: bytes) -> bool: ...

    async def delete(self, key: str) -> int: ...


class Claims:
    def __init__(self, client: KeyStore) -> None:
        self.client = client

    async def claim(self, keys: Iterable[str], value: bytes) -> bool:
        """Create every key with ``value``, or none of them (False: one is taken)."""
        ok, _ = await self.client.create(dict.fromkeys(keys, value))
        return ok

    async def owner(self, key: str) -> Owner | None:
        kv = await self.client.get(key)
        return None if kv is None else _owner(kv.value)

    async def owners(self, prefix: str = CLAIM_PREFIX) -> dict[str, Owner | None]:
        return {kv.key: _owner(kv.value) for kv in await self.client.get_prefix(prefix)}

    async def drop(self, key: str, value: bytes) -> bool:
        """Remove a claim only while ``value`` still owns it."""
        return await self.client.delete_if(key, value)

    async def drop_owned_by(self, keys: Iterable[str], app_id: str) -> None:
        for key in keys:
            kv = await self.client.get(key)
            owner = None if kv is None else _owner(kv.value)
            if kv is not None and owner is not None and owner.app_id == app_id:
                await self.client.delete_if(key, kv.value)

    async def release_counter(self, app_id: str) -> ReleaseCounter:
        kv = await self.client.get(release_key(app_id))
        if kv is None:
            return ReleaseCounter(0, None, 0)
        data = kv.json()
        if not isinstance(data, dict) or not isinstance(data.get("n"), int):
            raise CoordError(f"the release counter of app {app_id} is not readable")
        rid, at = data.get("id"), data.get("at")
        return ReleaseCounter(
            data["n"], rid if isinstance(rid, str) else None, kv.mod_revision,
            at if isinstance(at, int) else 0,
        )  # fmt: skip

    async def advance_release(
        self, app_id: str, seen: ReleaseCounter, release_id: str, now_ms: int = 0
    ) -> bool:
        return await self.advance(app_id, release=(seen, release_id), now_ms=now_ms)

    async def formation_generation(self, app_id: str) -> FormationGeneration:
        kv = await self.client.get(formation_key(app_id))
        if kv is None:
            return NO_GENERATION
        found = decode_generation(kv.value, kv.mod_revision)
        if found is None:
            raise CoordError(f"the formation generation of app {app_id} is not readable")
        return found

    async def advance(
        self,
        app_id: str,
        *,
        release: tuple[ReleaseCounter, str] | None = None,
        formation: tuple[FormationGeneration, Formation] | None = None,
        epoch: int | None = None,
        now_ms: int = 0,
    ) -> bool:
        """Advance the release counter past ``release[0]`` to name ``release[1]``,
        and the formation generation past ``formation[0]`` to name ``formation[1]``,
        all or nothing; with ``epoch``, only while this node leads that term."""
        swaps: dict[str, tuple[bytes | str, int]] = {}
        if release is not None:
            seen, release_id = release
            value = json.dumps({"n": seen.number + 1, "id": release_id, "at": now_ms})
            swaps[release_key(app_id)] = (value, seen.mod_revision)
        if formation is not None:
            gen, record = formation
            swaps[formation_key(app_id)] = (next_generation(gen, record, now_ms), gen.mod_revision)
        return await self.client.swap_many(swaps, None if epoch is None else {LEADER_KEY: epoch})

    async def leads(self, epoch: int) -> bool:
        """Whether the leader key is still the one of term ``epoch`` (a linearizable
        read: a member cut off from its quorum cannot answer, a `CoordError`)."""
        return await self.client.swap_many({}, {LEADER_KEY: epoch})

    async def forget_app(self, app_id: str) -> None:
        await self.client.delete(release_key(app_id))
        await self.client.delete(formation_key(app_id))

    async def reconcile(self, state: State, now_ms: int) -> None:
        """Claims for what the state holds; claims nothing holds any more dropped."""
        held = await self.owners(CLAIM_PREFIX)
        for key, app_id in wanted_claims(state).items():
            if key not in held:
                await self.claim([key], owner_value(app_id, None, now_ms))
        for key, owner in orphans(held, state, now_ms):
            await self.drop(key, owner.raw)
