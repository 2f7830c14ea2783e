"""Every framework behind the middleware, through its own test client: Starlette and FastAPI and
Django ASGI (DPoPMiddleware, Starlette's TestClient), Flask and Django WSGI (DPoPWSGIMiddleware,
werkzeug's test Client). The same requests, the same answers, in all five."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from test_frameworks_support import (
    APP_CACHE_CONTROL,
    APP_NONCE,
    ASGI_FRAMEWORKS,
    FRAMEWORKS,
    Harness,
    Resp,
    dpop_headers,
    open_harness,
)

from dpop_middleware.errors import ReplayStoreError
from dpop_middleware.testing import REMOVE, DPoPKey, TokenIssuer

ALGS = 'algs="ES256 PS256"'
EXPOSE = "WWW-Authenticate, DPoP-Nonce"
NONCE_SECRET = "x" * 32


@pytest.fixture(params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    return param


@pytest.fixture
def settings(make_settings: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def make(**extra: Any) -> dict[str, Any]:
        return make_settings(
            **{"algorithms": ["ES256", "PS256"], "exclude_paths": ["/health"], **extra}
        )

    return make


@pytest.fixture
def serve(framework: str) -> Iterator[Callable[..., Harness]]:
    """``serve(settings, **middleware_kw)`` opens the framework's app; closed after the test."""
    stack: list[Any] = []

    def open_(settings: Mapping[str, Any], **kw: Any) -> Harness:
        cm = open_harness(framework, settings, **kw)
        stack.append(cm)
        return cm.__enter__()

    yield open_
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def refusal_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dpop_middleware"]


def assert_refused(
    resp: Resp,
    status: int,
    error: str | None,
    *,
    description: str | None = None,
    challenge: str | None = None,
) -> None:
    """The refusal the middleware itself sends: JSON body, challenge, no-store, exposed headers."""
    assert resp.status == status, resp.body
    assert resp.one("content-type") == "application/json"
    body = resp.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == (error or "unauthorized")
    if description is not None:
        assert body["error_description"] == description
    assert resp.one("cache-control") == "no-store"
    assert resp.one("access-control-expose-headers") == EXPOSE
    if status == 503:
        assert resp.one("retry-after") == "1"
        assert not resp.has("www-authenticate")
        return
    www = resp.one("www-authenticate")
    if challenge is not None:
        assert www == challenge
    elif error is None:
        assert www == f"DPoP {ALGS}"
    else:
        assert www == (
            f'DPoP error="{error}", error_description="{body["error_description"]}", {ALGS}'
        )


# -- a valid request ----------------------------------------------------------------------------


