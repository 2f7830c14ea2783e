"""Token sources against real HTTP servers on loopback: discovery (RFC 8414), introspection
(RFC 7662, RFC 9449 section 6.2) and ``token_verifier`` answers, sync and async.

The authorization server is the test kit's (:meth:`TokenIssuer.serve`), a real threaded HTTP
server; the middleware talks to it through the one fetch layer. No mocks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import API, FrozenClock
from core_helpers import Harness
from test_core_token import expect

from dpop_middleware import DPoPMiddleware
from dpop_middleware.testing import REMOVE, AuthorizationServer, DPoPKey, TokenIssuer

URL = API + "/items"


@pytest.fixture
def kit(clock: FrozenClock) -> TokenIssuer:
    return TokenIssuer(audience=API, clock=clock)


@pytest.fixture
def server(kit: TokenIssuer) -> Iterator[AuthorizationServer]:
    with kit.serve() as running:
        yield running


def closed_port_url(path: str = "") -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dpop_middleware"]


# -- discovery (RFC 8414) ----------------------------------------------------------------------


def test_issuer_and_audience_are_enough(
    server: AuthorizationServer, kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    h = Harness({"issuer": server.url, "audience": API, "clock": clock})
    assert h.dpop(dpop_key, kit.token(bound_to=dpop_key), "GET", URL).status == 200
    assert h.engine.verifier.keys is not None
    assert h.engine.verifier.keys.uri == server.jwks_uri


@pytest.mark.parametrize(
    "well_known",
    [
        pytest.param(("oauth-authorization-server",), id="rfc8414-path-insertion"),
        pytest.param(("openid-configuration",), id="openid-configuration"),
    ],
)
def test_discovery_for_an_issuer_with_a_path(
    kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey, well_known: tuple[str, ...]
) -> None:
    """RFC 8414 section 3.1: /.well-known/oauth-authorization-server/tenant1 for
    .../tenant1; the OpenID Connect location when that one is missing."""
    with kit.serve(path="/tenant1", well_known=well_known) as server:
        assert server.url.endswith("/tenant1")
        h = Harness({"issuer": server.url, "audience": API, "clock": clock})
        assert h.dpop(dpop_key, kit.token(bound_to=dpop_key), "GET", URL).status == 200


def test_metadata_naming_another_issuer_is_not_used(
    kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 8414 section 3.3: the issuer in the document must be identical to ours."""
    with kit.serve(metadata={"issuer": "https://evil.example"}) as server:
        h = Harness({"issuer": server.url, "audience": API, "clock": clock})
        with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
            answer = h.dpop(dpop_key, kit.token(bound_to=dpop_key), "GET", URL)
    expect(answer, "metadata_unavailable", "temporarily_unavailable", 503)
    (fetch_line,) = [m for m in refusal_lines(caplog) if "metadata_fetch_failed" in m]
    assert "'https://evil.example' is not the configured issuer" in fetch_line
    assert "RFC 8414 section 3.3" in fetch_line


