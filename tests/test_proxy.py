"""The request URI for ``htu`` through every adapter: forwarded headers believed only from
``trusted_proxies``, ``public_url``, and mount prefixes (ASGI ``root_path``, WSGI ``SCRIPT_NAME``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from test_frameworks_support import (
    FRAMEWORKS,
    Harness,
    Resp,
    describe,
    dpop_headers,
    open_harness,
    starlette_test_client,
)
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client
from werkzeug.wrappers import Response

from dpop_middleware import DPoPMiddleware, DPoPWSGIMiddleware
from dpop_middleware.testing import DPoPKey, TokenIssuer

PROXY = "10.0.0.5"
STRANGER = "192.0.2.77"
FORWARDED = [
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "api.example"),
    ("X-Forwarded-Prefix", "/v1"),
]


@pytest.fixture(params=FRAMEWORKS)
def serve(
    request: pytest.FixtureRequest, make_settings: Callable[..., dict[str, Any]]
) -> Iterator[Callable[..., Harness]]:
    """``serve(client_ip=..., root_path=..., **settings)``."""
    opened: list[Any] = []

    def open_(*, client_ip: str = STRANGER, root_path: str = "", **extra: Any) -> Harness:
        cm = open_harness(
            request.param, make_settings(**extra), client_ip=client_ip, root_path=root_path
        )
        opened.append(cm)
        return cm.__enter__()

    yield open_
    for cm in reversed(opened):
        cm.__exit__(None, None, None)


@pytest.fixture
def call(issuer: TokenIssuer, dpop_key: DPoPKey) -> Callable[..., Resp]:
    """``call(h, signed_url, extra_headers)``: GET /me with a proof for ``signed_url``."""

    def send(h: Harness, signed_url: str, extra: list[tuple[str, str]] | None = None) -> Resp:
        token = issuer.token(bound_to=dpop_key)
        headers = [
            *(extra or []),
            *dpop_headers(dpop_key, token, "GET", signed_url, iat=issuer.clock()),
        ]
        return h.get("/me", headers)

    return send


def assert_htu_mismatch(resp: Resp) -> None:
    assert resp.status == 401
    assert resp.error == "invalid_dpop_proof"
    assert resp.json()["error_description"] == "DPoP proof htu does not match the request URI"
    assert resp.one("www-authenticate").startswith('DPoP error="invalid_dpop_proof", ')


def test_forwarded_headers_from_a_trusted_proxy_make_the_proof_pass(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(client_ip=PROXY, trusted_proxies=["10.0.0.0/8"])
    resp = call(h, "https://api.example/v1/me", FORWARDED)
    assert resp.status == 200
    assert resp.seen is not None and resp.seen["htu"] == "https://api.example/v1/me"
    # The proxy's view is now the only one: the URL the server itself saw no longer matches.
    assert_htu_mismatch(call(h, h.url("/me"), FORWARDED))


def test_rfc7239_forwarded_header_from_a_trusted_proxy(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(client_ip=PROXY, trusted_proxies=[PROXY])
    forwarded = [("Forwarded", 'for=198.51.100.1;proto=https;host="api.example:8443"')]
    assert call(h, "https://api.example:8443/me", forwarded).status == 200


def test_the_last_value_is_the_one_the_trusted_proxy_added(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(client_ip=PROXY, trusted_proxies=["10.0.0.0/8"])
    chain = [
        ("X-Forwarded-Proto", "http, https"),
        ("X-Forwarded-Host", "evil.example, api.example"),
    ]
    assert call(h, "https://api.example/me", chain).status == 200
    assert_htu_mismatch(call(h, "http://evil.example/me", chain))


def test_the_same_headers_from_an_untrusted_peer_are_ignored(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(client_ip=STRANGER, trusted_proxies=["10.0.0.0/8"])
    assert_htu_mismatch(call(h, "https://api.example/v1/me", FORWARDED))
    assert call(h, h.url("/me"), FORWARDED).status == 200


def test_no_proxy_is_trusted_by_default(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(client_ip="127.0.0.1")
    assert_htu_mismatch(call(h, "https://api.example/v1/me", FORWARDED))


def test_a_bad_forwarded_host_from_a_trusted_proxy_is_refused(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(client_ip=PROXY, trusted_proxies=[PROXY])
    resp = call(h, "https://evil.example/x", [("X-Forwarded-Host", "evil.example/x?")])
    assert resp.status == 400
    assert resp.error == "invalid_request"
    assert resp.json()["error_description"] == "The Host header is not a valid host"


def test_public_url_fixes_scheme_host_and_prefix(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(client_ip=PROXY, public_url="https://API.example:443/v1/", trusted_proxies=[PROXY])
    assert call(h, "https://api.example/v1/me").status == 200
    # Neither the Host the server saw nor forwarded headers can change it.
    assert_htu_mismatch(call(h, h.url("/me")))
    other = [("X-Forwarded-Host", "other.example"), ("X-Forwarded-Prefix", "/v2")]
    assert_htu_mismatch(call(h, "https://other.example/v2/me", other))
    assert call(h, "https://api.example/v1/me", other).status == 200


def test_mount_prefix_is_part_of_htu(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(root_path="/api")
    resp = call(h, "http://testserver/api/me")
    assert resp.status == 200
    assert resp.seen is not None and resp.seen["htu"] == "http://testserver/api/me"
    assert_htu_mismatch(call(h, "http://testserver/me"))


def test_public_url_replaces_the_mount_prefix(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(root_path="/api", public_url="https://api.example/v1")
    assert call(h, "https://api.example/v1/me").status == 200
    assert_htu_mismatch(call(h, "https://api.example/v1/api/me"))


def test_forwarded_prefix_replaces_the_mount_prefix(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(client_ip=PROXY, root_path="/api", trusted_proxies=[PROXY])
    assert (
        call(h, "http://testserver/public/me", [("X-Forwarded-Prefix", "/public/")]).status == 200
    )


def test_forwarded_prefix_without_a_leading_slash_is_refused(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    """``X-Forwarded-Prefix: x.evil`` would be glued onto the host: ``http://testserverx.evil``."""
    h = serve(client_ip=PROXY, trusted_proxies=[PROXY])
    resp = call(h, "http://testserverx.evil/me", [("X-Forwarded-Prefix", "x.evil")])
    assert (resp.status, resp.error) == (400, "invalid_request")
    assert resp.json()["error_description"] == "The request prefix is not an absolute path"


