"""One contract for every replay store: memory and Redis (single server and Cluster), sync and async.

RFC 9449 section 11.1: a proof is accepted once within the window its replay key is kept for.
``add(key, ttl)`` is True on first use and False on a replay until ``ttl`` has passed.
The memory store runs on the injected clock; Redis ``PX`` expiry needs a tiny real wait.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import FrozenClock

from dpop_middleware.errors import ReplayStoreFullError
from dpop_middleware.replay import (
    AsyncMemoryReplayStore,
    MemoryReplayStore,
    create_async_store,
    create_sync_store,
    validate_replay_store_setting,
)

BACKENDS = [
    pytest.param(("memory", "sync"), id="memory-sync"),
    pytest.param(("memory", "async"), id="memory-async"),
    pytest.param(("redis", "sync"), id="redis-sync"),
    pytest.param(("redis", "async"), id="redis-async"),
    pytest.param(("cluster", "sync"), id="cluster-sync"),
    pytest.param(("cluster", "async"), id="cluster-async"),
]


def new_key() -> bytes:
    return os.urandom(32)  # what the verifier hands over: BLAKE2b-256 of (jkt, jti)


class Harness:
    """Drives one kind of store with plain calls, and moves time the way that store sees it."""

    def __init__(
        self, backend: str, flavour: str, clock: FrozenClock, url: str | None, prefix: str
    ):
        self.backend = backend
        self.flavour = flavour
        self.clock = clock
        self.url = url
        self.prefix = prefix
        self.runner = asyncio.Runner() if flavour == "async" else None
        self.stores: dict[str, Any] = {}

    def store(self, namespace: str = "a") -> Any:
        """The store for ``namespace``: a Redis key prefix, or one memory store per namespace."""
        if namespace not in self.stores:
            if self.backend == "memory":
                cls = MemoryReplayStore if self.flavour == "sync" else AsyncMemoryReplayStore
                self.stores[namespace] = cls(1000, clock=self.clock)
            else:
                config = validate_replay_store_setting({
                    "url": self.url,
                    "key_prefix": f"{self.prefix}{namespace}:",
                    "cluster": self.backend == "cluster",
                })  # fmt: skip
                make = create_sync_store if self.flavour == "sync" else create_async_store
                self.stores[namespace] = make(config)
        return self.stores[namespace]

    def add(self, key: bytes, ttl: float, namespace: str = "a") -> bool:
        store = self.store(namespace)
        if self.runner is not None:
            answer: bool = self.runner.run(store.add(key, ttl))
            return answer
        answer = store.add(key, ttl)
        return answer

    def wait(self, seconds: float) -> None:
        if self.backend == "memory":
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)

    def first_use_after_expiry(self, key: bytes, ttl: float) -> bool:
        """``add`` once the TTL is over. Redis may need a few ms more (bounded: 1 s)."""
        self.wait(ttl)
        if self.backend == "memory":
            return self.add(key, ttl)
        deadline = time.monotonic() + 1.0
        while not self.add(key, ttl):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        for store in self.stores.values():
            if self.runner is not None:
                self.runner.run(store.aclose())
            else:
                store.close()
        if self.runner is not None:
            self.runner.close()


@pytest.fixture(params=BACKENDS)
def harness(
    request: pytest.FixtureRequest, clock: FrozenClock, key_prefix: str
) -> Iterator[Harness]:
    backend, flavour = request.param
    url = None
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
    elif backend == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
    h = Harness(backend, flavour, clock, url, key_prefix)
    try:
        yield h
    finally:
        h.close()


def test_first_use_is_accepted_and_a_replay_refused(harness: Harness) -> None:
    key = new_key()
    assert harness.add(key, 60) is True
    assert harness.add(key, 60) is False
    assert harness.add(key, 60) is False


def test_different_keys_do_not_interfere(harness: Harness) -> None:
    keys = [new_key() for _ in range(20)]
    assert [harness.add(k, 60) for k in keys] == [True] * 20
    assert [harness.add(k, 60) for k in keys] == [False] * 20


def test_a_key_is_forgotten_after_its_ttl(harness: Harness) -> None:
    key = new_key()
    assert harness.add(key, 0.2) is True
    assert harness.add(key, 0.2) is False
    assert harness.first_use_after_expiry(key, 0.2) is True
    assert harness.add(key, 0.2) is False  # recorded again by that first use


def test_a_long_ttl_outlives_a_short_one(harness: Harness) -> None:
    short, long = new_key(), new_key()
    assert harness.add(short, 0.1) is True
    assert harness.add(long, 30) is True
    assert harness.first_use_after_expiry(short, 0.1) is True
    assert harness.add(long, 30) is False


def test_key_prefixes_keep_stores_apart(harness: Harness) -> None:
    key = new_key()
    assert harness.add(key, 60, namespace="a") is True
    assert harness.add(key, 60, namespace="b") is True
    assert harness.add(key, 60, namespace="a") is False
    assert harness.add(key, 60, namespace="b") is False


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_memory_store_refuses_new_keys_when_full(flavour: str, clock: FrozenClock) -> None:
    """Evicting a live entry would let its proof be replayed: a full store refuses (503)."""
    harness = Harness("memory", flavour, clock, None, "")
    harness.stores["a"] = (MemoryReplayStore if flavour == "sync" else AsyncMemoryReplayStore)(
        2, clock=clock
    )
    try:
        first, second = new_key(), new_key()
        assert harness.add(first, 10) is True
        assert harness.add(second, 10) is True
        with pytest.raises(ReplayStoreFullError):
            harness.add(new_key(), 10)
        assert harness.add(first, 10) is False  # a replay is still answered
        clock.advance(10)
        assert harness.add(new_key(), 10) is True  # room again once entries expire
    finally:
        harness.close()