def test_metadata_down_is_a_503_naming_the_cause(
    clock: FrozenClock, kit: TokenIssuer, dpop_key: DPoPKey, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness({"issuer": closed_port_url(), "audience": API, "clock": clock})
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        answer = h.dpop(dpop_key, kit.token(bound_to=dpop_key), "GET", URL)
    expect(answer, "metadata_unavailable", "temporarily_unavailable", 503)
    assert any("connection refused" in m for m in refusal_lines(caplog))


def test_a_metadata_document_given_as_jwks_uri_is_recognised(
    server: AuthorizationServer,
    kit: TokenIssuer,
    clock: FrozenClock,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = server.origin + "/.well-known/oauth-authorization-server"
    h = Harness({"issuer": server.url, "audience": API, "jwks_uri": wrong, "clock": clock})
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        answer = h.dpop(dpop_key, kit.token(bound_to=dpop_key), "GET", URL)
    expect(answer, "jwks_unavailable", "temporarily_unavailable", 503)
    (line,) = [m for m in refusal_lines(caplog) if "jwks_invalid" in m]
    assert "this is an authorization server metadata document, not a JWK Set" in line
    assert repr(server.jwks_uri) in line


def test_disjoint_dpop_algorithms_are_logged_once(
    kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey, caplog: pytest.LogCaptureFixture
) -> None:
    with kit.serve(metadata={"dpop_signing_alg_values_supported": ["RS256"]}) as server:
        settings = {"issuer": server.url, "audience": API, "clock": clock}
        h = Harness({**settings, "algorithms": ["ES256"], "jwks_cache_ttl": 1})
        with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
            for _ in range(2):
                assert h.dpop(dpop_key, kit.token(bound_to=dpop_key), "GET", URL).status == 200
                clock.advance(2)  # the metadata is fetched again
    (line,) = [m for m in refusal_lines(caplog) if "metadata_algorithms_disjoint" in m]
    assert "accepts DPoP proofs signed with RS256, the 'algorithms' setting allows ES256" in line


@pytest.mark.parametrize(
    ("claims", "reason", "detail"),
    [
        pytest.param(
            {"iss": "https://other.example"},
            "issuer_mismatch",
            " expected='{issuer}' received='https://other.example'",
            id="iss",
        ),
        pytest.param(
            {"aud": ["https://a.example", "https://b.example"]},
            "audience_mismatch",
            " expected='https://api.example' "
            'received=\'["https://a.example", "https://b.example"]\'',
            id="aud",
        ),
    ],
)
def test_mismatch_log_lines_show_expected_and_received(
    h_kit: tuple[Harness, TokenIssuer],
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
    claims: dict[str, Any],
    reason: str,
    detail: str,
) -> None:
    h, kit = h_kit
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        answer = h.dpop(dpop_key, kit.token(bound_to=dpop_key, claims=claims), "GET", URL)
    expect(answer, reason)
    (line,) = refusal_lines(caplog)
    assert line.endswith(detail.format(issuer=kit.issuer))


@pytest.fixture
def h_kit(kit: TokenIssuer, clock: FrozenClock) -> tuple[Harness, TokenIssuer]:
    return Harness(kit.settings(clock=clock)), kit


# -- introspection (RFC 7662) ------------------------------------------------------------------


def intro(server: AuthorizationServer, clock: Any, **extra: Any) -> Harness:
    return Harness(server.introspection_settings(clock=clock, **extra))


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_an_active_opaque_token_passes(
    server: AuthorizationServer,
    kit: TokenIssuer,
    clock: FrozenClock,
    dpop_key: DPoPKey,
    method: str,
) -> None:
    client = {"client_id": "client-abc", "client_secret": "secret-abc", "auth_method": method}
    h = intro(server, clock, introspection=client)
    answer = h.dpop(dpop_key, kit.opaque_token(bound_to=dpop_key), "GET", URL)
    assert answer.status == 200
    assert answer.outcome.result is not None
    assert answer.outcome.result.claims["sub"] == "user-123"
    assert answer.outcome.result.jkt == dpop_key.jkt
    assert server.introspection_requests == [("client-abc", method, "access_token")]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda k, key, other: "op_unknown", "token_inactive", id="inactive"),
        pytest.param(
            lambda k, key, other: k.opaque_token(bound_to=key, claims={"token_type": "Bearer"}),
            "token_type_mismatch",
            id="token-type-bearer",
        ),
        pytest.param(
            lambda k, key, other: k.opaque_token(claims={"token_type": "DPoP"}),
            "token_not_bound",
            id="no-cnf",
        ),
        pytest.param(
            lambda k, key, other: k.opaque_token(bound_to=other), "jkt_mismatch", id="other-jkt"
        ),
        pytest.param(
            lambda k, key, other: k.opaque_token(bound_to=key, claims={"aud": "https://x.example"}),
            "audience_mismatch",
            id="wrong-aud",
        ),
        pytest.param(
            lambda k, key, other: k.opaque_token(bound_to=key, claims={"iss": "https://x.example"}),
            "issuer_mismatch",
            id="wrong-iss",
        ),
        pytest.param(
            lambda k, key, other: k.opaque_token(bound_to=key, claims={"cnf": {"x5t#S256": "a"}}),
            "token_binding_unsupported",
            id="other-cnf",
        ),
    ],
)
def test_introspection_refusals(
    server: AuthorizationServer,
    kit: TokenIssuer,
    clock: FrozenClock,
    dpop_key: DPoPKey,
    other_key: DPoPKey,
    make: Any,
    reason: str,
) -> None:
    h = intro(server, clock)
    expect(h.dpop(dpop_key, make(kit, dpop_key, other_key), "GET", URL), reason)
    assert len(server.introspection_requests) == 1