# -- the middleware on a sub-application --------------------------------------------------------


def test_starlette_mount_of_a_wrapped_sub_app(
    make_settings: Callable[..., dict[str, Any]], issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    async def me(request: Request) -> JSONResponse:
        return JSONResponse(describe(request.scope.get("dpop")))

    inner = Starlette(routes=[Route("/me", me)])
    outer = Starlette(routes=[Mount("/api", app=DPoPMiddleware(inner, settings=make_settings()))])
    client = starlette_test_client()(outer)
    token = issuer.token(bound_to=dpop_key)
    ok = client.get(
        "/api/me",
        headers=dpop_headers(
            dpop_key, token, "GET", "http://testserver/api/me", iat=issuer.clock()
        ),
    )
    assert ok.status_code == 200
    assert ok.json()["dpop"]["htu"] == "http://testserver/api/me"
    bad = client.get(
        "/api/me",
        headers=dpop_headers(dpop_key, token, "GET", "http://testserver/me", iat=issuer.clock()),
    )
    assert bad.status_code == 401
    assert bad.json()["error"] == "invalid_dpop_proof"


def test_werkzeug_dispatcher_mount_of_a_wrapped_sub_app(
    make_settings: Callable[..., dict[str, Any]], issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    def inner(environ: dict[str, Any], start_response: Any) -> Any:
        return Response(environ["SCRIPT_NAME"] + environ["PATH_INFO"])(environ, start_response)

    outer = DispatcherMiddleware(
        Response("root", 404), {"/api": DPoPWSGIMiddleware(inner, settings=make_settings())}
    )
    client = Client(outer)
    token = issuer.token(bound_to=dpop_key)
    ok = client.get(
        "/api/me",
        headers=dpop_headers(dpop_key, token, "GET", "http://localhost/api/me", iat=issuer.clock()),
    )
    assert ok.status_code == 200
    assert ok.get_data() == b"/api/me"
    bad = client.get(
        "/api/me",
        headers=dpop_headers(dpop_key, token, "GET", "http://localhost/me", iat=issuer.clock()),
    )
    assert bad.status_code == 401
    assert bad.json is not None and bad.json["error"] == "invalid_dpop_proof"


def test_exclude_paths_are_below_the_mount_prefix(
    serve: Callable[..., Harness], call: Callable[..., Resp]
) -> None:
    h = serve(root_path="/api", exclude_paths=["/health"])
    health = h.get("/health")  # the request is for /api/health
    assert (health.status, health.json()) == (200, {"ok": True})


@pytest.mark.parametrize("framework", ["starlette", "flask"])  # Django refuses such hosts itself
def test_host_with_an_underscore_is_a_valid_reg_name(
    framework: str,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    token = issuer.token(bound_to=dpop_key)
    headers = [
        ("Host", "api_server:8000"),
        *dpop_headers(dpop_key, token, "GET", "http://api_server:8000/me", iat=issuer.clock()),
    ]
    with open_harness(framework, make_settings()) as h:
        resp = h.get("/me", headers)
    assert resp.status == 200, resp.body
