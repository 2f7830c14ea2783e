"""Fail closed: while Redis is hung or down every DPoP request gets 503 with Retry-After, none
passes unchecked; when Redis is back requests pass again, with no restart.

Each test runs its own ``redis-server`` and pauses (SIGSTOP), stops and restarts it on the same
port. ASGI with the async store, WSGI with the sync store: the same script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import pytest
from conftest import API
from redis_fixtures import RedisServer

from dpop_middleware import DPoPMiddleware, DPoPWSGIMiddleware
from dpop_middleware.testing import DPoPKey, TokenIssuer

TIMEOUT = 0.25

Send = Callable[[dict[str, str]], httpx.Response]


async def asgi_ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_ok(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == "temporarily_unavailable"
    assert "www-authenticate" not in response.headers  # not the client's fault


def outage_script(
    send: Send,
    server: RedisServer,
    issuer: TokenIssuer,
    key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = issuer.token(bound_to=key)

    def fresh() -> dict[str, str]:
        return {
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", f"{API}/items", access_token=token),
        }

    used = fresh()
    assert send(used).status_code == 200
    assert send(used).status_code == 401

    # Hung: the port accepts, nothing answers. Refused within about the timeout.
    server.pause()
    try:
        for headers in (fresh(), fresh(), used):
            started = time.monotonic()
            assert_unavailable(send(headers))
            assert time.monotonic() - started < 4 * TIMEOUT + 0.5
    finally:
        server.resume()
    assert send(fresh()).status_code == 200

    # Down: connection refused.
    server.stop()
    for headers in (fresh(), fresh(), fresh(), used):
        assert_unavailable(send(headers))

    # Back on the same port: requests pass again, and replays are caught again.
    server.start()
    again = fresh()
    assert send(again).status_code == 200
    assert send(again).status_code == 401
    assert send(fresh()).status_code == 200

    text = caplog.text
    assert "reason=replay_store_unavailable status=503" in text
    assert "cause='ReplayStoreError: redis SET NX failed" in text
    assert "dpop replay_store_down backend=redis://127.0.0.1:" in text
    assert "dpop replay_store_recovered" in text


def test_asgi_outage(
    private_redis: RedisServer,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dpop_middleware")
    store = {"url": private_redis.url, "key_prefix": key_prefix, "timeout": TIMEOUT}
    app = DPoPMiddleware(asgi_ok, make_settings(replay_store=store))
    with asyncio.Runner() as runner:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=API)

        def send(headers: dict[str, str]) -> httpx.Response:
            return runner.run(client.get("/items", headers=headers))

        try:
            outage_script(send, private_redis, issuer, dpop_key, caplog)
        finally:
            runner.run(client.aclose())
            runner.run(app.store.aclose())


def test_wsgi_outage(
    private_redis: RedisServer,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dpop_middleware")
    store = {"url": private_redis.url, "key_prefix": key_prefix, "timeout": TIMEOUT}
    app = DPoPWSGIMiddleware(wsgi_ok, make_settings(replay_store=store))
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=API) as client:
        try:
            outage_script(
                lambda headers: client.get("/items", headers=headers),
                private_redis, issuer, dpop_key, caplog,
            )  # fmt: skip
        finally:
            app.store.close()


# -- any exception from the client is a store failure (issue 12 item 2) ---------------------------


def _broken_set(response: Any, **options: Any) -> Any:
    """A SET reply callback that fails as redis-py itself did mid-failover (an AttributeError
    from inside the client, not a RedisError)."""
    raise AttributeError("'NoneType' object has no attribute 'writelines'")


def _assert_503_one_line(response: httpx.Response, caplog: pytest.LogCaptureFixture) -> None:
    assert_unavailable(response)
    refused = [r for r in caplog.records if "reason=replay_store_unavailable" in r.getMessage()]
    assert len(refused) == 1
    assert "cause=\"ReplayStoreError: redis SET NX failed" in refused[0].getMessage()
    assert "AttributeError" in refused[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)  # no traceback anywhere


def test_asgi_any_client_exception_is_a_503(
    private_redis: RedisServer,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis.asyncio

    token = issuer.token(bound_to=dpop_key)

    async def run() -> httpx.Response:
        client = redis.asyncio.Redis(port=private_redis.port, socket_timeout=TIMEOUT)
        client.set_response_callback("SET", _broken_set)
        store = {"client": client, "key_prefix": key_prefix}
        app = DPoPMiddleware(asgi_ok, make_settings(replay_store=store))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=API) as http:
            proof = dpop_key.proof("GET", f"{API}/items", access_token=token)
            response = await http.get(
                "/items", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
            )
        await client.aclose()
        return response

    _assert_503_one_line(asyncio.run(run()), caplog)


def test_wsgi_any_client_exception_is_a_503(
    private_redis: RedisServer,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis

    client = redis.Redis(port=private_redis.port, socket_timeout=TIMEOUT)
    client.set_response_callback("SET", _broken_set)
    app = DPoPWSGIMiddleware(
        wsgi_ok, make_settings(replay_store={"client": client, "key_prefix": key_prefix})
    )
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", f"{API}/items", access_token=token)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=API) as http:
        response = http.get("/items", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    client.close()
    _assert_503_one_line(response, caplog)


class _BuggyStore:
    """An application's own store object with a bug: still a 503, never a 500."""

    def add(self, key: bytes, ttl: float) -> bool:
        raise KeyError("bug")

    def close(self) -> None:
        pass


