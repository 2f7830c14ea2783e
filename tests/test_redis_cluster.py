"""Redis Cluster: keys spread over slots and masters (no hash tag, no hot slot), and an
application's own cluster clients work. The contract suite also runs on this cluster
(``tests/test_replay_contract.py``, ids ``cluster-*``)."""

from __future__ import annotations

import asyncio
import os

import redis
import redis.asyncio.cluster
import redis.cluster

from dpop_middleware.replay import (
    create_async_store,
    create_sync_store,
    validate_replay_store_setting,
)


def test_keys_spread_over_slots_and_masters(redis_cluster_url: str, key_prefix: str) -> None:
    store = create_sync_store(
        validate_replay_store_setting(
            {"url": redis_cluster_url, "cluster": True, "key_prefix": key_prefix}
        )
    )
    keys = [os.urandom(32) for _ in range(30)]
    assert all(store.add(key, 30) for key in keys)
    store.close()

    names = [f"{key_prefix}{key.hex()}" for key in keys]
    slots = {redis.cluster.key_slot(name.encode()) for name in names}
    assert len(slots) > 1
    admin = redis.cluster.RedisCluster.from_url(redis_cluster_url)
    try:
        masters = admin.get_primaries()
        assert len(masters) == 3
        per_master = []
        for node in masters:
            client = admin.get_redis_connection(node)
            per_master.append(sum(1 for _ in client.scan_iter(match=f"{key_prefix}*", count=1000)))
        assert sum(per_master) == len(keys)
        assert sum(1 for count in per_master if count) > 1
    finally:
        admin.close()


def test_an_application_cluster_client(redis_cluster_url: str, key_prefix: str) -> None:
    client = redis.cluster.RedisCluster.from_url(redis_cluster_url)
    store = create_sync_store(
        validate_replay_store_setting({"client": client, "key_prefix": key_prefix})
    )
    key = os.urandom(32)
    assert store.add(key, 30) is True
    assert store.add(key, 30) is False
    client.close()

    async def run() -> tuple[bool, bool]:
        aclient = redis.asyncio.cluster.RedisCluster.from_url(redis_cluster_url)
        astore = create_async_store(
            validate_replay_store_setting({"client": aclient, "key_prefix": key_prefix})
        )
        try:
            return await astore.add(key, 30), await astore.add(os.urandom(32), 30)
        finally:
            await aclient.aclose()

    assert asyncio.run(run()) == (False, True)  # the sync store's key is seen by the async one
