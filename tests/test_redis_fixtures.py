"""The test suite writes only to a Redis it started itself, or to the one ``REDIS_URL`` names.

A developer's own Redis on 127.0.0.1:6379 (DB 0) must never receive the tests' keys: without
``REDIS_URL`` the shared ``redis_url`` is a ``redis-server`` that this pytest process started.
"""

from __future__ import annotations

import os
import subprocess
from urllib.parse import urlsplit

import redis


def parent_pid(pid: int) -> int:
    command = ["ps", "-o", "ppid=", "-p", str(pid)]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def test_the_shared_redis_is_one_this_session_started_unless_redis_url_names_one(
    redis_url: str,
) -> None:
    configured = os.environ.get("REDIS_URL")
    if configured:
        assert redis_url == configured
        return
    assert urlsplit(redis_url).hostname == "127.0.0.1"
    assert urlsplit(redis_url).port != 6379
    with redis.Redis.from_url(redis_url, socket_timeout=2) as client:
        pid = int(client.info("server")["process_id"])
    # The server answering there is a child of this very pytest process.
    assert parent_pid(pid) == os.getpid()
