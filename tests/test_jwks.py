"""The issuer's JWK Set over a real loopback HTTP server that misbehaves on purpose: malformed and
hostile documents, bad keys beside good ones, empty sets, slow-drip answers, key rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from conftest import API, FrozenClock
from core_helpers import Answer, Harness

from dpop_middleware import DPoPMiddleware, DPoPWSGIMiddleware
from dpop_middleware.testing import DPoPKey, TokenIssuer

URL = API + "/items"


class JWKSEndpoint:
    """A loopback HTTP server answering GET with ``body`` (bytes, or a dict sent as JSON).

    ``drip``: seconds between single bytes of the body (a slow-drip endpoint); ``status``: the
    HTTP status. ``hits`` counts requests."""

    def __init__(self, body: dict[str, Any] | bytes) -> None:
        self.body = body
        self.status = 200
        self.drip = 0.0
        self.hits = 0
        self.closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                body = outer.body
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                if not outer.drip:
                    self.wfile.write(data)
                    return
                self.wfile.flush()
                stop = time.monotonic() + 8  # bounded, so old code fails the test, not hangs it
                for i in range(len(data)):
                    if outer.closing.wait(outer.drip) or time.monotonic() > stop:
                        return
                    try:
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(issuer: TokenIssuer) -> Iterator[JWKSEndpoint]:
    server = JWKSEndpoint(issuer.jwks)
    yield server
    server.close()


def uri_settings(issuer: TokenIssuer, clock: FrozenClock, url: str, **extra: Any) -> dict[str, Any]:
    return {
        "issuer": issuer.issuer,
        "audience": issuer.audience,
        "jwks_uri": url,
        "clock": clock,
        **extra,
    }


def call(h: Harness, issuer: TokenIssuer, key: DPoPKey, **token_kw: Any) -> Answer:
    return h.dpop(key, issuer.token(bound_to=key, **token_kw), "GET", URL)


def expect(answer: Answer, status: int, error: str | None, reason: str | None) -> None:
    assert (answer.status, answer.error, answer.reason) == (status, error, reason)


# -- issue 11 item 8: hostile documents, bad keys ------------------------------------------------


def test_deeply_nested_jwk_set_is_a_failed_fetch(
    endpoint: JWKSEndpoint,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50,000 levels of nesting: a 503 (not a RecursionError), recorded as a failed fetch, so
    the refetch rate limit holds."""
    endpoint.body = b'{"keys":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    h = Harness(uri_settings(issuer, clock, endpoint.url))
    for _ in range(3):
        expect(call(h, issuer, dpop_key), 503, "temporarily_unavailable", "jwks_unavailable")
    assert endpoint.hits == 1
    assert "dpop jwks_fetch_failed" in caplog.text
    endpoint.body = issuer.jwks
    clock.advance(60)
    expect(call(h, issuer, dpop_key), 200, None, None)


