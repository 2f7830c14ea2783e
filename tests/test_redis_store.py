"""The Redis store against a real server: the exact command, TTLs, errors, fork and loop safety,
an application's own client, Sentinel, and the start-up PING."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis_fixtures import RedisServer, SentinelSetup, free_port

from dpop_middleware.errors import ReplayStoreError
from dpop_middleware.replay import (
    create_async_store,
    create_sync_store,
    validate_replay_store_setting,
)
from dpop_middleware.replay.redis import AsyncRedisReplayStore, RedisReplayStore, px_for


def sync_store(setting: Any) -> RedisReplayStore:
    store = create_sync_store(validate_replay_store_setting(setting))
    assert isinstance(store, RedisReplayStore)
    return store


def async_store(setting: Any) -> AsyncRedisReplayStore:
    store = create_async_store(validate_replay_store_setting(setting))
    assert isinstance(store, AsyncRedisReplayStore)
    return store


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    yield client
    client.close()


@pytest.mark.parametrize(
    ("ttl", "px"),
    [
        pytest.param(71.0, 71_000, id="whole-seconds"),
        pytest.param(0.05, 50, id="float-artefact-not-rounded-up"),
        pytest.param(12.3456, 12_346, id="ceil-to-ms"),
        pytest.param(0.0004, 1, id="below-1ms"),
        pytest.param(0.0, 1, id="zero"),
        pytest.param(-3.0, 1, id="negative"),
        pytest.param(math.nan, 1, id="nan"),
    ],
)
def test_ttl_becomes_whole_milliseconds_rounded_up_never_below_1(ttl: float, px: int) -> None:
    assert px_for(ttl) == px


def test_one_atomic_set_nx_px_per_request(
    redis_url: str, key_prefix: str, admin: redis.Redis
) -> None:
    """Exactly ``SET <prefix><hex> 1 NX PX <ms>``: no read before it, no script."""
    store = sync_store({"url": redis_url, "key_prefix": key_prefix})
    first, second = os.urandom(32), os.urandom(32)
    end = f"{key_prefix}end"
    seen: list[str] = []
    with admin.monitor() as monitor:
        store.add(first, 0.0004)
        store.add(second, 71.0)
        store.add(second, 71.0)
        admin.get(end)
        while True:
            command = monitor.next_command()["command"]
            if key_prefix in command:
                if end in command:
                    break
                seen.append(command)
    store.close()
    assert seen == [
        f"SET {key_prefix}{first.hex()} 1 NX PX 1",
        f"SET {key_prefix}{second.hex()} 1 NX PX 71000",
        f"SET {key_prefix}{second.hex()} 1 NX PX 71000",
    ]


def test_key_layout_and_ttl_on_the_server(
    redis_url: str, key_prefix: str, admin: redis.Redis
) -> None:
    key = os.urandom(32)
    store = sync_store({"url": redis_url, "key_prefix": key_prefix})
    assert store.add(key, 12.3456) is True
    name = f"{key_prefix}{key.hex()}".encode()
    assert admin.get(name) == b"1"
    assert 12_000 < admin.pttl(name) <= 12_346
    store.close()


def test_async_store_sets_the_same_key(redis_url: str, key_prefix: str, admin: redis.Redis) -> None:
    key = os.urandom(32)
    store = async_store({"url": redis_url, "key_prefix": key_prefix})

    async def run() -> tuple[bool, bool]:
        try:
            return await store.add(key, 30), await store.add(key, 30)
        finally:
            await store.aclose()

    assert asyncio.run(run()) == (True, False)
    name = f"{key_prefix}{key.hex()}".encode()
    assert admin.get(name) == b"1"
    assert 29_000 < admin.pttl(name) <= 30_000


def test_unreachable_redis_raises_replay_store_error_with_the_cause(key_prefix: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    setting = {"url": url, "key_prefix": key_prefix, "timeout": 0.2}
    with pytest.raises(ReplayStoreError, match=f"127.0.0.1:{url.split(':')[2]}") as info:
        sync_store(setting).add(os.urandom(32), 10)
    assert isinstance(info.value.__cause__, redis.ConnectionError)

    async def run() -> None:
        await async_store(setting).add(os.urandom(32), 10)

    with pytest.raises(ReplayStoreError) as info:
        asyncio.run(run())
    assert isinstance(info.value.__cause__, redis.ConnectionError)


def test_a_hung_redis_times_out_within_the_timeout(
    private_redis: RedisServer, key_prefix: str
) -> None:
    setting = {"url": private_redis.url, "key_prefix": key_prefix, "timeout": 0.2}
    store, astore = sync_store(setting), async_store(setting)
    runner = asyncio.Runner()
    try:
        assert store.add(os.urandom(32), 10) is True
        assert runner.run(astore.add(os.urandom(32), 10)) is True
        private_redis.pause()
        for add in (store.add, lambda k, t: runner.run(astore.add(k, t))):
            started = time.monotonic()
            with pytest.raises(ReplayStoreError) as info:
                add(os.urandom(32), 10)
            assert isinstance(info.value.__cause__, redis.TimeoutError)
            assert time.monotonic() - started < 1.0
        private_redis.resume()
        assert store.add(os.urandom(32), 10) is True
        assert runner.run(astore.add(os.urandom(32), 10)) is True
    finally:
        private_redis.resume()
        runner.run(astore.aclose())
        runner.close()
        store.close()


def test_ping_on_startup(redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    good = {"url": redis_url, "key_prefix": key_prefix, "ping_on_startup": True}
    sync_store(good).close()
    async_store(good)
    down = {**good, "url": f"redis://127.0.0.1:{free_port()}/0", "timeout": 0.2}
    caplog.set_level(logging.INFO, logger="dpop_middleware")
    for create in (create_sync_store, create_async_store):
        with pytest.raises(
            ReplayStoreError, match=r"PING to redis://127\.0\.0\.1:\d+/0 failed at start-up"
        ):
            create(validate_replay_store_setting(down))
    assert "dpop replay_store_ping_failed backend=redis://127.0.0.1:" in caplog.text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_worker_builds_its_own_client(redis_url: str, key_prefix: str) -> None:
    store = sync_store({"url": redis_url, "key_prefix": key_prefix})
    seen = os.urandom(32)
    assert store.add(seen, 30) is True
    parent_client = store._current()
    parent_id = parent_client.client_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into pytest
        status = 1
        try:
            child_client = store._current()
            report = (
                child_client is not parent_client,
                child_client.client_id() != parent_id,
                store.add(seen, 30) is False,
                store.add(os.urandom(32), 30) is True,
            )
            os.write(write_end, repr(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        report = pipe.read()
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == "(True, True, True, True)"
    # The parent's client is untouched by the child.
    assert store._current() is parent_client
    assert store.add(os.urandom(32), 30) is True
    store.close()


def test_the_async_store_follows_the_running_event_loop(redis_url: str, key_prefix: str) -> None:
    """A client is bound to its event loop: a store used from a new loop builds a new one."""
    store = async_store({"url": redis_url, "key_prefix": key_prefix})
    key = os.urandom(32)

    async def first() -> tuple[bool, Any]:
        answer = await store.add(key, 30)
        client = store._current()
        await client.aclose()  # the old loop's client, closed here so nothing leaks
        return answer, client

    async def second() -> tuple[bool, Any]:
        try:
            return await store.add(key, 30), store._current()
        finally:
            await store.aclose()

    answer, first_client = asyncio.run(first())
    assert answer is True
    answer, second_client = asyncio.run(second())
    assert answer is False
    assert second_client is not first_client


def test_an_application_client_is_used_and_left_open(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    store = sync_store({"client": client, "key_prefix": key_prefix})
    key = os.urandom(32)
    assert store.add(key, 30) is True
    assert store.add(key, 30) is False
    store.close()
    assert client.get(f"{key_prefix}{key.hex()}") == b"1"  # still open
    client.close()

    async def run() -> None:
        aclient = redis.asyncio.Redis.from_url(redis_url)
        astore = async_store(aclient)  # a bare client: the default prefix
        akey = os.urandom(32)
        assert await astore.add(akey, 1) is True
        assert await astore.add(akey, 1) is False
        await astore.aclose()
        assert await aclient.get(f"dpop:{akey.hex()}") == b"1"
        await aclient.aclose()

    asyncio.run(run())


def test_sentinel(redis_sentinel: SentinelSetup, key_prefix: str) -> None:
    setting = {
        "url": f"redis://{redis_sentinel.service}/0",
        "sentinels": redis_sentinel.sentinels,
        "key_prefix": key_prefix,
        "ping_on_startup": True,
    }
    key, akey = os.urandom(32), os.urandom(32)
    store = sync_store(setting)
    assert store.add(key, 30) is True
    assert store.add(key, 30) is False
    store.close()

    async def run() -> tuple[bool, bool]:
        astore = async_store(setting)
        try:
            return await astore.add(akey, 30), await astore.add(akey, 30)
        finally:
            await astore.aclose()

    assert asyncio.run(run()) == (True, False)
    master = redis.Redis(port=redis_sentinel.master.port)
    assert master.exists(f"{key_prefix}{key.hex()}", f"{key_prefix}{akey.hex()}") == 2
    master.close()


def test_middleware_construction_fails_when_ping_on_startup_fails() -> None:
    """The adapters build the store at start-up, so a dead Redis stops the app from booting."""
    from dpop_middleware import DPoPMiddleware, DPoPWSGIMiddleware
    from dpop_middleware.testing import TokenIssuer

    store = {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": 0.2, "ping_on_startup": True}
    settings = TokenIssuer().settings(replay_store=store)
    for middleware in (DPoPMiddleware, DPoPWSGIMiddleware):
        with pytest.raises(ReplayStoreError, match="failed at start-up"):
            middleware(lambda *a: None, settings=settings)  # type: ignore[arg-type]


def _set_connections(url: str) -> int:
    """How many client connections of this (private) server last ran SET."""
    with redis.Redis.from_url(url) as probe:
        return sum(1 for c in probe.client_list() if c.get("cmd") == "set")


def test_concurrent_async_adds_share_one_pipelined_connection(private_redis: RedisServer) -> None:
    """64 concurrent requests: one connection, coalesced round trips, every answer right."""
    store = async_store({"url": private_redis.url, "key_prefix": "coalesce:"})
    keys = [os.urandom(32) for _ in range(64)]

    async def scenario() -> tuple[list[bool], list[bool]]:
        try:
            first = await asyncio.gather(*(store.add(k, 10) for k in keys))
            again = await asyncio.gather(*(store.add(k, 10) for k in keys))
            return list(first), list(again)
        finally:
            await store.aclose()

    runner = asyncio.Runner()
    try:
        first, again = runner.run(scenario())
    finally:
        runner.close()
    assert first == [True] * 64
    assert again == [False] * 64
    with redis.Redis.from_url(private_redis.url) as probe:
        calls = probe.info("commandstats")["cmdstat_set"]["calls"]
    assert calls == 128
    assert _set_connections(private_redis.url) == 0  # aclose() closed the one connection


def test_one_proof_twice_in_one_batch_passes_once(private_redis: RedisServer) -> None:
    store = async_store({"url": private_redis.url, "key_prefix": "dup:"})
    key = os.urandom(32)

    async def scenario() -> list[bool]:
        try:
            return list(await asyncio.gather(*(store.add(key, 10) for _ in range(10))))
        finally:
            await store.aclose()

    with asyncio.Runner() as runner:
        answers = runner.run(scenario())
    assert sorted(answers) == [False] * 9 + [True]


def test_async_store_uses_one_connection_under_concurrency(private_redis: RedisServer) -> None:
    store = async_store({"url": private_redis.url, "key_prefix": "conns:"})

    async def scenario() -> int:
        await asyncio.gather(*(store.add(os.urandom(32), 10) for _ in range(64)))
        connections = _set_connections(private_redis.url)
        await store.aclose()
        return connections

    with asyncio.Runner() as runner:
        assert runner.run(scenario()) == 1


def test_sync_store_keeps_one_connection_per_thread(private_redis: RedisServer) -> None:
    import threading

    store = sync_store({"url": private_redis.url, "key_prefix": "pinned:"})
    try:
        for _ in range(20):
            assert store.add(os.urandom(32), 10) is True
        assert _set_connections(private_redis.url) == 1
        alive = threading.Barrier(3)  # three threads alive at once: three more connections

        def add_and_wait() -> None:
            store.add(os.urandom(32), 10)
            alive.wait(5)

        threads = [threading.Thread(target=add_and_wait) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _set_connections(private_redis.url) == 4
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# the sync store's own SET NX over its pinned connection (replay.redis._set_nx_on)


def test_sync_store_error_reply_fails_closed_then_recovers(private_redis: RedisServer) -> None:
    """An error reply (here ``-OOM``) is a ReplayStoreError naming it, never a pass; the
    connection is dropped, and the next request after Redis recovers is answered again."""
    store = sync_store({"url": private_redis.url, "key_prefix": "oom:"})
    admin = redis.Redis.from_url(private_redis.url, socket_timeout=2)
    try:
        assert store.add(os.urandom(32), 10) is True
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
        with pytest.raises(ReplayStoreError, match="OOM"):
            store.add(os.urandom(32), 10)
        admin.config_set("maxmemory", "0")
        key = os.urandom(32)
        assert store.add(key, 10) is True
        assert store.add(key, 10) is False
    finally:
        admin.close()
        store.close()


class _DribblingProxy:
    """A TCP relay in front of a real Redis that sends Redis's replies one byte per packet,
    so every reply reaches the store split over many ``recv`` calls."""

    def __init__(self, upstream_port: int) -> None:
        import socket
        import threading

        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # accept() wakes up to see ``closing``
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.closing = False
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self.threads.append(accept)

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            for args in ((client, server, False), (server, client, True)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pump(src: Any, dst: Any, dribble: bool) -> None:
        import socket

        dst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := src.recv(4096):
                if not dribble:
                    dst.sendall(data)
                    continue
                for i in range(len(data)):
                    dst.sendall(data[i : i + 1])
                    time.sleep(0.0005)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self.closing = True
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


def test_sync_store_reads_replies_split_over_many_packets(private_redis: RedisServer) -> None:
    proxy = _DribblingProxy(private_redis.port)
    store = sync_store({"url": f"redis://127.0.0.1:{proxy.port}/0", "key_prefix": "split:"})
    try:
        key = os.urandom(32)
        assert store.add(key, 10) is True  # "+OK\r\n" in five packets
        assert store.add(key, 10) is False  # "$-1\r\n" in five packets
    finally:
        store.close()
        proxy.close()
    server = redis.Redis.from_url(private_redis.url)
    try:
        assert server.pttl(b"split:" + key.hex().encode()) > 0
    finally:
        server.close()


def test_sync_store_refuses_when_redis_drops_the_connection(private_redis: RedisServer) -> None:
    """The server closed the pinned connection: ReplayStoreError, never a pass; then a new one."""
    store = sync_store({"url": private_redis.url, "key_prefix": "gone:", "timeout": 1.0})
    try:
        assert store.add(os.urandom(32), 10) is True
        admin = redis.Redis.from_url(private_redis.url)
        admin.client_kill_filter(_type="normal", skipme=True)
        admin.close()
        with pytest.raises(ReplayStoreError):
            store.add(os.urandom(32), 10)
        assert store.add(os.urandom(32), 10) is True  # a fresh connection
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# a thread's pinned connection goes back to the pool when the thread ends (review item 1)


def _pool_counts(store: RedisReplayStore) -> tuple[int, int]:
    pool: Any = store._current().connection_pool
    return len(pool._in_use_connections), len(pool._available_connections)


def test_sync_store_short_lived_threads_do_not_use_up_the_pool(
    private_redis: RedisServer,
) -> None:
    """A thread per request (werkzeug's threaded server, Django's runserver): 300 threads one
    after another, one add each, all pass; the pool (100 connections) never fills."""
    import gc
    import threading

    store = sync_store({"url": private_redis.url, "key_prefix": "threads:"})
    answers: list[bool | str] = []

    def one() -> None:
        try:
            answers.append(store.add(os.urandom(32), 10))
        except ReplayStoreError as exc:
            answers.append(str(exc))

    try:
        for _ in range(300):
            thread = threading.Thread(target=one)
            thread.start()
            thread.join()
        gc.collect()
        assert answers == [True] * 300
        in_use, available = _pool_counts(store)
        assert in_use == 0
        assert available <= 2  # ended threads hand their connection on
        assert _set_connections(private_redis.url) <= 2
    finally:
        store.close()


def test_werkzeug_threaded_server_with_a_connection_per_request(
    private_redis: RedisServer,
    issuer: Any,
    dpop_key: Any,
    make_settings: Any,
    key_prefix: str,
) -> None:
    """A real werkzeug threaded server, a new HTTP connection (so a new thread) per request:
    the 101st and later requests pass as the first ones do."""
    import http.client
    import threading

    from werkzeug.serving import make_server

    from dpop_middleware import DPoPWSGIMiddleware

    def ok(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    settings = make_settings(
        replay_store={"url": private_redis.url, "key_prefix": key_prefix},
        public_url="https://api.example",
    )
    app = DPoPWSGIMiddleware(ok, settings)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = issuer.token(bound_to=dpop_key)
    statuses = []
    try:
        for _ in range(130):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
            proof = dpop_key.proof("GET", "https://api.example/items", access_token=token)
            conn.request("GET", "/items", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
            statuses.append(conn.getresponse().status)
            conn.close()
    finally:
        server.shutdown()
        server.server_close()
        app.store.close()
    assert statuses == [200] * 130


# --------------------------------------------------------------------------------------------
# a Sentinel that names another master than the watch announced (review item 4)


@pytest.fixture
def stale_sentinel(redis_sentinel: SentinelSetup) -> Iterator[tuple[RedisServer, int]]:
    """A second Sentinel that names another server as ``redis_sentinel``'s service: what a
    Sentinel that has not yet seen a switch does (it still names the old master, which takes
    writes in a planned failover until it is reconfigured)."""
    import subprocess

    from redis_fixtures import _answers

    old = RedisServer().start()
    port = free_port()
    config = old.dir / "sentinel.conf"
    config.write_text(
        f"bind 127.0.0.1\nport {port}\ndir {old.dir}\n"
        f"sentinel monitor {redis_sentinel.service} 127.0.0.1 {old.port} 1\n"
    )
    process = subprocess.Popen(
        [old.binary, str(config), "--sentinel", "--logfile", str(old.dir / "sentinel.log")],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers(f"redis://127.0.0.1:{port}", timeout=0.2):
            assert process.poll() is None and time.monotonic() < deadline, "no Sentinel"
            time.sleep(0.02)
        yield old, port
    finally:
        process.terminate()
        process.wait(5)
        old.cleanup()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_sentinel_store_refuses_a_master_the_watch_did_not_announce(
    redis_sentinel: SentinelSetup,
    stale_sentinel: tuple[RedisServer, int],
    key_prefix: str,
    flavour: str,
) -> None:
    """The store looks the master up through the stale Sentinel (listed first), the watch
    follows the one that knows: every write is refused (503) and none reaches the other
    server; once the stale Sentinel is gone, the store reconnects to the right master."""
    from dpop_middleware.replay.redis import _async_connect, _failover_watch, _sync_connect

    old, stale_port = stale_sentinel
    options = validate_replay_store_setting(
        {
            "url": f"redis://{redis_sentinel.service}/0",
            "sentinels": [f"127.0.0.1:{stale_port}", *redis_sentinel.sentinels],
            "key_prefix": key_prefix,
        }
    ).options
    watched = {**options, "sentinels": tuple((h, p) for h, p in options["sentinels"][1:])}
    watch = _failover_watch(watched)
    assert watch is not None
    keys = [os.urandom(32) for _ in range(3)]
    wrong = "connected to 127.0.0.1:%d, but Sentinel announced the master at 127.0.0.1:%d"
    refusal = wrong % (old.port, redis_sentinel.master.port)

    if flavour == "sync":
        store = RedisReplayStore(
            connect=_sync_connect(options), watch=watch, where="s", key_prefix=key_prefix
        )
        try:
            for key in keys[:2]:
                with pytest.raises(ReplayStoreError) as refused:
                    store.add(key, 30)
                assert str(refused.value) == f"redis SET NX failed (s): FailoverRefusal: {refusal}"
            stale_sentinel_stopper(stale_port)()
            assert store.add(keys[2], 30) is True
        finally:
            store.close()
    else:
        astore = AsyncRedisReplayStore(
            connect=_async_connect(options),
            watch=watch,
            where="s",
            timeout=0.5,
            key_prefix=key_prefix,
        )

        async def run() -> None:
            try:
                for key in keys[:2]:
                    with pytest.raises(ReplayStoreError) as refused:
                        await astore.add(key, 30)
                    assert str(refused.value) == (
                        f"redis SET NX failed (s): FailoverRefusal: {refusal}"
                    )
                stale_sentinel_stopper(stale_port)()
                assert await astore.add(keys[2], 30) is True
            finally:
                await astore.aclose()

        asyncio.run(run())

    with (
        redis.Redis(port=old.port) as other,
        redis.Redis(port=redis_sentinel.master.port) as master,
    ):
        assert other.dbsize() == 0  # nothing written to the master the watch did not announce
        assert master.exists(*(f"{key_prefix}{k.hex()}" for k in keys)) == 1


def stale_sentinel_stopper(port: int) -> Any:
    """Make the stale Sentinel forget the service (as it would once it sees the switch)."""

    def stop() -> None:
        with redis.Redis(port=port) as sentinel:
            sentinel.execute_command("SENTINEL", "REMOVE", "dpopmaster")

    return stop
