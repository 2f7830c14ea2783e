"""TokenClient against the test kit's real authorization server on loopback, and that server's
own checks (RFC 9449 section 5 and 8, RFC 8414, RFC 6749 client authentication)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest
import requests
from conftest import FrozenClock
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dpop_middleware import testing
from dpop_middleware.asgi import DPoPMiddleware
from dpop_middleware.client import (
    AccessToken,
    DiscoveryError,
    DPoPKey,
    HttpxDPoPAuth,
    RequestsDPoPAuth,
    TokenClient,
    TokenError,
    metadata_urls,
)
from dpop_middleware.core.jose import json_object
from dpop_middleware.testing import AuthorizationServer, TokenIssuer, serve

CLIENT, SECRET = "client-abc", "secret-abc"


@pytest.fixture
def kit(clock: FrozenClock) -> TokenIssuer:
    return TokenIssuer(audience="https://api.example", clock=clock)


@pytest.fixture
def key() -> DPoPKey:
    return DPoPKey.generate()


def claims_of(jwt: str) -> dict[str, Any]:
    return json_object(jwt.split(".")[1])


def api(settings: dict[str, Any]) -> DPoPMiddleware:
    async def me(request: Request) -> JSONResponse:
        dpop = request.scope["dpop"]
        return JSONResponse({"sub": dpop.subject, "jkt": dpop.jkt})

    return DPoPMiddleware(Starlette(routes=[Route("/me", me)]), settings)


def tokens_for(server: AuthorizationServer, key: DPoPKey, **options: Any) -> TokenClient:
    options.setdefault("issuer", server.url)
    options.setdefault("client_secret", SECRET)
    return TokenClient(key, client_id=CLIENT, clock=server.issuer_kit.clock, **options)


def test_the_key_moved_to_client_and_the_old_import_still_works() -> None:
    from dpop_middleware import client

    assert testing.DPoPKey is client.DPoPKey and testing.REMOVE is client.REMOVE


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        pytest.param(
            "https://as.example",
            [
                "https://as.example/.well-known/oauth-authorization-server",
                "https://as.example/.well-known/openid-configuration",
            ],
            id="no-path",
        ),
        pytest.param(
            "https://as.example/tenant/1/",
            [
                "https://as.example/.well-known/oauth-authorization-server/tenant/1",
                "https://as.example/tenant/1/.well-known/openid-configuration",
            ],
            id="path-inserted",
        ),
    ],
)
def test_metadata_urls(issuer: str, expected: list[str]) -> None:
    assert metadata_urls(issuer) == expected


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_client_credentials_by_discovery_then_the_api_accepts_the_token(
    kit: TokenIssuer, key: DPoPKey, method: Any
) -> None:
    with kit.serve() as server:
        tokens = tokens_for(server, key, auth_method=method)
        token = tokens.token()
        assert token.token_type == "DPoP" and token.scope == "read"
        assert claims_of(token.access_token)["cnf"] == {"jkt": key.jkt}
        assert claims_of(token.access_token)["iss"] == server.url
        assert tokens.token_endpoint == server.token_endpoint
        [sent] = server.token_requests
        assert sent["grant_type"] == "client_credentials" and sent["auth_method"] == method
        proof = sent["proof"]
        assert (proof["htm"], proof["htu"]) == ("POST", server.token_endpoint)
        assert "ath" not in proof and "nonce" not in proof
        # The API trusts the server through its jwks_uri; the auth gets the token itself.
        with serve(api(server.settings())) as base:
            auth = HttpxDPoPAuth(key, tokens=tokens)
            with httpx.Client(auth=auth) as client:
                answer = client.get(base + "/me")
                assert (answer.status_code, answer.json()) == (
                    200,
                    {"sub": CLIENT, "jkt": key.jkt},
                )
                assert client.get(base + "/me").status_code == 200
        assert len(server.token_requests) == 1  # cached


def test_async_and_requests_clients_with_tokens(kit: TokenIssuer, key: DPoPKey) -> None:
    with kit.serve() as server, serve(api(server.settings())) as base:
        tokens = tokens_for(server, key)

        async def run() -> list[int]:
            async with httpx.AsyncClient(auth=HttpxDPoPAuth(key, tokens=tokens)) as client:
                first = await client.get(base + "/me")
                second = await client.get(base + "/me")
                return [first.status_code, second.status_code]

        assert asyncio.run(run()) == [200, 200]
        assert len(server.token_requests) == 1
        with requests.Session() as session:
            session.auth = RequestsDPoPAuth(key, tokens=tokens)
            assert session.get(base + "/me", timeout=5).json()["sub"] == CLIENT
        assert len(server.token_requests) == 1


def test_atoken_with_discovery_and_nonce(kit: TokenIssuer, key: DPoPKey) -> None:
    with kit.serve(require_nonce=True) as server:
        tokens = tokens_for(server, key)
        token = asyncio.run(tokens.atoken())
        assert isinstance(token, AccessToken)
        assert [r["refused"] for r in server.token_requests] == ["use_dpop_nonce", None]


def test_use_dpop_nonce_at_the_token_endpoint_is_retried_once_then_remembered(
    kit: TokenIssuer, key: DPoPKey
) -> None:
    with kit.serve(require_nonce=True) as server:
        tokens = tokens_for(server, key, token_endpoint=server.token_endpoint, issuer=None)
        tokens.token()
        first, second = server.token_requests
        assert first["refused"] == "use_dpop_nonce" and "nonce" not in first["proof"]
        assert second["refused"] is None and second["proof"]["nonce"] == server.nonce
        tokens.invalidate()
        tokens.token()  # the remembered nonce: no new refusal
        assert len(server.token_requests) == 3 and server.token_requests[2]["refused"] is None
        server.rotate_nonce()
        tokens.invalidate()
        tokens.token()
        assert [r["refused"] for r in server.token_requests[3:]] == ["use_dpop_nonce", None]


def test_a_second_use_dpop_nonce_is_an_error_not_a_loop(kit: TokenIssuer, key: DPoPKey) -> None:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        nonce = f"n{len(seen)}"
        return httpx.Response(400, json={"error": "use_dpop_nonce"}, headers={"DPoP-Nonce": nonce})

    tokens = TokenClient(
        key,
        client_id=CLIENT,
        client_secret=SECRET,
        token_endpoint="https://as.example/token",
        http=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    with pytest.raises(TokenError) as caught:
        tokens.token()
    assert (caught.value.error, caught.value.status, len(seen)) == ("use_dpop_nonce", 400, 2)


def test_token_is_cached_until_shortly_before_expiry_then_refreshed(
    kit: TokenIssuer, key: DPoPKey, clock: FrozenClock
) -> None:
    with kit.serve(lifetime=300) as server:
        tokens = tokens_for(server, key, refresh_margin=30)
        first = tokens.token()
        assert first.expires_at == clock.now + 300
        clock.advance(269)
        assert tokens.token() is first
        clock.advance(1)  # 30 s before expiry: renewed, with the refresh token
        second = tokens.token()
        assert second.access_token != first.access_token
        assert [r["grant_type"] for r in server.token_requests] == [
            "client_credentials",
            "refresh_token",
        ]


def test_a_refused_refresh_token_falls_back_to_client_credentials(
    kit: TokenIssuer, key: DPoPKey
) -> None:
    with kit.serve() as server:
        tokens = tokens_for(server, key, refresh_token="not-a-refresh-token")
        assert tokens.token().token_type == "DPoP"
        assert [r["grant_type"] for r in server.token_requests] == [
            "refresh_token",
            "client_credentials",
        ]


def test_public_client_refresh_token_is_bound_to_the_key(kit: TokenIssuer, key: DPoPKey) -> None:
    with kit.serve(clients={"public-app": None}) as server:
        refresh = server.issue_refresh_token("public-app", bound_to=key)
        tokens = TokenClient(key, client_id="public-app", refresh_token=refresh, issuer=server.url)
        assert claims_of(tokens.token().access_token)["cnf"]["jkt"] == key.jkt
        assert server.token_requests[0]["auth_method"] == "none"
        # Another key cannot use it; and a public client gets no client credentials fallback.
        other = DPoPKey.generate()
        stolen = server.issue_refresh_token("public-app", bound_to=key)
        thief = TokenClient(other, client_id="public-app", refresh_token=stolen, issuer=server.url)
        with pytest.raises(TokenError) as caught:
            thief.token()
        assert (caught.value.error, caught.value.status) == ("invalid_grant", 400)


def test_refresh_tokens_rotate(kit: TokenIssuer, key: DPoPKey, clock: FrozenClock) -> None:
    with kit.serve(clients={"public-app": None}) as server:
        old = server.issue_refresh_token("public-app", bound_to=key)
        tokens = TokenClient(
            key, client_id="public-app", refresh_token=old, issuer=server.url, clock=clock
        )
        new = tokens.token().refresh_token
        assert new not in (None, old)
        clock.advance(400)
        tokens.token()  # used the rotated one: the old one is gone
        reuse = TokenClient(
            key, client_id="public-app", refresh_token=old, issuer=server.url, clock=clock
        )
        with pytest.raises(TokenError, match="invalid_grant"):
            reuse.token()


@pytest.mark.parametrize(
    ("options", "error", "status"),
    [
        pytest.param({"client_secret": "wrong"}, "invalid_client", 401, id="bad-secret"),
        pytest.param({"scope": "read"}, None, None, id="ok-with-scope"),
    ],
)
def test_client_authentication_errors(
    kit: TokenIssuer, key: DPoPKey, options: dict[str, Any], error: str | None, status: int | None
) -> None:
    with kit.serve() as server:
        tokens = tokens_for(server, key, **options)
        if error is None:
            assert tokens.token().scope == "read"
            return
        with pytest.raises(TokenError) as caught:
            tokens.token()
        assert (caught.value.error, caught.value.status) == (error, status)
        assert "wrong" not in str(caught.value)


def test_bearer_token_type_is_refused(kit: TokenIssuer, key: DPoPKey) -> None:
    with kit.serve(token_type="Bearer") as server:
        with pytest.raises(TokenError) as caught:
            tokens_for(server, key).token()
        assert caught.value.error == "token_type_mismatch"


@pytest.mark.parametrize(
    ("server_options", "error"),
    [
        pytest.param({"metadata": {"issuer": "https://evil.example"}}, "issuer_mismatch", id="iss"),
        pytest.param(
            {"metadata": {"dpop_signing_alg_values_supported": ["RS256"]}},
            "alg_not_supported",
            id="alg",
        ),
        pytest.param(
            {"auth_methods": ("client_secret_post",)}, "auth_method_not_supported", id="method"
        ),
        pytest.param(
            {"metadata": {"token_endpoint": testing.REMOVE}}, "invalid_response", id="no-te"
        ),
        pytest.param({"well_known": ()}, "discovery_failed", id="none-found"),
    ],
)
def test_discovery_refuses(
    kit: TokenIssuer, key: DPoPKey, server_options: dict[str, Any], error: str
) -> None:
    with kit.serve(**server_options) as server:
        with pytest.raises(DiscoveryError) as caught:
            tokens_for(server, key).token()
        assert caught.value.error == error
        assert server.token_requests == []


@pytest.mark.parametrize("well_known", ["oauth-authorization-server", "openid-configuration"])
def test_discovery_with_an_issuer_path(kit: TokenIssuer, key: DPoPKey, well_known: str) -> None:
    with kit.serve(path="/tenant/1", well_known=(well_known,)) as server:
        assert server.url.endswith("/tenant/1")
        tokens = tokens_for(server, key)
        assert claims_of(tokens.token().access_token)["iss"] == server.url
        assert tokens.token_endpoint == server.url + "/token"


def test_invalid_token_from_the_api_drops_the_cached_token(kit: TokenIssuer, key: DPoPKey) -> None:
    with kit.serve() as server:
        tokens = tokens_for(server, key)
        other_api = TokenIssuer(issuer="https://other.example")  # does not trust our server
        auth = HttpxDPoPAuth(key, tokens=tokens)
        with serve(api(other_api.settings())) as base, httpx.Client(auth=auth) as client:
            assert client.get(base + "/me").status_code == 401
            assert tokens.cached() is None
            client.get(base + "/me")
        assert len(server.token_requests) == 2


def test_constructor_rules(key: DPoPKey) -> None:
    endpoint = "https://as.example/token"
    with pytest.raises(ValueError, match="exactly one"):
        TokenClient(key, client_id="c", client_secret="s")
    with pytest.raises(ValueError, match="https"):
        TokenClient(key, client_id="c", client_secret="s", token_endpoint="http://as.example/t")
    with pytest.raises(ValueError, match="public client"):
        TokenClient(key, client_id="c", token_endpoint=endpoint)
    tokens = TokenClient(key, client_id="c", client_secret="s", token_endpoint=endpoint)
    with pytest.raises(ValueError, match="same DPoPKey"):
        HttpxDPoPAuth(DPoPKey.generate(), tokens=tokens)
    with pytest.raises(ValueError, match="not both"):
        HttpxDPoPAuth(key, "tok", tokens=tokens)
    secret = TokenClient(key, client_id="c", client_secret="hunter2", token_endpoint=endpoint)
    assert "hunter2" not in repr(secret)


# -- the authorization server's own checks -------------------------------------------------------


def post_token(
    server: AuthorizationServer, proof: str | list[str] | None, **extra: Any
) -> httpx.Response:
    headers: list[tuple[str, str]] = []
    proofs = [proof] if isinstance(proof, str) else proof or []
    headers += [("DPoP", p) for p in proofs]
    basic = base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()
    headers.append(extra.pop("authorization", ("Authorization", f"Basic {basic}")))
    data = {"grant_type": "client_credentials", **extra}
    return httpx.post(server.token_endpoint, data=data, headers=headers)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda key, url: None, "proof_missing", id="missing"),
        pytest.param(lambda key, url: key.proof("GET", url), "htm_mismatch", id="htm"),
        pytest.param(lambda key, url: key.proof("POST", url + "x"), "htu_mismatch", id="htu"),
        pytest.param(lambda key, url: key.proof("POST", url, iat=0), "iat_too_old", id="old"),
        pytest.param(
            lambda key, url: [key.proof("POST", url), key.proof("POST", url)],
            "multiple_proofs",
            id="two",
        ),
    ],
)
def test_token_endpoint_refuses_bad_proofs(
    kit: TokenIssuer, key: DPoPKey, make: Any, reason: str
) -> None:
    with kit.serve() as server:
        response = post_token(server, make(key, server.token_endpoint))
        assert (response.status_code, response.json()) == (400, {"error": "invalid_dpop_proof"})
        assert server.token_requests[0]["refused"] == reason


def test_token_endpoint_refuses_a_replayed_proof_and_two_client_auth_methods(
    kit: TokenIssuer, key: DPoPKey
) -> None:
    with kit.serve() as server:
        proof = key.proof("POST", server.token_endpoint)
        assert post_token(server, proof).status_code == 200
        again = post_token(server, proof)
        assert (again.status_code, again.json()["error"]) == (400, "invalid_dpop_proof")
        both = post_token(server, key.proof("POST", server.token_endpoint), client_secret=SECRET)
        assert (both.status_code, both.json()["error"]) == (400, "invalid_request")
        wrong = ("Authorization", "Basic " + base64.b64encode(b"client-abc:nope").decode())
        refused = post_token(server, key.proof("POST", server.token_endpoint), authorization=wrong)
        assert (refused.status_code, refused.json()["error"]) == (401, "invalid_client")
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="token"'
        unknown = post_token(
            server, key.proof("POST", server.token_endpoint), grant_type="password"
        )
        assert (unknown.status_code, unknown.json()["error"]) == (400, "unsupported_grant_type")


def test_the_issuer_is_restored_after_serving(kit: TokenIssuer) -> None:
    with kit.serve() as server:
        assert kit.issuer == server.url and kit.settings()["issuer"] == server.url
        metadata = httpx.get(server.url + "/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == server.url
        assert httpx.get(server.jwks_uri).json() == kit.jwks
    assert kit.issuer == "https://issuer.example"