def test_an_expired_answer_is_refused_by_our_clock(
    server: AuthorizationServer, kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    """The endpoint says active (its clock is behind); ours says exp + leeway has passed."""
    token = kit.opaque_token(bound_to=dpop_key, lifetime=60)
    ahead = FrozenClock(clock.now + 70)
    expect(intro(server, ahead).dpop(dpop_key, token, "GET", URL), "token_expired")


def test_revocation_is_seen_after_cache_ttl_and_never_past_exp(
    server: AuthorizationServer, kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    client = {"client_id": "client-abc", "client_secret": "secret-abc", "cache_ttl": 30}
    h = intro(server, clock, introspection=client)
    token = kit.opaque_token(bound_to=dpop_key, lifetime=100)
    for _ in range(5):
        assert h.dpop(dpop_key, token, "GET", URL).status == 200
    assert len(server.introspection_requests) == 1  # cache hit: one call for many requests
    kit.revoked.add(token)
    clock.advance(29)
    assert h.dpop(dpop_key, token, "GET", URL).status == 200  # cached
    clock.advance(2)
    expect(h.dpop(dpop_key, token, "GET", URL), "token_inactive")
    assert len(server.introspection_requests) == 2
    # Never past exp, whatever cache_ttl says.
    short = kit.opaque_token(bound_to=dpop_key, lifetime=10)
    h = intro(server, clock)  # cache_ttl 60
    assert h.dpop(dpop_key, short, "GET", URL).status == 200
    clock.advance(10)
    expect(h.dpop(dpop_key, short, "GET", URL), "token_inactive")  # asked again: expired
    assert len(server.introspection_requests) == 4


def test_a_bogus_token_flood_costs_one_call_per_few_seconds(
    server: AuthorizationServer, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    h = intro(server, clock)
    for _ in range(30):
        expect(h.dpop(dpop_key, "op_bogus", "GET", URL), "token_inactive")
    assert len(server.introspection_requests) == 1
    clock.advance(6)
    expect(h.dpop(dpop_key, "op_bogus", "GET", URL), "token_inactive")
    assert len(server.introspection_requests) == 2


@pytest.mark.parametrize(
    ("reply", "cause"),
    [
        pytest.param((500, "application/json", b"{}"), "HTTP 500", id="http-500"),
        pytest.param((200, "text/html", b"<html>"), "not JSON", id="html"),
        pytest.param((200, "application/json", b"{"), "not JSON (JSONDecodeError)", id="bad-json"),
        pytest.param((200, "application/json", b"[]"), "not a JSON object", id="array"),
        pytest.param(
            (200, "application/json", b'{"active": "true"}'), "no boolean 'active'", id="active"
        ),
        pytest.param(
            (200, "application/token-introspection+jwt", b"e30.e30.sig"),
            "(RFC 9701), which this middleware does not verify",
            id="rfc9701-jwt",
        ),
    ],
)
def test_garbage_answers_are_a_503(
    server: AuthorizationServer,
    kit: TokenIssuer,
    clock: FrozenClock,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
    reply: tuple[int, str, bytes],
    cause: str,
) -> None:
    server.introspection_reply = reply
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        answer = intro(server, clock).dpop(
            dpop_key, kit.opaque_token(bound_to=dpop_key), "GET", URL
        )
    expect(answer, "introspection_unavailable", "temporarily_unavailable", 503)
    (line,) = refusal_lines(caplog)
    assert f"endpoint='{server.introspection_endpoint}'" in line
    assert cause in line


def test_a_wrong_client_secret_is_a_503_naming_the_status(
    server: AuthorizationServer,
    kit: TokenIssuer,
    clock: FrozenClock,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = {"client_id": "client-abc", "client_secret": "not-the-secret"}
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        answer = intro(server, clock, introspection=client).dpop(
            dpop_key, kit.opaque_token(bound_to=dpop_key), "GET", URL
        )
    expect(answer, "introspection_unavailable", "temporarily_unavailable", 503)
    (line,) = refusal_lines(caplog)
    assert "cause='HTTP 401 (Unauthorized)'" in line
    assert "not-the-secret" not in caplog.text


def test_endpoint_down_is_a_503(
    kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = closed_port_url("/introspect")
    client = {"client_id": "c", "client_secret": "s", "endpoint": endpoint}
    h = Harness({"issuer": kit.issuer, "audience": API, "jwks": kit.jwks, "clock": clock,
                 "introspection": client})  # fmt: skip
    token = kit.opaque_token(bound_to=dpop_key)
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        expect(
            h.dpop(dpop_key, token, "GET", URL),
            "introspection_unavailable",
            "temporarily_unavailable",
            503,
        )
    assert "cause='connection refused'" in refusal_lines(caplog)[0]
    assert token not in caplog.text


def test_a_slow_endpoint_is_a_503_at_the_deadline(
    server: AuthorizationServer, kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    server.introspection_delay = 1.0
    client = {"client_id": "client-abc", "client_secret": "secret-abc", "timeout": 0.2}
    h = intro(server, clock, introspection=client)
    started = time.monotonic()
    answer = h.dpop(dpop_key, kit.opaque_token(bound_to=dpop_key), "GET", URL)
    assert time.monotonic() - started < 0.9
    expect(answer, "introspection_unavailable", "temporarily_unavailable", 503)


def test_jwts_from_our_issuer_stay_local_and_the_rest_is_introspected(
    server: AuthorizationServer, kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    h = intro(server, clock)
    assert h.dpop(dpop_key, kit.token(bound_to=dpop_key), "GET", URL).status == 200
    assert server.introspection_requests == []
    assert h.dpop(dpop_key, kit.opaque_token(bound_to=dpop_key), "GET", URL).status == 200
    assert len(server.introspection_requests) == 1
    # token_source "introspection": every token is asked about (the server knows no JWT).
    forced = intro(server, clock, token_source="introspection")
    expect(forced.dpop(dpop_key, kit.token(bound_to=dpop_key), "GET", URL), "token_inactive")


def test_opaque_tokens_from_the_token_endpoint(
    kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    """The kit's opaque-token mode, end to end: token endpoint, then introspection."""
    from dpop_middleware.client import TokenClient

    with kit.serve(opaque_tokens=True) as server:
        client = TokenClient(
            dpop_key,
            client_id="client-abc",
            client_secret="secret-abc",
            token_endpoint=server.token_endpoint,
            clock=clock,
        )
        token = client.token().access_token
        assert token.startswith("op_")
        h = intro(server, clock)
        assert h.dpop(dpop_key, token, "GET", URL).status == 200


# -- under ASGI: single flight, verifiers off the event loop ------------------------------------


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def asgi_get(app: Any, key: DPoPKey, token: str, url: str = URL) -> tuple[int, bytes]:
    parts = urlsplit(url)
    proof = key.proof("GET", url, access_token=token)
    scope = {
        "type": "http",
        "method": "GET",
        "scheme": parts.scheme,
        "path": parts.path,
        "raw_path": parts.path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", parts.netloc.encode()),
            (b"authorization", f"DPoP {token}".encode()),
            (b"dpop", proof.encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": (parts.hostname, 443),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


def test_single_flight_50_concurrent_requests_one_call(dpop_key: DPoPKey) -> None:
    kit = TokenIssuer(audience=API)
    with kit.serve() as server:
        server.introspection_delay = 0.2
        app = DPoPMiddleware(_app, server.introspection_settings())
        token = kit.opaque_token(bound_to=dpop_key)

        async def main() -> list[tuple[int, bytes]]:
            return await asyncio.gather(*(asgi_get(app, dpop_key, token) for _ in range(50)))

        answers = asyncio.run(main())
    assert [status for status, _ in answers] == [200] * 50
    assert len(server.introspection_requests) == 1


def test_endpoint_down_under_asgi_lets_nothing_pass(dpop_key: DPoPKey) -> None:
    kit = TokenIssuer(audience=API)
    client = {"client_id": "c", "client_secret": "s", "endpoint": closed_port_url("/i")}
    app = DPoPMiddleware(_app, kit.settings(introspection=client))
    token = kit.opaque_token(bound_to=dpop_key)

    async def main() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(asgi_get(app, dpop_key, token) for _ in range(10)))

    answers = asyncio.run(main())
    assert {status for status, _ in answers} == {503}
    assert all(b'"temporarily_unavailable"' in body for _, body in answers)


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_verifiers_do_not_block_the_event_loop(dpop_key: DPoPKey, kind: str) -> None:
    """20 requests with a 0.1 s verifier (each its own token): well under 1 s in all."""
    calls: list[str] = []

    async def async_verify(token: str) -> dict[str, Any]:
        calls.append(token)
        await asyncio.sleep(0.1)
        return {"active": True, "cnf": {"jkt": dpop_key.jkt}, "token_type": "DPoP"}

    def sync_verify(token: str) -> dict[str, Any]:
        calls.append(token)
        time.sleep(0.1)
        return {"active": True, "cnf": {"jkt": dpop_key.jkt}, "token_type": "DPoP"}

    verify = async_verify if kind == "async" else sync_verify
    app = DPoPMiddleware(_app, {"token_verifier": verify, "audience": API})
    tokens = [f"opaque-{i}" for i in range(20)]

    async def main() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(asgi_get(app, dpop_key, t) for t in tokens))

    started = time.monotonic()
    answers = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert [status for status, _ in answers] == [200] * 20
    assert elapsed < 0.7, elapsed
    # The same cache as introspection: asked again, no call.
    asyncio.run(asgi_get(app, dpop_key, tokens[0]))
    assert len(calls) == 20


def test_an_async_verifier_under_wsgi_runs_in_a_private_loop(
    clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    async def verify(token: str) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"active": True, "cnf": {"jkt": dpop_key.jkt}}

    h = Harness({"token_verifier": verify, "clock": clock})
    assert h.dpop(dpop_key, "opaque", "GET", URL).status == 200


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_verifier_that_raises_is_a_503_logged_at_error(
    clock: FrozenClock, dpop_key: DPoPKey, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    async def async_verify(token: str) -> dict[str, Any]:
        raise RuntimeError(f"backend said no to {token}")

    def sync_verify(token: str) -> dict[str, Any]:
        raise RuntimeError(f"backend said no to {token}")

    verify = async_verify if kind == "async" else sync_verify
    app = DPoPMiddleware(_app, {"token_verifier": verify, "audience": API})
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        status, body = asyncio.run(asgi_get(app, dpop_key, "opaque-secret-token"))
    assert status == 503
    assert b'"temporarily_unavailable"' in body
    assert b"backend" not in body
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert "reason=token_verifier_error" in record.getMessage()
    assert record.getMessage().endswith(" raised='RuntimeError'")
    assert "opaque-secret-token" not in caplog.text
    assert record.exc_info is None


def test_the_kit_answers_remove_members(kit: TokenIssuer, dpop_key: DPoPKey) -> None:
    token = kit.opaque_token(bound_to=dpop_key, claims={"aud": REMOVE})
    answer = kit.introspect(token)
    assert answer["active"] is True and "aud" not in answer
    assert answer["cnf"] == {"jkt": dpop_key.jkt} and answer["token_type"] == "DPoP"


def test_introspection_and_metadata_are_counted_in_the_metrics(
    server: AuthorizationServer, kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    """The token-sources metrics of issue 17, moved by real requests: the first request fetches
    the metadata and introspects (a cache miss), the second is answered from the cache (a hit)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    h = intro(server, clock, metrics={"registry": registry})
    token = kit.opaque_token(bound_to=dpop_key)
    assert h.dpop(dpop_key, token, "GET", URL).status == 200
    assert h.dpop(dpop_key, token, "GET", URL).status == 200

    def value(name: str, **labels: str) -> float:
        found = registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    assert value("dpop_metadata_fetch_total", result="ok") == 1
    assert value("dpop_introspection_total", result="ok") == 1
    assert value("dpop_introspection_cache_total", result="miss") == 1
    assert value("dpop_introspection_cache_total", result="hit") == 1
    assert len(server.introspection_requests) == 1


def test_a_failed_introspection_is_counted_as_an_error(
    kit: TokenIssuer, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    with kit.serve() as server:
        server.introspection_reply = (500, "application/json", b"{}")
        h = intro(server, clock, metrics={"registry": registry})
        answer = h.dpop(dpop_key, kit.opaque_token(bound_to=dpop_key), "GET", URL)
    assert (answer.status, answer.reason) == (503, "introspection_unavailable")
    assert registry.get_sample_value("dpop_introspection_total", {"result": "error"}) == 1
