"""Replay stores: the interface, the settings parser and the factory.

``replay_store`` setting: ``"memory://"`` (default; ``"memory://?max_entries=N"``), a dict
``{"url": "memory://", "max_entries": N}``, or a ready store object that implements
:class:`ReplayStore` / :class:`AsyncReplayStore`. Redis URLs and clients are handled in
:mod:`dpop_middleware.replay.redis` (the only module that imports ``redis``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dpop_middleware.errors import ConfigurationError
from dpop_middleware.replay.base import AsyncReplayStore, ReplayStore
from dpop_middleware.replay.memory import (
    DEFAULT_MAX_ENTRIES,
    AsyncMemoryReplayStore,
    MemoryReplayStore,
)

__all__ = [
    "AsyncMemoryReplayStore",
    "AsyncReplayStore",
    "MemoryReplayStore",
    "ReplayStore",
    "ReplayStoreConfig",
    "create_async_store",
    "create_sync_store",
    "validate_replay_store_setting",
]

_ALLOWED = (
    "'memory://', a 'redis://', 'rediss://' or 'unix://' URL, a dict with 'url', "
    "or a store/client object"
)


@dataclass(frozen=True, slots=True)
class ReplayStoreConfig:
    """The validated ``replay_store`` setting. ``client`` is a user-supplied object, if any."""

    kind: str  # "memory", "redis" or "object"
    url: str = "memory://"
    options: Mapping[str, Any] = field(default_factory=dict)
    client: Any = None


def _fail(value: Any, allowed: str = _ALLOWED) -> ConfigurationError:
    return ConfigurationError(
        f"dpop_middleware setting 'replay_store': got {value!r}; allowed: {allowed}"
    )


def validate_replay_store_setting(value: Any) -> ReplayStoreConfig:
    if isinstance(value, ReplayStoreConfig):
        return value
    if isinstance(value, str):
        value = {"url": value}
    if isinstance(value, Mapping):
        url = value.get("url", "memory://")
        if not isinstance(url, str):
            raise _fail(value)
        scheme = urlsplit(url).scheme
        if scheme == "memory":
            options: dict[str, Any] = {k: v for k, v in value.items() if k != "url"}
            for key, vals in parse_qs(urlsplit(url).query).items():
                options.setdefault(key, vals[-1])
            unknown = set(options) - {"max_entries"}
            if unknown:
                raise _fail(value, "for memory:// only 'max_entries'")
            try:
                max_entries = int(options.get("max_entries", DEFAULT_MAX_ENTRIES))
            except (TypeError, ValueError):
                raise _fail(value, "max_entries: a whole number >= 1") from None
            if max_entries < 1:
                raise _fail(value, "max_entries: a whole number >= 1")
            return ReplayStoreConfig("memory", url, {"max_entries": max_entries})
        if scheme in ("redis", "rediss", "unix"):
            from dpop_middleware.replay.redis import validate_redis_options

            return ReplayStoreConfig("redis", url, validate_redis_options(value))
        raise _fail(value)
    if isinstance(value, ReplayStore | AsyncReplayStore):
        return ReplayStoreConfig("object", client=value)
    if type(value).__module__.startswith("redis"):
        from dpop_middleware.replay.redis import validate_redis_options

        return ReplayStoreConfig("redis", "", validate_redis_options({}), client=value)
    raise _fail(value)


def create_sync_store(config: ReplayStoreConfig) -> ReplayStore:
    if config.kind == "memory":
        return MemoryReplayStore(int(config.options["max_entries"]))
    if config.kind == "object":
        if not isinstance(config.client, ReplayStore):
            raise _fail(config.client, "a sync store (with add()/close()) for WSGI")
        return config.client
    from dpop_middleware.replay.redis import RedisReplayStore

    return RedisReplayStore.from_config(config)


def create_async_store(config: ReplayStoreConfig) -> AsyncReplayStore:
    if config.kind == "memory":
        return AsyncMemoryReplayStore(int(config.options["max_entries"]))
    if config.kind == "object":
        if not isinstance(config.client, AsyncReplayStore):
            raise _fail(config.client, "an async store (with async add()/aclose()) for ASGI")
        return config.client
    from dpop_middleware.replay.redis import AsyncRedisReplayStore

    return AsyncRedisReplayStore.from_config(config)