def test_bad_keys_are_skipped_and_logged_good_ones_kept(
    endpoint: JWKSEndpoint,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 7517 section 5: one bad key does not spoil the set."""
    good = issuer.jwks["keys"][0]
    no_crv = {k: v for k, v in good.items() if k != "crv"} | {"kid": "no-crv"}
    endpoint.body = {
        "keys": [
            no_crv,
            {"kty": "RSA", "kid": "n-number", "n": 12345, "e": "AQAB"},
            {**good, "kid": "leaky", "d": "c2VjcmV0"},
            "not an object",
            good,
        ]
    }
    caplog.set_level(logging.WARNING, logger="dpop_middleware")
    h = Harness(uri_settings(issuer, clock, endpoint.url))
    expect(call(h, issuer, dpop_key), 200, None, None)
    expect(call(h, issuer, dpop_key, header={"kid": "no-crv"}), 401, "invalid_token", "unknown_kid")
    lines = [r.getMessage() for r in caplog.records if "jwks_key_skipped" in r.getMessage()]
    assert len(lines) == 4
    assert "kid='no-crv': malformed: 'crv' is required" in lines[0]
    assert "kid='n-number': malformed:" in lines[1] and "'n' must be a str" in lines[1]
    assert "kid='leaky': has private key members" in lines[2]
    assert "kid=-: not a JSON object" in lines[3]
    assert good["x"] not in caplog.text and "c2VjcmV0" not in caplog.text


def test_bad_key_in_the_jwks_setting_is_skipped_and_logged(
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = issuer.jwks["keys"][0]
    settings = issuer.settings(clock=clock)
    settings["jwks"] = {"keys": [{"kty": "EC", "kid": "bad", "crv": "P-256"}, good]}
    h = Harness(settings)
    expect(call(h, issuer, dpop_key), 200, None, None)
    assert "dpop jwks_key_skipped uri=<jwks setting> kid='bad': malformed:" in caplog.text


# -- issue 12 item 3: a total deadline on the fetch ----------------------------------------------


async def asgi_ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_ok(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


def _headers(issuer: TokenIssuer, key: DPoPKey) -> dict[str, str]:
    token = issuer.token(bound_to=key)
    proof = key.proof("GET", URL, access_token=token, iat=issuer.clock())
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


def _assert_jwks_503(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == "temporarily_unavailable"


DRIP_TIMEOUT = 2.0


@pytest.fixture
def drip(endpoint: JWKSEndpoint) -> JWKSEndpoint:
    """One byte every 1.5 s: each read is well inside a 2 s socket timeout, the whole never is."""
    endpoint.drip = 1.5
    return endpoint


def test_asgi_slow_drip_jwks_ends_at_the_deadline(
    drip: JWKSEndpoint,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = uri_settings(issuer, clock, drip.url, jwks_fetch_timeout=DRIP_TIMEOUT)
    app = DPoPMiddleware(asgi_ok, settings)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=API) as client:
            # Three requests wait on the one fetch; all are answered at its deadline.
            return await asyncio.gather(
                *(client.get("/items", headers=_headers(issuer, dpop_key)) for _ in range(3))
            )

    started = time.monotonic()
    responses = asyncio.run(run())
    elapsed = time.monotonic() - started
    for response in responses:
        _assert_jwks_503(response)
    assert elapsed < DRIP_TIMEOUT + 1.0
    assert drip.hits == 1
    assert f"no complete answer within {DRIP_TIMEOUT:g} s" in caplog.text


def test_wsgi_slow_drip_jwks_ends_at_the_deadline(
    drip: JWKSEndpoint,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = uri_settings(issuer, clock, drip.url, jwks_fetch_timeout=DRIP_TIMEOUT)
    app = DPoPWSGIMiddleware(wsgi_ok, settings)
    responses: list[httpx.Response] = []

    def one() -> None:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=API) as client:
            responses.append(client.get("/items", headers=_headers(issuer, dpop_key)))

    started = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    assert len(responses) == 3
    for response in responses:
        _assert_jwks_503(response)
    assert elapsed < DRIP_TIMEOUT + 1.0
    assert drip.hits == 1
    assert f"no complete answer within {DRIP_TIMEOUT:g} s" in caplog.text


# -- issue 12 item 4: a set with no usable key is a failed fetch ---------------------------------


@pytest.mark.parametrize(
    "useless",
    [
        pytest.param({"keys": []}, id="empty"),
        pytest.param({"keys": [{"kty": "EC", "kid": "k", "crv": "P-256"}]}, id="only-bad-keys"),
        pytest.param({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, id="only-symmetric"),
    ],
)
def test_useless_jwk_set_keeps_the_last_good_one_and_backs_off(
    endpoint: JWKSEndpoint,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
    useless: dict[str, Any],
) -> None:
    h = Harness(uri_settings(issuer, clock, endpoint.url, jwks_cache_ttl=300))
    expect(call(h, issuer, dpop_key), 200, None, None)
    assert endpoint.hits == 1

    endpoint.body = useless
    clock.advance(301)  # the set is due for refresh; the endpoint now answers a useless set
    expect(call(h, issuer, dpop_key), 200, None, None)  # the last good set is kept
    assert endpoint.hits == 2
    assert "dpop jwks_invalid uri=" in caplog.text
    assert "the JWK Set holds no usable signing key; keeping the last good JWK Set" in caplog.text
    expect(call(h, issuer, dpop_key, header={"kid": "new"}), 401, "invalid_token", "unknown_kid")

    # Back-off: 5 s, then 10 s, then 20 s between attempts while it stays useless.
    for wait, fetched in ((4, 2), (1, 3), (9, 3), (1, 4), (19, 4), (1, 5)):
        clock.advance(wait)
        expect(call(h, issuer, dpop_key), 200, None, None)
        assert endpoint.hits == fetched, (wait, fetched)

    endpoint.body = issuer.jwks  # fixed: picked up at the next attempt, and the back-off resets
    clock.advance(40)
    expect(call(h, issuer, dpop_key), 200, None, None)
    assert endpoint.hits == 6
    keys = h.engine.verifier.keys
    assert keys is not None and keys.failures == 0


def test_useless_first_jwk_set_is_a_503(
    endpoint: JWKSEndpoint, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    endpoint.body = {"keys": []}
    h = Harness(uri_settings(issuer, clock, endpoint.url))
    expect(call(h, issuer, dpop_key), 503, "temporarily_unavailable", "jwks_unavailable")
    endpoint.body = issuer.jwks
    clock.advance(5)
    expect(call(h, issuer, dpop_key), 200, None, None)


def test_jwks_setting_without_a_usable_key_stops_start_up(issuer: TokenIssuer) -> None:
    from dpop_middleware import ConfigurationError

    settings = issuer.settings(jwks={"keys": [{"kty": "EC", "kid": "k1", "crv": "P-256"}]})
    with pytest.raises(ConfigurationError, match=r"no usable signing key .*kid 'k1': malformed"):
        Harness(settings)


# -- issue 11 item 9: no cached token outlives the key that verified it ---------------------------


def test_cached_token_of_a_retired_key_is_refused_after_the_refresh_time(
    endpoint: JWKSEndpoint, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    other = TokenIssuer(audience=API, kid="k2", clock=clock)
    endpoint.body = {"keys": issuer.jwks["keys"] + other.jwks["keys"]}
    h = Harness(uri_settings(issuer, clock, endpoint.url, jwks_cache_ttl=300))
    old = issuer.token(bound_to=dpop_key, lifetime=3600)
    new = other.token(bound_to=dpop_key, lifetime=3600)
    for token in (old, new, old, new):  # both verified, then served from the cache
        expect(h.dpop(dpop_key, token, "GET", URL), 200, None, None)
    assert endpoint.hits == 1

    endpoint.body = other.jwks  # the issuer retires its first key
    clock.advance(299)
    expect(h.dpop(dpop_key, old, "GET", URL), 200, None, None)  # within the cache TTL
    assert endpoint.hits == 1
    clock.advance(2)
    # The same Authorization value, a cache hit until now: the set is due, so it is refetched.
    expect(h.dpop(dpop_key, old, "GET", URL), 401, "invalid_token", "unknown_kid")
    assert endpoint.hits == 2
    expect(h.dpop(dpop_key, new, "GET", URL), 200, None, None)
    assert endpoint.hits == 2


def test_an_unchanged_set_keeps_the_token_cache(
    endpoint: JWKSEndpoint, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    h = Harness(uri_settings(issuer, clock, endpoint.url, jwks_cache_ttl=300))
    token = issuer.token(bound_to=dpop_key, lifetime=3600)
    expect(h.dpop(dpop_key, token, "GET", URL), 200, None, None)
    tokens = h.engine.verifier._tokens
    keys = tokens.keys
    assert keys is not None
    version = keys.version
    clock.advance(301)
    expect(h.dpop(dpop_key, token, "GET", URL), 200, None, None)
    assert endpoint.hits == 2
    assert keys.version == version  # refetched, same keys: cached entries stay valid
    assert tokens.cached(f"DPoP {token}", clock.now) is not None


# -- issue 12 item 5: key rotation with the default settings --------------------------------------


def test_new_kid_is_accepted_within_5_s_of_first_use(
    endpoint: JWKSEndpoint, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    h = Harness(uri_settings(issuer, clock, endpoint.url))
    expect(call(h, issuer, dpop_key), 200, None, None)
    rotated = TokenIssuer(audience=API, kid="k2", clock=clock)
    endpoint.body = {"keys": issuer.jwks["keys"] + rotated.jwks["keys"]}
    clock.advance(2)  # first used 2 s after the last fetch: refused until 5 s have passed
    expect(call(h, rotated, dpop_key), 401, "invalid_token", "unknown_kid")
    clock.advance(2.9)
    expect(call(h, rotated, dpop_key), 401, "invalid_token", "unknown_kid")
    assert endpoint.hits == 1
    clock.advance(0.1)
    expect(call(h, rotated, dpop_key), 200, None, None)
    assert endpoint.hits == 2

    third = TokenIssuer(audience=API, kid="k3", clock=clock)
    endpoint.body = {"keys": rotated.jwks["keys"] + third.jwks["keys"]}
    clock.advance(60)  # first used long after the last fetch: accepted at once
    expect(call(h, third, dpop_key), 200, None, None)
    assert endpoint.hits == 3


def test_unknown_kid_flood_costs_a_bounded_number_of_fetches(
    endpoint: JWKSEndpoint, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    h = Harness(uri_settings(issuer, clock, endpoint.url))
    expect(call(h, issuer, dpop_key), 200, None, None)
    clock.advance(10)
    fetches_at = []
    for i in range(400):  # 4 bogus kids a second for 100 s, then the rest of a quiet 5 minutes
        hits = endpoint.hits
        expect(call(h, issuer, dpop_key, header={"kid": f"bogus-{i}"}), 401, "invalid_token",
               "unknown_kid")  # fmt: skip
        if endpoint.hits != hits:
            fetches_at.append(i / 4)
        clock.advance(0.25)
    # 5 s, 10 s, 20 s, 40 s, then one a minute.
    assert fetches_at == [0, 5, 15, 35, 75]
    # The flood over, a real new key: within a minute of the last fetch (the back-off cap)...
    rotated = TokenIssuer(audience=API, kid="k2", clock=clock)
    endpoint.body = {"keys": issuer.jwks["keys"] + rotated.jwks["keys"]}
    clock.advance(60 - 25)  # 60 s after the fetch at 75 s (now at 100 s)
    expect(call(h, rotated, dpop_key), 200, None, None)
    # ... and a set that changed resets the back-off.
    keys = h.engine.verifier.keys
    assert keys is not None and keys.fruitless == 0


def test_removed_kid_is_refused_within_5_minutes_by_default(
    endpoint: JWKSEndpoint, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    rotated = TokenIssuer(audience=API, kid="k2", clock=clock)
    endpoint.body = {"keys": issuer.jwks["keys"] + rotated.jwks["keys"]}
    h = Harness(uri_settings(issuer, clock, endpoint.url))  # default jwks_cache_ttl
    token = issuer.token(bound_to=dpop_key, lifetime=3600)
    expect(h.dpop(dpop_key, token, "GET", URL), 200, None, None)
    endpoint.body = rotated.jwks  # the first key is removed
    clock.advance(299)
    expect(h.dpop(dpop_key, token, "GET", URL), 200, None, None)
    clock.advance(1)
    expect(h.dpop(dpop_key, token, "GET", URL), 401, "invalid_token", "unknown_kid")


def test_a_set_not_refreshed_for_longer_than_jwks_max_stale_is_no_longer_trusted(
    endpoint: JWKSEndpoint, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    """Found by review: while the JWKS endpoint failed, the last good set was used forever, a
    key the issuer removed meanwhile included. It is kept for jwks_max_stale past the refresh
    time (availability), then every token gets 503 until a fetch succeeds (fail closed)."""
    h = Harness(uri_settings(issuer, clock, endpoint.url, jwks_cache_ttl=300, jwks_max_stale=600))
    expect(call(h, issuer, dpop_key), 200, None, None)
    endpoint.status = 500
    clock.advance(300 + 599)
    expect(call(h, issuer, dpop_key), 200, None, None)  # stale, still within the bound
    clock.advance(1)
    expect(call(h, issuer, dpop_key), 503, "temporarily_unavailable", "jwks_unavailable")
    endpoint.status = 200
    clock.advance(60)  # past the back-off: the next request fetches, and passes
    expect(call(h, issuer, dpop_key), 200, None, None)