def test_valid_request_reaches_the_view_with_the_claims(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = serve(settings())
    token = issuer.token(bound_to=dpop_key)
    resp = h.get("/me", dpop_headers(dpop_key, token, "GET", h.url("/me"), iat=issuer.clock()))
    assert resp.status == 200
    assert resp.seen == {
        "sub": "user-123",
        "scheme": "DPoP",
        "jkt": dpop_key.jkt,
        "scope": "read",
        "htu": "http://testserver/me",
    }
    assert not resp.has("dpop-nonce")
    assert not resp.has("www-authenticate")


def test_post_with_a_query_and_a_lower_case_scheme_passes(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = serve(settings())
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("POST", h.url("/me"), access_token=token, iat=issuer.clock())
    headers = [("authorization", f"dpop {token}"), ("dpop", proof)]
    resp = h.request("POST", "/me", headers, query="page=2")
    assert resp.status == 200
    assert resp.seen is not None and resp.seen["jkt"] == dpop_key.jkt


def test_percent_encoded_path_is_compared_as_sent(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """``/files/a%2Fb`` is not ``/files/a/b`` (RFC 3986 section 6.2.2.2 keeps %2F encoded)."""
    h = serve(settings())
    token = issuer.token(bound_to=dpop_key)
    ok = h.get(
        "/files/a%2Fb",
        dpop_headers(dpop_key, token, "GET", h.url("/files/a%2Fb"), iat=issuer.clock()),
    )
    assert ok.status == 200
    bad = h.get(
        "/files/a%2Fb",
        dpop_headers(dpop_key, token, "GET", h.url("/files/a/b"), iat=issuer.clock()),
    )
    assert_refused(
        bad, 401, "invalid_dpop_proof", description="DPoP proof htu does not match the request URI"
    )


# -- every refusal class ------------------------------------------------------------------------


@dataclass
class Ctx:
    h: Harness
    issuer: TokenIssuer
    key: DPoPKey
    other: DPoPKey

    def now(self) -> float:
        return self.issuer.clock()

    def token(self, **kw: Any) -> str:
        return self.issuer.token(**{"bound_to": self.key, **kw})

    def proof(self, method: str = "GET", path: str = "/me", **kw: Any) -> str:
        kw.setdefault("iat", self.now())
        return self.key.proof(method, self.h.url(path), **kw)

    def auth(self, token: str | None = None, **proof: Any) -> list[tuple[str, str]]:
        token = token or self.token()
        return [
            ("Authorization", f"DPoP {token}"),
            ("DPoP", self.proof(access_token=token, **proof)),
        ]


Request = tuple[list[tuple[str, str]], str]  # headers, query


def no_credentials(c: Ctx) -> Request:
    return [], ""


def basic_scheme(c: Ctx) -> Request:
    return [("Authorization", "Basic dXNlcjpwYXNz")], ""


def bearer_in_dpop_mode(c: Ctx) -> Request:
    return [("Authorization", f"Bearer {c.token()}")], ""


def proof_missing(c: Ctx) -> Request:
    return [("Authorization", f"DPoP {c.token()}")], ""


def two_dpop_headers(c: Ctx) -> Request:
    token = c.token()
    return [*c.auth(token), ("DPoP", c.proof(access_token=token))], ""


def two_authorization_headers(c: Ctx) -> Request:
    token = c.token()
    return [("Authorization", f"DPoP {token}"), *c.auth(token)], ""


def token_in_query_too(c: Ctx) -> Request:
    return c.auth(), "access_token=abc"


def htu_other_path(c: Ctx) -> Request:
    token = c.token()
    return [
        ("Authorization", f"DPoP {token}"),
        ("DPoP", c.proof(path="/other", access_token=token)),
    ], ""


def htm_mismatch(c: Ctx) -> Request:
    token = c.token()
    return [("Authorization", f"DPoP {token}"), ("DPoP", c.proof("POST", access_token=token))], ""


def ath_of_another_token(c: Ctx) -> Request:
    token = c.token()
    return [("Authorization", f"DPoP {token}"), ("DPoP", c.proof(access_token=c.token()))], ""


def proof_too_old(c: Ctx) -> Request:
    return c.auth(iat=c.now() - 3600), ""


def signed_by_another_key(c: Ctx) -> Request:
    return c.auth(c.token(bound_to=c.other)), ""


def token_not_bound(c: Ctx) -> Request:
    return c.auth(c.token(bound_to=None)), ""


def token_for_another_audience(c: Ctx) -> Request:
    return c.auth(c.token(claims={"aud": "https://other.example"})), ""


def token_expired(c: Ctx) -> Request:
    return c.auth(c.token(lifetime=-60)), ""


def host_with_path_and_query(c: Ctx) -> Request:
    token = c.token()
    proof = c.key.proof("GET", "http://evil.example/path", access_token=token, iat=c.now())
    return [("Host", "evil.example/path?"), ("Authorization", f"DPoP {token}"), ("DPoP", proof)], ""


def host_with_userinfo(c: Ctx) -> Request:
    token = c.token()
    proof = c.key.proof("GET", "http://b/me", access_token=token, iat=c.now())
    return [("Host", "a@b"), ("Authorization", f"DPoP {token}"), ("DPoP", proof)], ""


REFUSALS = [
    pytest.param(no_credentials, 401, None, "no_credentials", id="no_credentials"),
    pytest.param(basic_scheme, 401, None, "unsupported_scheme", id="basic_scheme"),
    pytest.param(bearer_in_dpop_mode, 401, "invalid_token", "bearer_not_allowed", id="bearer_in_dpop_mode"),
    pytest.param(proof_missing, 401, "invalid_dpop_proof", "proof_missing", id="proof_missing"),
    pytest.param(two_dpop_headers, 401, "invalid_dpop_proof", "multiple_proofs", id="two_dpop_headers"),
    pytest.param(two_authorization_headers, 400, "invalid_request", "multiple_auth_methods", id="two_authorization_headers"),
    pytest.param(token_in_query_too, 400, "invalid_request", "multiple_auth_methods", id="token_in_query_too"),
    pytest.param(htu_other_path, 401, "invalid_dpop_proof", "htu_mismatch", id="htu_other_path"),
    pytest.param(htm_mismatch, 401, "invalid_dpop_proof", "htm_mismatch", id="htm_mismatch"),
    pytest.param(ath_of_another_token, 401, "invalid_dpop_proof", "ath_mismatch", id="ath_of_another_token"),
    pytest.param(proof_too_old, 401, "invalid_dpop_proof", "iat_too_old", id="proof_too_old"),
    pytest.param(signed_by_another_key, 401, "invalid_token", "jkt_mismatch", id="signed_by_another_key"),
    pytest.param(token_not_bound, 401, "invalid_token", "token_not_bound", id="token_not_bound"),
    pytest.param(token_for_another_audience, 401, "invalid_token", "audience_mismatch", id="token_for_another_audience"),
    pytest.param(token_expired, 401, "invalid_token", "token_expired", id="token_expired"),
    pytest.param(host_with_path_and_query, 400, "invalid_request", "invalid_host", id="host_with_path_and_query"),
    pytest.param(host_with_userinfo, 400, "invalid_request", "invalid_host", id="host_with_userinfo"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "status", "error", "reason"), REFUSALS)
def test_refusal(
    serve: Callable[..., Harness],
    settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    other_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
    build: Callable[[Ctx], Request],
    status: int,
    error: str | None,
    reason: str,
) -> None:
    h = serve(settings())
    headers, query = build(Ctx(h, issuer, dpop_key, other_key))
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        resp = h.get("/me", headers, query=query)
    assert_refused(resp, status, error)
    assert not resp.has("dpop-nonce")
    # Exactly one log line per refusal, with its stable reason code.
    (line,) = refusal_log(caplog)
    assert line.startswith(f"dpop refused reason={reason} status={status} ")


def test_replayed_proof_is_refused(
    serve: Callable[..., Harness],
    settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = serve(settings())
    headers = dpop_headers(
        dpop_key, issuer.token(bound_to=dpop_key), "GET", h.url("/me"), iat=issuer.clock()
    )
    assert h.get("/me", headers).status == 200
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        resp = h.get("/me", headers)
    assert_refused(resp, 401, "invalid_dpop_proof", description="DPoP proof has already been used")
    assert "reason=replayed" in refusal_log(caplog)[0]


class FailingStore:
    def add(self, key: bytes, ttl: float) -> bool:
        raise ReplayStoreError("connection refused")

    def close(self) -> None:
        pass


class AsyncFailingStore:
    async def add(self, key: bytes, ttl: float) -> bool:
        raise ReplayStoreError("connection refused")

    async def aclose(self) -> None:
        pass


def test_replay_store_down_fails_closed_with_503(
    framework: str,
    serve: Callable[..., Harness],
    settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    store = AsyncFailingStore() if framework in ASGI_FRAMEWORKS else FailingStore()
    h = serve(settings(), store=store)
    headers = dpop_headers(
        dpop_key, issuer.token(bound_to=dpop_key), "GET", h.url("/me"), iat=issuer.clock()
    )
    resp = h.get("/me", headers)
    assert_refused(
        resp,
        503,
        "temporarily_unavailable",
        description="Replay protection is temporarily unavailable",
    )


def test_htu_mismatch_log_shows_expected_and_received_but_the_response_does_not(
    serve: Callable[..., Harness],
    settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = serve(settings())
    token = issuer.token(bound_to=dpop_key)
    headers = dpop_headers(
        dpop_key, token, "GET", "https://elsewhere.example/x", iat=issuer.clock()
    )
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        resp = h.get("/me", headers)
    assert_refused(
        resp, 401, "invalid_dpop_proof", description="DPoP proof htu does not match the request URI"
    )
    (line,) = refusal_log(caplog)
    assert line.endswith(
        "expected_htu='http://testserver/me' received_htu='https://elsewhere.example/x'"
    )
    everything = resp.body.decode() + " ".join(v for _, v in resp.headers)
    assert "elsewhere" not in everything and "testserver" not in everything


# -- required_scopes: the settings-level rules, no framework code -------------------------------

SCOPE_RULES = [
    {"path": "/me", "methods": ["POST"], "scopes": ["write"]},
    {"path": "/files/both", "scopes": ["read", "write"]},
    {"path": "/files/admin", "scopes": ["admin"]},
]
NO_SCOPE = "The access token does not have the scope this request needs"


def insufficient(scope: str, scheme: str = "DPoP") -> str:
    err = f'error="insufficient_scope", error_description="{NO_SCOPE}", scope="{scope}"'
    if scheme == "Bearer":
        return f"Bearer {err}, DPoP {ALGS}"
    return f"DPoP {err}, {ALGS}"


def test_required_scopes_read_passes_write_is_403(
    serve: Callable[..., Harness],
    settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = serve(settings(required_scopes=SCOPE_RULES))
    token = issuer.token(bound_to=dpop_key)  # scope "read"
    read = h.get("/me", dpop_headers(dpop_key, token, "GET", h.url("/me"), iat=issuer.clock()))
    assert read.status == 200
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        write = h.request(
            "POST", "/me", dpop_headers(dpop_key, token, "POST", h.url("/me"), iat=issuer.clock())
        )
    assert_refused(write, 403, "insufficient_scope", challenge=insufficient("write"))
    assert write.json()["error_description"] == NO_SCOPE
    (line,) = refusal_log(caplog)
    assert line.startswith("dpop refused reason=insufficient_scope status=403 ")


@pytest.mark.parametrize(
    ("path", "claims", "status", "scope"),
    [
        pytest.param("/files/both", {"scope": "read"}, 403, "read write", id="two-needed-one-held"),
        pytest.param("/files/both", {"scope": "write read"}, 200, "", id="two-needed-both-held"),
        pytest.param("/files/administrator", {}, 200, "", id="not-a-whole-segment"),
        pytest.param("/files/admin/x", {}, 403, "admin", id="below-the-rule"),
        pytest.param("/files/admin", {"scope": REMOVE, "scp": ["admin"]}, 200, "", id="scp-list"),
        pytest.param("/files/admin", {"scope": REMOVE}, 403, "admin", id="no-scope-claim"),
        pytest.param("/files/admin", {"scope": ["admin"]}, 403, "admin", id="malformed-scope"),
    ],
)
def test_required_scopes_rules(
    serve: Callable[..., Harness],
    settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    path: str,
    claims: dict[str, Any],
    status: int,
    scope: str,
) -> None:
    h = serve(settings(required_scopes=SCOPE_RULES))
    token = issuer.token(bound_to=dpop_key, claims=claims)
    resp = h.get(path, dpop_headers(dpop_key, token, "GET", h.url(path), iat=issuer.clock()))
    if status == 200:
        assert resp.status == 200, resp.body
        assert resp.seen is not None
    else:
        assert_refused(resp, 403, "insufficient_scope", challenge=insufficient(scope))


def test_required_scopes_bearer_error_on_the_bearer_challenge(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer
) -> None:
    h = serve(settings(mode="dpop_or_bearer", required_scopes=SCOPE_RULES))
    resp = h.request("POST", "/me", [("Authorization", f"Bearer {issuer.token()}")])
    assert_refused(resp, 403, "insufficient_scope", challenge=insufficient("write", "Bearer"))
    ok = h.request(
        "POST", "/me", [("Authorization", f"Bearer {issuer.token(claims={'scope': 'write'})}")]
    )
    assert ok.status == 200


# -- what passes through ------------------------------------------------------------------------


def test_excluded_path_and_passed_preflight_reach_the_app_without_credentials(
    serve: Callable[..., Harness], settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = serve(settings(cors_preflight="pass"))
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        health = h.get("/health")
        preflight = h.request(
            "OPTIONS",
            "/me",
            [("Origin", "https://app.example"), ("Access-Control-Request-Method", "GET")],
        )
    assert health.status == 200
    assert health.json() == {"ok": True}
    assert preflight.status == 204
    assert preflight.one("x-app") == "preflight"
    assert not preflight.has("www-authenticate")
    assert refusal_log(caplog) == []


def test_preflight_is_verified_by_default(serve: Callable[..., Harness], settings: Any) -> None:
    h = serve(settings())
    preflight = h.request(
        "OPTIONS",
        "/me",
        [("Origin", "https://app.example"), ("Access-Control-Request-Method", "GET")],
    )
    assert_refused(preflight, 401, None)
    assert not preflight.has("x-app")


def test_exclusion_is_by_whole_segments(serve: Callable[..., Harness], settings: Any) -> None:
    h = serve(settings(exclude_paths=["/health", "/me/open"]))
    assert_refused(h.get("/healthx"), 401, None)
    assert_refused(h.get("/me"), 401, None)
    assert_refused(h.get("/files/health"), 401, None)


# -- server nonces -----------------------------------------------------------------------------


def test_nonce_required_gets_use_dpop_nonce_then_passes_with_it(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = serve(settings(nonce={"secret": NONCE_SECRET}))
    token = issuer.token(bound_to=dpop_key)
    first = h.get("/me", dpop_headers(dpop_key, token, "GET", h.url("/me"), iat=issuer.clock()))
    assert_refused(
        first, 401, "use_dpop_nonce", description="Resource server requires nonce in DPoP proof"
    )
    nonce = first.one("dpop-nonce")
    ok = h.get("/me", dpop_headers(dpop_key, token, "GET", h.url("/me"), nonce=nonce))
    assert ok.status == 200
    assert ok.seen is not None and ok.seen["jkt"] == dpop_key.jkt
    # The client's nonce is the current one: nothing to add.
    assert not ok.has("dpop-nonce")
    assert not ok.has("cache-control")


def test_success_with_a_stale_nonce_carries_exactly_one_fresh_nonce_and_no_store(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey, clock: Any
) -> None:
    h = serve(settings(nonce={"secret": NONCE_SECRET, "lifetime": 60}))
    token = issuer.token(bound_to=dpop_key)
    nonce = h.get("/me", dpop_headers(dpop_key, token, "GET", h.url("/me"))).one("dpop-nonce")
    clock.advance(60)  # the next step: the old nonce is still accepted, but not current
    for path in ("/me", "/cached"):
        resp = h.get(path, dpop_headers(dpop_key, token, "GET", h.url(path), nonce=nonce))
        assert resp.status == 200
        assert resp.seen is not None
        fresh = resp.one("dpop-nonce")  # the app's own DPoP-Nonce on /cached is replaced
        assert fresh not in (nonce, APP_NONCE)
        assert resp.one("cache-control") == "no-store"


def test_nonce_issued_but_not_required_comes_on_success_replacing_the_apps_headers(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = serve(settings(nonce={"secret": NONCE_SECRET, "required": False}))
    token = issuer.token(bound_to=dpop_key)
    resp = h.get(
        "/cached", dpop_headers(dpop_key, token, "GET", h.url("/cached"), iat=issuer.clock())
    )
    assert resp.status == 200
    nonce = resp.one("dpop-nonce")
    assert nonce != APP_NONCE
    assert resp.one("cache-control") == "no-store"
    # With the current nonce, the app's own headers stay as the app set them.
    again = h.get("/cached", dpop_headers(dpop_key, token, "GET", h.url("/cached"), nonce=nonce))
    assert again.status == 200
    assert again.one("dpop-nonce") == APP_NONCE
    assert again.one("cache-control") == APP_CACHE_CONTROL


# -- modes --------------------------------------------------------------------------------------


def test_dpop_or_bearer_accepts_an_unbound_bearer_token_marked_bearer(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = serve(settings(mode="dpop_or_bearer"))
    resp = h.get("/me", [("Authorization", f"Bearer {issuer.token()}")])
    assert resp.status == 200
    assert resp.seen == {
        "sub": "user-123",
        "scheme": "Bearer",
        "jkt": None,
        "scope": "read",
        "htu": None,
    }
    token = issuer.token(bound_to=dpop_key)
    dpop = h.get("/me", dpop_headers(dpop_key, token, "GET", h.url("/me"), iat=issuer.clock()))
    assert dpop.status == 200
    assert dpop.seen is not None and dpop.seen["scheme"] == "DPoP"


def test_dpop_or_bearer_challenges_follow_rfc9449_figures_17_to_19(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = serve(settings(mode="dpop_or_bearer"))
    # Figure 17: no credentials, no error code.
    assert_refused(h.get("/me"), 401, None, challenge=f"Bearer, DPoP {ALGS}")
    # Figure 18: a DPoP-bound token sent as Bearer (downgrade) - the error on the Bearer challenge.
    downgrade = h.get("/me", [("Authorization", f"Bearer {issuer.token(bound_to=dpop_key)}")])
    assert_refused(
        downgrade,
        401,
        "invalid_token",
        challenge='Bearer error="invalid_token", error_description="DPoP-bound access token sent '
        f'as a Bearer token", DPoP {ALGS}',
    )
    # A DPoP failure: the error on the DPoP challenge.
    bad_proof = h.get("/me", [("Authorization", f"DPoP {issuer.token(bound_to=dpop_key)}")])
    assert_refused(
        bad_proof,
        401,
        "invalid_dpop_proof",
        challenge=f'Bearer, DPoP error="invalid_dpop_proof", error_description="DPoP proof is missing", {ALGS}',
    )
    # Figure 19: two methods at once, ambiguous - 400 with the error on both.
    token = issuer.token()
    both = h.get("/me", [("Authorization", f"Bearer {token}"), ("Authorization", f"DPoP {token}")])
    err = (
        'error="invalid_request", error_description="Multiple methods used to include access token"'
    )
    assert_refused(both, 400, "invalid_request", challenge=f"Bearer {err}, DPoP {err}, {ALGS}")


def test_report_only_refuses_nothing_and_logs_each_reason(
    serve: Callable[..., Harness],
    settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = serve(settings(mode="report_only"))
    token = issuer.token(bound_to=dpop_key)
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        missing = h.get("/me")
        no_proof = h.get("/me", [("Authorization", f"DPoP {token}")])
        valid = h.get("/me", dpop_headers(dpop_key, token, "GET", h.url("/me"), iat=issuer.clock()))
    for resp in (missing, no_proof):
        assert resp.status == 200
        assert resp.seen is None
        assert not resp.has("www-authenticate")
    assert valid.status == 200
    assert valid.seen is not None and valid.seen["jkt"] == dpop_key.jkt
    lines = refusal_log(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("dpop would_refuse reason=no_credentials status=401 ")
    assert lines[1].startswith(
        "dpop would_refuse reason=proof_missing status=401 error=invalid_dpop_proof "
    )


# -- on_refusal ---------------------------------------------------------------------------------


def test_on_refusal_hook_sync(serve: Callable[..., Harness], settings: Any) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    h = serve(settings(on_refusal=lambda reason, info: calls.append((reason, dict(info)))))
    assert_refused(h.get("/me", [("DPoP", "x")]), 401, None)
    assert calls == [
        (
            "no_credentials",
            {
                "method": "GET",
                "path": "/me",
                "client_ip": "192.0.2.10",
                "status": 401,
                "error": None,
                "reason": "no_credentials",
            },
        )
    ]


def test_on_refusal_hook_async(
    serve: Callable[..., Harness], settings: Any, issuer: TokenIssuer
) -> None:
    calls: list[str] = []

    async def hook(reason: str, info: Mapping[str, Any]) -> None:
        calls.append(f"{reason} {info['status']} {info['error']}")

    h = serve(settings(on_refusal=hook))
    assert_refused(
        h.get("/me", [("Authorization", f"DPoP {issuer.token()}")]), 401, "invalid_dpop_proof"
    )
    assert calls == ["proof_missing 401 invalid_dpop_proof"]


def test_a_token_verifier_that_hands_back_a_coroutine_gets_503_never_500(
    serve: Callable[..., Harness], dpop_key: DPoPKey, issuer: TokenIssuer
) -> None:
    async def introspect(token: str) -> dict[str, Any]:  # pragma: no cover
        return {"active": True, "cnf": {"jkt": dpop_key.jkt}}

    def verify(token: str) -> Any:
        return introspect(token)  # an async verifier behind a sync wrapper

    h = serve({"token_verifier": verify, "clock": issuer.clock, "exclude_paths": ["/health"]})
    headers = dpop_headers(dpop_key, "opaque", "GET", h.url("/me"), iat=issuer.clock())
    assert_refused(
        h.get("/me", headers),
        503,
        "temporarily_unavailable",
        description="The access token cannot be checked right now",
    )


# -- imports ------------------------------------------------------------------------------------


def test_adapters_import_no_framework() -> None:
    """``dpop_middleware``, both adapters and the Django helper import no web framework;
    only ``dpop_middleware.fastapi`` imports FastAPI."""
    code = (
        "import sys, dpop_middleware, dpop_middleware.asgi, dpop_middleware.wsgi, "
        "dpop_middleware.django, dpop_middleware.routes\n"
        "dpop_middleware.DPoPMiddleware, dpop_middleware.DPoPWSGIMiddleware\n"
        "bad = {'django', 'starlette', 'fastapi', 'flask', 'werkzeug'} & set(sys.modules)\n"
        "assert not bad, bad\n"
        "import dpop_middleware.fastapi\n"
        "assert 'fastapi' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
