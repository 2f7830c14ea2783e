"""The Redis ``replay_store`` setting: every form accepted, every mistake refused at start-up.

A refused setting names the key, the bad value (never a password) and what is allowed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.sentinel

from dpop_middleware import ConfigurationError, Settings
from dpop_middleware.replay import (
    create_async_store,
    create_sync_store,
    validate_replay_store_setting,
)
from dpop_middleware.replay.redis import (
    DEFAULTS,
    AsyncRedisReplayStore,
    RedisReplayStore,
    redact_url,
)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        pytest.param(
            "redis://localhost",
            {"url": "redis://localhost", "key_prefix": "dpop:", "timeout": 0.5, "cluster": False},
            id="url-string",
        ),
        pytest.param("rediss://u:pw@cache.internal:6380/2", {"cluster": False}, id="tls-url"),
        pytest.param(
            "rediss://cache?ssl_cert_reqs=none&ssl_check_hostname=false&ssl_ca_certs=/ca.pem",
            {},
            id="tls-options-in-query",
        ),
        pytest.param("unix:///run/redis/redis.sock?db=3", {}, id="unix-socket"),
        pytest.param("unix://:pw@/run/redis.sock", {}, id="unix-socket-password"),
        pytest.param("redis://[::1]:6379/0", {}, id="ipv6"),
        pytest.param(
            {
                "url": "redis://10.0.0.5:7000",
                "key_prefix": "api:dpop:",
                "cluster": True,
                "timeout": 1,
                "ping_on_startup": True,
            },
            {"cluster": True, "timeout": 1.0, "key_prefix": "api:dpop:", "ping_on_startup": True},
            id="cluster-dict",
        ),
        pytest.param(
            {
                "url": "redis://:secret@mymaster/1",
                "sentinels": ["10.0.0.1:26379", ("10.0.0.2", 26379)],
                "sentinel_password": "s",
            },
            {"sentinels": (("10.0.0.1", 26379), ("10.0.0.2", 26379))},
            id="sentinel-dict",
        ),
        pytest.param({"url": "redis://h", "key_prefix": ""}, {"key_prefix": ""}, id="empty-prefix"),
    ],
)
def test_accepted_settings(setting: Any, expected: dict[str, Any]) -> None:
    config = validate_replay_store_setting(setting)
    assert config.kind == "redis"
    assert set(config.options) == set(DEFAULTS)
    for key, value in expected.items():
        assert config.options[key] == value


def refused(setting: Any) -> str:
    with pytest.raises(ConfigurationError) as info:
        validate_replay_store_setting(setting)
    message = str(info.value)
    assert message.startswith("dpop_middleware setting 'replay_store'")
    assert "allowed" in message
    return message


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        pytest.param({"url": "redis://h", "timout": 1}, ["'timout'", "'timeout'", "key_prefix"], id="typo-key"),
        pytest.param({"url": "redis://h", "pool": 1}, ["'pool'", "allowed keys: url, key_prefix"], id="unknown-key"),
        pytest.param("redis://h:99999", ["'url'", "port"], id="port-out-of-range"),
        pytest.param("redis://h:abc", ["'url'", "port"], id="port-not-a-number"),
        pytest.param("redis://h:0", ["'url'", "port 0"], id="port-zero"),
        pytest.param("redis:///0", ["'url'", "host is missing"], id="no-host"),
        pytest.param("redis://h/x", ["'url'", "db must be a whole number"], id="db-not-a-number"),
        pytest.param("redis://h/1?db=2", ["'url'", "db is given twice"], id="db-twice"),
        pytest.param("redis://h?socket_timeout=9", ["'socket_timeout'", "query parameters db, password"], id="unknown-query"),
        pytest.param("redis://h?db=1&db=2", ["'db' given twice"], id="repeated-query"),
        pytest.param("redis://h?ssl_cert_reqs=none", ["'ssl_cert_reqs'"], id="tls-query-without-rediss"),
        pytest.param("rediss://h?ssl_cert_reqs=maybe", ["ssl_cert_reqs one of none, optional, required"], id="bad-cert-reqs"),
        pytest.param("rediss://h?ssl_check_hostname=perhaps", ["ssl_check_hostname=true or false"], id="bad-check-hostname"),
        pytest.param("redis://h#frag", ["fragment"], id="fragment"),
        pytest.param("unix://tmp/redis.sock", ["unix:///absolute/path"], id="unix-with-host"),
        pytest.param("unix://", ["socket path is missing"], id="unix-without-path"),
        pytest.param({"url": None}, ["got {'url': None}"], id="url-none"),
        pytest.param({"url": "redis://h", "key_prefix": "dpop:{x}:"}, ["'key_prefix'", "hash tag"], id="hash-tag-prefix"),
        pytest.param({"url": "redis://h", "key_prefix": b"dpop:"}, ["'key_prefix'"], id="bytes-prefix"),
        pytest.param({"url": "redis://h", "timeout": 0}, ["'timeout'", "> 0 and <= 60"], id="zero-timeout"),
        pytest.param({"url": "redis://h", "timeout": 61}, ["'timeout'"], id="huge-timeout"),
        pytest.param({"url": "redis://h", "timeout": True}, ["'timeout'"], id="bool-timeout"),
        pytest.param({"url": "redis://h", "timeout": "1"}, ["'timeout'"], id="string-timeout"),
        pytest.param({"url": "redis://h", "cluster": "yes"}, ["'cluster'", "True or False"], id="cluster-not-bool"),
        pytest.param({"url": "redis://h", "ping_on_startup": 1}, ["'ping_on_startup'"], id="ping-not-bool"),
        pytest.param({"url": "unix:///r.sock", "cluster": True}, ["'url'", "with 'cluster'"], id="cluster-unix"),
        pytest.param({"url": "redis://h/3", "cluster": True}, ["db 0 only"], id="cluster-db"),
        pytest.param({"url": "redis://m", "sentinels": "h:26379"}, ["'sentinels'", "non-empty list"], id="sentinels-string"),
        pytest.param({"url": "redis://m", "sentinels": []}, ["'sentinels'"], id="sentinels-empty"),
        pytest.param({"url": "redis://m", "sentinels": ["h"]}, ["'sentinels'", "no port"], id="sentinel-no-port"),
        pytest.param({"url": "redis://m", "sentinels": [("h", "1")]}, ["'sentinels'"], id="sentinel-port-string"),
        pytest.param({"url": "redis://m:6379", "sentinels": ["h:1"]}, ["service name"], id="sentinel-url-with-port"),
        pytest.param({"url": "unix:///r.sock", "sentinels": ["h:1"]}, ["service_name"], id="sentinel-unix"),
        pytest.param({"url": "redis://m", "sentinels": ["h:1"], "cluster": True}, ["not both"], id="sentinel-and-cluster"),
        pytest.param({"url": "redis://h", "sentinel_password": "x"}, ["'sentinel_password'", "only together"], id="sentinel-password-alone"),
        pytest.param({"url": "redis2://h"}, ["got {'url': 'redis2://h'}"], id="unknown-scheme"),
    ],
)  # fmt: skip
def test_refused_settings_name_the_key_and_the_allowed_values(
    setting: Any, names: list[str]
) -> None:
    message = refused(setting)
    for name in names:
        assert name in message


def test_client_objects_are_accepted_as_they_are() -> None:
    for client in (redis.Redis(), redis.asyncio.Redis()):
        config = validate_replay_store_setting(client)
        assert config.kind == "redis"
        assert config.client is client
        config = validate_replay_store_setting({"client": client, "key_prefix": "app:"})
        assert config.client is client
        assert config.options["key_prefix"] == "app:"


def test_a_subclass_of_a_redis_client_is_a_client() -> None:
    class AppRedis(redis.Redis):
        pass

    client = AppRedis()
    assert validate_replay_store_setting(client).client is client


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        pytest.param({"client": redis.Redis(), "timeout": 1}, ["'timeout'", "only 'key_prefix' beside 'client'"], id="client-with-timeout"),
        pytest.param({"client": redis.Redis(), "url": "redis://h"}, ["'url'"], id="client-with-url"),
        pytest.param({"client": object()}, ["'client'", "redis.asyncio.Redis"], id="client-not-redis"),
        pytest.param({"client": redis.sentinel.Sentinel([("h", 1)])}, ["master_for"], id="client-is-sentinel"),
    ],
)  # fmt: skip
def test_refused_client_settings(setting: Any, names: list[str]) -> None:
    message = refused(setting)
    for name in names:
        assert name in message


def test_a_sync_client_is_refused_by_the_async_store_and_the_reverse() -> None:
    with pytest.raises(
        ConfigurationError, match=re.escape("redis.asyncio.Redis or redis.asyncio.RedisCluster")
    ):
        create_async_store(validate_replay_store_setting(redis.Redis()))
    with pytest.raises(
        ConfigurationError, match=re.escape("redis.Redis or redis.RedisCluster under WSGI")
    ):
        create_sync_store(validate_replay_store_setting(redis.asyncio.Redis()))


def test_factories_build_the_redis_stores() -> None:
    config = validate_replay_store_setting("redis://127.0.0.1:1/0")
    assert isinstance(create_sync_store(config), RedisReplayStore)
    assert isinstance(create_async_store(config), AsyncRedisReplayStore)


def test_settings_refuse_a_bad_redis_setting_at_start_up(
    make_settings: Callable[..., dict[str, Any]],
) -> None:
    with pytest.raises(ConfigurationError, match="'replay_store' key 'timeout'"):
        Settings.from_dict(make_settings(replay_store={"url": "redis://h", "timeout": -1}))


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param({"url": "redis://user:hunter2@h:bad/0"}, id="userinfo"),
        pytest.param({"url": "unix:///r.sock?password=hunter2&db=x"}, id="query"),
        pytest.param({"url": "redis2://:hunter2@h"}, id="unknown-scheme"),
        pytest.param(
            {"url": "redis://m", "sentinels": ["h:1"], "sentinel_password": ["hunter2"]},
            id="sentinel",
        ),
    ],
)
def test_passwords_never_appear_in_errors(setting: dict[str, Any]) -> None:
    assert "hunter2" not in refused(setting)


def test_passwords_never_appear_in_the_settings_repr(
    make_settings: Callable[..., dict[str, Any]],
) -> None:
    url = "redis://admin:hunter2@cache:6379/0?password=hunter2"
    settings = Settings.from_dict(make_settings(replay_store={"url": url}))
    assert "hunter2" not in repr(settings)
    assert "cache:6379" in repr(settings.replay_store)
    assert redact_url(url) == "redis://admin:***@cache:6379/0?password=***"


def test_importing_the_package_or_a_memory_store_does_not_import_redis() -> None:
    code = (
        "import sys, dpop_middleware\n"
        "from dpop_middleware.replay import create_sync_store, validate_replay_store_setting\n"
        "create_sync_store(validate_replay_store_setting('memory://'))\n"
        "assert 'redis' not in sys.modules, 'redis was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
