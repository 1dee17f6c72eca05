"""``Watched``: a value owned by one task that others read and wait on.

The owner calls ``set``; readers take ``value`` (never blocks) or
``await wait_change(version)`` to sleep until the value differs from the one they
saw.  Values are immutable, so readers need no lock.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Watched(Generic[T]):
    def __init__(self, value: T) -> None:
        self._value = value
        self._changed = trio.Event()
        self.version = 0

    @property
    def value(self) -> T:
        return self._value

    def set(self, value: T) -> None:
        if value == self._value:
            return
        self._value = value
        self.version += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_change(self, seen_version: int) -> tuple[int, T]:
        """Wait until the version differs from ``seen_version``; return the new pair."""
        while self.version == seen_version:
            await self._changed.wait()
        return self.version, self._value
