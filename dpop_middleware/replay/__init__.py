"""Replay stores: the interface, the settings parser and the factory.

``replay_store`` setting: ``"memory://"`` (default; ``"memory://?max_entries=N"``), a dict
``{"url": "memory://", "max_entries": N}`` (without ``max_entries``, the cap is sized from the
replay TTL the factory is given: :func:`~dpop_middleware.replay.memory.default_max_entries`), or a ready store object that implements
:class:`ReplayStore` / :class:`AsyncReplayStore`. Redis: a ``redis://``, ``rediss://`` or
``unix://`` URL, a dict with such a ``url`` (or an application's ``client``) and options, or a
redis-py client object; these are checked and built in :mod:`dpop_middleware.replay.redis`, the
only module that imports ``redis`` (loaded only when the setting names Redis).
"""

from __future__ import annotations

import re
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
    default_max_entries,
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


@dataclass(frozen=True, slots=True, repr=False)
class ReplayStoreConfig:
    """The validated ``replay_store`` setting. ``client`` is a user-supplied object, if any."""

    kind: str  # "memory", "redis" or "object"
    url: str = "memory://"
    options: Mapping[str, Any] = field(default_factory=dict)
    client: Any = None

    def __repr__(self) -> str:
        # Never show a Redis password (settings end up in logs and tracebacks).
        hidden = {"url", "sentinel_password", "client"}
        options = {k: v for k, v in self.options.items() if k not in hidden and v is not None}
        client = f", client={type(self.client).__name__}" if self.client is not None else ""
        return (
            f"ReplayStoreConfig(kind={self.kind!r}, url={_redact(self.url)!r}, "
            f"options={options!r}{client})"
        )


_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s'\"]*:)[^@/\s'\"]*@|((?:[?&])password=)[^&\s'\"]*")


def _redact(text: str) -> str:
    """``text`` with URL passwords (``://user:secret@`` and ``password=``) replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(lambda m: f"{m[1]}***@" if m[1] else f"{m[2]}***", text)


def _is_redis_client(value: Any) -> bool:
    """A redis-py client (or a subclass of one), recognised without importing ``redis``."""
    return any(
        cls.__module__ == "redis" or cls.__module__.startswith("redis.")
        for cls in type(value).__mro__
    )


def _fail(value: Any, allowed: str = _ALLOWED) -> ConfigurationError:
    return ConfigurationError(
        f"dpop_middleware setting 'replay_store': got {_redact(repr(value))}; allowed: {allowed}"
    )


def validate_replay_store_setting(value: Any) -> ReplayStoreConfig:
    if isinstance(value, ReplayStoreConfig):
        return value
    if isinstance(value, str):
        value = {"url": value}
    if isinstance(value, Mapping):
        if "client" in value:
            from dpop_middleware.replay.redis import validate_redis_options

            return ReplayStoreConfig("redis", "", validate_redis_options(value), value["client"])
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
            if "max_entries" not in options:  # sized from the replay TTL by the factory
                return ReplayStoreConfig("memory", url, {"max_entries": None})
            try:
                max_entries = int(options["max_entries"])
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
    if _is_redis_client(value):
        from dpop_middleware.replay.redis import validate_redis_options

        return ReplayStoreConfig("redis", "", validate_redis_options({"client": value}), value)
    raise _fail(value)


def _memory_cap(config: ReplayStoreConfig, replay_ttl: float | None) -> int:
    explicit = config.options["max_entries"]
    if explicit is not None:
        return int(explicit)
    return DEFAULT_MAX_ENTRIES if replay_ttl is None else default_max_entries(replay_ttl)


def create_sync_store(config: ReplayStoreConfig, *, replay_ttl: float | None = None) -> ReplayStore:
    """The store the setting names. ``replay_ttl`` (``Settings.replay_ttl``) sizes the memory
    store's cap when the setting gives no ``max_entries``."""
    if config.kind == "memory":
        return MemoryReplayStore(_memory_cap(config, replay_ttl))
    if config.kind == "object":
        if not isinstance(config.client, ReplayStore):
            raise _fail(config.client, "a sync store (with add()/close()) for WSGI")
        return config.client
    from dpop_middleware.replay.redis import RedisReplayStore

    return RedisReplayStore.from_config(config)


def create_async_store(
    config: ReplayStoreConfig, *, replay_ttl: float | None = None
) -> AsyncReplayStore:
    """The async twin of :func:`create_sync_store`."""
    if config.kind == "memory":
        return AsyncMemoryReplayStore(_memory_cap(config, replay_ttl))
    if config.kind == "object":
        if not isinstance(config.client, AsyncReplayStore):
            raise _fail(config.client, "an async store (with async add()/aclose()) for ASGI")
        return config.client
    from dpop_middleware.replay.redis import AsyncRedisReplayStore

    return AsyncRedisReplayStore.from_config(config)
