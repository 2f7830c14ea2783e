"""Redis replay store (placeholder until the Redis issue lands)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpop_middleware.errors import ConfigurationError


def validate_redis_options(value: Mapping[str, Any]) -> Mapping[str, Any]:
    raise ConfigurationError("dpop_middleware setting 'replay_store': Redis is not available yet")


class RedisReplayStore:
    @classmethod
    def from_config(cls, config: Any) -> Any:
        raise ConfigurationError("Redis replay store is not available yet")


class AsyncRedisReplayStore(RedisReplayStore):
    pass
