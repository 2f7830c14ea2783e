"""The replay store interface: record a proof once, answer first-seen or seen.

One method does the whole job atomically (``add``): there is no separate "check" call, so no
check-then-set race is possible. Sync and async twins have the same method names.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class ReplayStore(Protocol):
    def add(self, key: bytes, ttl: float) -> bool:
        """Record ``key`` for at least ``ttl`` seconds. True if it was not there (first use).

        Raises :class:`~dpop_middleware.errors.ReplayStoreError` when the backend cannot answer;
        callers refuse the request then (fail closed).
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncReplayStore(Protocol):
    async def add(self, key: bytes, ttl: float) -> bool: ...

    async def aclose(self) -> None: ...
