"""An in-memory stand-in for the part of etcd the claims use (one revision
counter, compare-and-create, compare-and-swap of several keys with create-revision
fences, compare-value-delete), for API
tests that run without an etcd process; the cluster tests use real etcd."""

from __future__ import annotations

from collections.abc import Mapping

from flynnp2p.coord.client import KV


class MemoryEtcd:
    def __init__(self) -> None:
        self.revision = 1
        self.kvs: dict[str, KV] = {}

    def _put(self, key: str, value: bytes | str) -> None:
        raw = value.encode() if isinstance(value, str) else value
        self.revision += 1
        old = self.kvs.get(key)
        created = old.create_revision if old is not None else self.revision
        self.kvs[key] = KV(key, raw, created, self.revision, 0)

    async def get(self, key: str) -> KV | None:
        return self.kvs.get(key)

    async def get_prefix(self, prefix: str) -> list[KV]:
        return [kv for k, kv in sorted(self.kvs.items()) if k.startswith(prefix)]

    async def create(self, puts: dict[str, bytes | str], lease: int = 0) -> tuple[bool, int]:
        if any(k in self.kvs for k in puts):
            return False, self.revision
        for key, value in puts.items():
            self._put(key, value)
        return True, self.revision

    async def swap(self, key: str, value: bytes | str, mod_revision: int) -> bool:
        old = self.kvs.get(key)
        if (old.mod_revision if old is not None else 0) != mod_revision:
            return False
        self._put(key, value)
        return True

    async def swap_many(
        self, swaps: Mapping[str, tuple[bytes | str, int]], created: Mapping[str, int] | None = None
    ) -> bool:
        for key, (_, mod_revision) in swaps.items():
            old = self.kvs.get(key)
            if (old.mod_revision if old is not None else 0) != mod_revision:
                return False
        for key, revision in (created or {}).items():
            old = self.kvs.get(key)
            if (old.create_revision if old is not None else 0) != revision:
                return False
        for key, (value, _) in swaps.items():
            self._put(key, value)
        return True

    async def delete_if(self, key: str, value: bytes) -> bool:
        old = self.kvs.get(key)
        if old is None or old.value != value:
            return False
        del self.kvs[key]
        return True

    async def delete(self, key: str) -> int:
        return 1 if self.kvs.pop(key, None) is not None else 0