def test_a_store_object_that_raises_is_a_503(
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = DPoPWSGIMiddleware(wsgi_ok, make_settings(replay_store=_BuggyStore()))
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", f"{API}/items", access_token=token)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=API) as http:
        response = http.get("/items", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    assert_unavailable(response)
    assert "reason=replay_store_unavailable status=503" in caplog.text
    assert 'cause="KeyError: \'bug\'"' in caplog.text


# -- state-change logs are rate-limited (issue 12 item 6) -----------------------------------------


def test_a_flapping_store_logs_a_handful_of_lines(
    private_redis: RedisServer, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A failover that flaps: 20 short outages in 10 s give one down and one recovered line;
    the next outage after the quiet time is logged with the count of those not logged."""
    import os

    import redis
    from conftest import FrozenClock

    from dpop_middleware.errors import ReplayStoreError
    from dpop_middleware.replay import create_sync_store, validate_replay_store_setting

    caplog.set_level(logging.INFO, logger="dpop_middleware")
    admin = redis.Redis(port=private_redis.port)
    store = create_sync_store(
        validate_replay_store_setting(
            {"url": private_redis.url, "key_prefix": key_prefix, "timeout": TIMEOUT}
        )
    )
    clock = FrozenClock(1000.0)
    store._health.clock = clock  # type: ignore[attr-defined]

    def flap() -> None:
        # A real refusal from Redis: writes need a replica it does not have.
        admin.config_set("min-replicas-to-write", 1)
        with pytest.raises(ReplayStoreError, match="NOREPLICAS"):
            store.add(os.urandom(32), 5)
        admin.config_set("min-replicas-to-write", 0)
        assert store.add(os.urandom(32), 5) is True

    def lines(name: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if f"dpop {name}" in r.getMessage()]

    try:
        for _ in range(20):
            flap()
            clock.advance(0.5)
        assert len(lines("replay_store_down")) == 1
        assert len(lines("replay_store_recovered")) == 1
        clock.advance(30)
        flap()
        down = lines("replay_store_down")
        assert len(down) == 2
        assert down[1].endswith("(19 more short outages not logged before this line)")
        assert len(lines("replay_store_recovered")) == 2
    finally:
        admin.config_set("min-replicas-to-write", 0)
        admin.close()
        store.close()


# -- the async store never leaves a request waiting without a deadline (review items 2, 3) -------


class HungRedis:
    """A plain TCP listener that accepts connections and never answers: a hung Redis."""

    def __init__(self) -> None:
        import socket
        import threading

        self._sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._held:
            conn.close()
        self._sock.close()


@pytest.fixture
def hung_redis() -> Iterator[HungRedis]:
    server = HungRedis()
    try:
        yield server
    finally:
        server.close()


class _SwitchingWatch:
    """Stands for :class:`FailoverWatch` (no Sentinel needed): no failover under way, and
    ``epoch`` bumped by the test as ``FailoverWatch`` does on ``+switch-master``."""

    epoch = 0
    starting = False

    def refusal(self) -> str | None:
        return None

    def close(self) -> None:
        pass


def test_async_in_flight_adds_are_refused_when_the_master_changes(hung_redis: HungRedis) -> None:
    """A batch in flight when the store retires its client (a change of master) is refused at
    once with a store error (a 503), not left waiting forever."""

    from dpop_middleware.errors import ReplayStoreError
    from dpop_middleware.replay.redis import (
        AsyncRedisReplayStore,
        _async_connect,
        validate_redis_options,
    )

    options = validate_redis_options({"url": hung_redis.url, "timeout": 2.0})
    watch = _SwitchingWatch()
    store = AsyncRedisReplayStore(
        connect=_async_connect(options),
        timeout=2.0,
        watch=watch,  # type: ignore[arg-type]
        where="hung",
    )

    async def one() -> tuple[str, float]:
        started = time.monotonic()
        try:
            await asyncio.wait_for(store.add(os.urandom(32), 60), 5)
        except ReplayStoreError as exc:
            return str(exc), time.monotonic() - started
        except TimeoutError:
            return "hung", time.monotonic() - started
        return "accepted", time.monotonic() - started

    async def scenario() -> list[tuple[str, float]]:
        in_flight = [asyncio.create_task(one()) for _ in range(3)]
        await asyncio.sleep(0.2)  # the batch is sent and waits for a reply
        watch.epoch = 1  # a new master
        after = asyncio.create_task(one())  # retires the old client
        results = await asyncio.gather(*in_flight)
        after.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await after
        await store.aclose()
        return results

    results = asyncio.run(scenario())
    for message, elapsed in results:
        assert message.startswith("redis SET NX failed (hung): ConnectionError: replay store ")
        assert "master changed" in message
        assert elapsed < 1.5  # refused by the switch, well before the 2 s timeout


def test_async_in_flight_adds_are_refused_when_the_store_closes(hung_redis: HungRedis) -> None:

    from dpop_middleware.errors import ReplayStoreError
    from dpop_middleware.replay import create_async_store, validate_replay_store_setting

    store = create_async_store(
        validate_replay_store_setting({"url": hung_redis.url, "timeout": 2.0})
    )

    async def scenario() -> list[BaseException | bool]:
        adds = [asyncio.create_task(store.add(os.urandom(32), 60)) for _ in range(3)]
        await asyncio.sleep(0.2)
        await store.aclose()  # type: ignore[attr-defined]
        done, pending = await asyncio.wait(adds, timeout=1.0)
        for task in pending:
            task.cancel()
        return [t.exception() or t.result() if t in done else False for t in adds]

    results = asyncio.run(scenario())
    assert all(isinstance(r, ReplayStoreError) for r in results), results


def test_async_timeout_is_a_deadline_per_request(hung_redis: HungRedis) -> None:
    """2,000 concurrent adds against a hung Redis (8 batches of 256): every one is refused
    within about ``timeout`` of its own start, not after the batches queued before it."""
    from dpop_middleware.errors import ReplayStoreError
    from dpop_middleware.replay import create_async_store, validate_replay_store_setting

    timeout = 0.5
    store = create_async_store(
        validate_replay_store_setting({"url": hung_redis.url, "timeout": timeout})
    )

    async def one() -> tuple[str, float]:
        started = time.monotonic()
        try:
            await asyncio.wait_for(store.add(os.urandom(32), 60), 10)
        except ReplayStoreError as exc:
            return str(exc), time.monotonic() - started
        except TimeoutError:
            return "hung", time.monotonic() - started
        return "accepted", time.monotonic() - started

    async def scenario() -> list[tuple[str, float]]:
        try:
            return await asyncio.gather(*(one() for _ in range(2000)))
        finally:
            await store.aclose()  # type: ignore[attr-defined]

    results = asyncio.run(scenario())
    assert {message for message, _ in results} == {
        f"redis SET NX failed ({hung_redis.url}): TimeoutError: no reply from Redis within 0.5 s"
    }
    assert max(elapsed for _, elapsed in results) < 2 * timeout  # was 4.0 s: (N/256 + 1) x 0.5


def test_async_store_refuses_at_once_when_redis_is_overdue_and_the_queue_is_full(
    hung_redis: HungRedis,
) -> None:
    """Redis has not answered for over half the timeout and a full batch is queued: a new
    request is refused at once instead of queueing behind a deadline it cannot meet."""
    from dpop_middleware.errors import ReplayStoreError
    from dpop_middleware.replay import create_async_store, validate_replay_store_setting

    store = create_async_store(
        validate_replay_store_setting({"url": hung_redis.url, "timeout": 2.0})
    )

    async def scenario() -> tuple[str, float]:
        waiting = [asyncio.ensure_future(store.add(os.urandom(32), 60)) for _ in range(600)]
        await asyncio.sleep(1.2)  # the first batch is open for 1.2 s; 344 requests queued
        started = time.monotonic()
        try:
            await store.add(os.urandom(32), 60)
        except ReplayStoreError as exc:
            message = str(exc)
        else:
            message = "accepted"
        elapsed = time.monotonic() - started
        await asyncio.gather(*waiting, return_exceptions=True)
        await store.aclose()  # type: ignore[attr-defined]
        return message, elapsed

    message, elapsed = asyncio.run(scenario())
    assert "TimeoutError: Redis has not answered for 1." in message
    assert message.endswith(" s and 344 requests are queued")
    assert elapsed < 0.2
