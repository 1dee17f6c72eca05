"""A small client for etcd's v3 JSON gateway (``/v3/...`` on the client port).

Only what flynnp2p needs: ranges, puts, deletes, compare-and-create and
compare-and-swap transactions, leases, and cluster membership.  Keys and
values travel base64-encoded; int64 fields come back as strings.  Every failure
(etcd not answering, no quorum, a refused request) is a `CoordError`, a 503
whose message names etcd's own reason.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from flynnp2p.errors import ClusterError


class CoordError(ClusterError):
    """etcd could not do it: not running, no quorum, or it refused the request."""


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    def json(self) -> Any:
        try:
            return json.loads(self.value)
        except ValueError:
            return None


@dataclass(frozen=True)
class EtcdMember:
    id: int
    name: str  # "" until the member has started once
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool


def _kv(raw: dict[str, Any]) -> KV:
    return KV(
        key=_unb64(raw["key"]).decode(errors="replace"),
        value=_unb64(raw.get("value", "")),
        create_revision=int(raw.get("create_revision", 0)),
        mod_revision=int(raw.get("mod_revision", 0)),
        lease=int(raw.get("lease", 0)),
    )


def _member(raw: dict[str, Any]) -> EtcdMember:
    return EtcdMember(
        id=int(raw["ID"]),
        name=raw.get("name", ""),
        peer_urls=tuple(raw.get("peerURLs", ())),
        client_urls=tuple(raw.get("clientURLs", ())),
        is_learner=bool(raw.get("isLearner", False)),
    )


def _put(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"requestPut": body}


class EtcdClient:
    """Talks to one etcd member's client URL; ``timeout`` bounds every call."""

    def __init__(self, url: str, *, timeout: float = 3.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self.http = httpx.AsyncClient(
            base_url=url,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self.http.post(path, json=body)
        except httpx.TimeoutException:
            raise CoordError("etcd did not answer in time (no quorum?)") from None
        except httpx.HTTPError as exc:
            raise CoordError(f"etcd is not answering ({str(exc) or type(exc).__name__})") from None
        try:
            data = resp.json()
        except ValueError:
            raise CoordError(f"etcd answered {resp.status_code} with a body that is not JSON") from None
        if resp.status_code != 200 or "error" in data:
            message = str(data.get("message") or data.get("error") or f"status {resp.status_code}")
            raise CoordError(f"etcd: {message}")
        if not isinstance(data, dict):
            raise CoordError("etcd answered with a JSON value that is not an object")
        return data

    # -- keys --------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        data = await self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> list[KV]:
        data = await self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        return [_kv(kv) for kv in data.get("kvs") or []]

    async def delete(self, key: str) -> int:
        data = await self.call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(data.get("deleted", 0))

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> tuple[bool, int, list[dict[str, Any]]]:
        """(succeeded, revision after it, the responses of the branch taken)."""
        data = await self.call(
            "/v3/kv/txn", {"compare": compare, "success": success, "failure": failure or []}
        )
        revision = int(data.get("header", {}).get("revision", 0))
        return bool(data.get("succeeded", False)), revision, data.get("responses") or []

    async def create(self, puts: dict[str, bytes | str], lease: int = 0) -> tuple[bool, int]:
        """Put every key of ``puts`` only if none exists: (created, revision)."""
        compare = [
            {"key": _b64(k), "target": "CREATE", "result": "EQUAL", "createRevision": "0"}
            for k in puts
        ]
        ok, revision, _ = await self.txn(compare, [_put(k, v, lease) for k, v in puts.items()])
        return ok, revision

    async def swap(self, key: str, value: bytes | str, mod_revision: int) -> bool:
        """Put ``key`` only if it was last changed at ``mod_revision`` (0: absent)."""
        return await self.swap_many({key: (value, mod_revision)})

    async def swap_many(
        self, swaps: Mapping[str, tuple[bytes | str, int]], created: Mapping[str, int] | None = None
    ) -> bool:
        """Put every key of ``swaps`` only if each was last changed at its revision
        (0: absent), and every key of ``created`` still has that create revision
        (a fence: the leader key of one term); all or nothing.  With no ``swaps``,
        a linearizable check of ``created`` alone."""
        compare = []
        for key, (_, mod_revision) in swaps.items():
            if mod_revision == 0:
                compare.append({"key": _b64(key), "target": "CREATE", "result": "EQUAL", "createRevision": "0"})
            else:
                compare.append(
                    {"key": _b64(key), "target": "MOD", "result": "EQUAL", "modRevision": str(mod_revision)}
                )
        for key, revision in (created or {}).items():
            compare.append(
                {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "createRevision": str(revision)}
            )
        success = [_put(k, v) for k, (v, _) in swaps.items()]
        if not success:  # etcd serves a txn without ops (or only serializable ranges)
            # from the member's own copy; a plain range makes it a linearizable read
            success = [{"requestRange": {"key": _b64(k)}} for k in created or {}]
        ok, _, _ = await self.txn(compare, success)
        return ok

    async def delete_if(self, key: str, value: bytes) -> bool:
        """Delete ``key`` only while it still holds ``value``."""
        compare = {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}
        ok, _, _ = await self.txn([compare], [{"requestDeleteRange": {"key": _b64(key)}}])
        return ok

    async def wait_deleted(self, key: str, from_revision: int) -> None:
        """Return once ``key`` is deleted at or after ``from_revision`` (a watch:
        no polling); the caller bounds the wait, since a member cut off from its
        quorum just stays silent."""
        body = {"create_request": {"key": _b64(key), "start_revision": str(from_revision)}}
        try:
            async with self.http.stream("POST", "/v3/watch", json=body, timeout=None) as resp:
                if resp.status_code != 200:
                    raise CoordError(f"etcd refused the watch ({resp.status_code})")
                async for line in resp.aiter_lines():
                    try:
                        result = json.loads(line).get("result", {})
                    except ValueError:
                        raise CoordError("etcd sent a watch event that is not JSON") from None
                    for event in result.get("events") or ():
                        if event.get("type") == "DELETE":
                            return
        except httpx.HTTPError as exc:
            raise CoordError(f"etcd watch broke ({str(exc) or type(exc).__name__})") from None
        raise CoordError("etcd ended the watch")

    # -- leases ------------------------------------------------------------

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        data = await self.call("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(data["ID"]), int(data.get("TTL", 0))

    async def keepalive(self, lease: int) -> int:
        """The lease's new TTL in seconds; 0 when the lease is gone."""
        data = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except CoordError as exc:
            if "not found" not in exc.message:
                raise

    # -- membership --------------------------------------------------------

    async def members(self) -> list[EtcdMember]:
        data = await self.call("/v3/cluster/member/list", {})
        return [_member(m) for m in data.get("members") or []]

    async def member_add(self, peer_url: str, *, learner: bool) -> tuple[EtcdMember, list[EtcdMember]]:
        data = await self.call("/v3/cluster/member/add", {"peerURLs": [peer_url], "isLearner": learner})
        return _member(data["member"]), [_member(m) for m in data.get("members") or []]

    async def member_remove(self, member_id: int) -> None:
        await self.call("/v3/cluster/member/remove", {"ID": str(member_id)})

    async def member_promote(self, member_id: int) -> None:
        await self.call("/v3/cluster/member/promote", {"ID": str(member_id)})
