"""50 copies of one request at once: exactly one passes (RFC 9449 section 11.1).

ASGI: 50 concurrent requests on one event loop, async Redis store. WSGI: 50 threads released
together by a barrier, sync Redis store. Both send the same token and the same proof.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from conftest import API

from dpop_middleware import DPoPMiddleware, DPoPWSGIMiddleware
from dpop_middleware.testing import DPoPKey, TokenIssuer

COPIES = 50


async def asgi_ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_ok(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def dpop_headers(issuer: TokenIssuer, key: DPoPKey) -> dict[str, str]:
    token = issuer.token(bound_to=key)
    return {
        "Authorization": f"DPoP {token}",
        "DPoP": key.proof("GET", f"{API}/items", access_token=token),
    }


def assert_exactly_one_passed(responses: list[httpx.Response]) -> None:
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [401] * (COPIES - 1)
    for refused in (r for r in responses if r.status_code == 401):
        assert refused.json()["error"] == "invalid_dpop_proof"
        assert 'error="invalid_dpop_proof"' in refused.headers["www-authenticate"]


def test_asgi_concurrent_copies_of_one_proof(
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    redis_url: str,
    key_prefix: str,
) -> None:
    app = DPoPMiddleware(
        asgi_ok, make_settings(replay_store={"url": redis_url, "key_prefix": key_prefix})
    )
    headers = dpop_headers(issuer, dpop_key)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=API) as client:
            try:
                return list(
                    await asyncio.gather(
                        *(client.get("/items", headers=headers) for _ in range(COPIES))
                    )
                )
            finally:
                await app.store.aclose()

    assert_exactly_one_passed(asyncio.run(run()))


def test_wsgi_concurrent_copies_of_one_proof_from_threads(
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    redis_url: str,
    key_prefix: str,
) -> None:
    app = DPoPWSGIMiddleware(
        wsgi_ok, make_settings(replay_store={"url": redis_url, "key_prefix": key_prefix})
    )
    headers = dpop_headers(issuer, dpop_key)
    barrier = threading.Barrier(COPIES)

    def one() -> httpx.Response:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=API) as client:
            barrier.wait(timeout=10)
            return client.get("/items", headers=headers)

    with ThreadPoolExecutor(max_workers=COPIES) as pool:
        responses = list(pool.map(lambda _: one(), range(COPIES)))
    app.store.close()
    assert_exactly_one_passed(responses)
