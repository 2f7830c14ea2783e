"""The httpx (sync and async) and requests helpers against protected apps, nonces included."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import requests
from conftest import FrozenClock
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dpop_middleware.asgi import DPoPMiddleware
from dpop_middleware.client import DPoPAuthBase, HttpxDPoPAuth, RequestsDPoPAuth
from dpop_middleware.core.jose import json_object
from dpop_middleware.testing import DPoPKey, TokenIssuer, serve
from dpop_middleware.wsgi import DPoPWSGIMiddleware

SECRET = "s" * 32
BASE = "http://testserver"


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest.fixture
def key() -> DPoPKey:
    return DPoPKey.generate()


@pytest.fixture
def token(issuer: TokenIssuer, key: DPoPKey) -> str:
    return issuer.token(bound_to=key)


def settings(
    issuer: TokenIssuer, nonce: dict[str, Any] | None = None, clock: FrozenClock | None = None
) -> dict[str, Any]:
    """Middleware settings; ``clock`` (starting now: tokens and proof iat use the real time)."""
    extra: dict[str, Any] = {} if nonce is None else {"nonce": nonce}
    if clock is not None:
        extra["clock"] = clock
    return issuer.settings(**extra)


def asgi_app(config: dict[str, Any]) -> DPoPMiddleware:
    async def echo(request: Request) -> JSONResponse:
        dpop = request.scope["dpop"]
        body = (await request.body()).decode()
        nonce = dpop.proof_claims.get("nonce")
        return JSONResponse({"jkt": dpop.jkt, "nonce": nonce, "body": body})

    return DPoPMiddleware(Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])]), config)


def wsgi_app(config: dict[str, Any]) -> DPoPWSGIMiddleware:
    def echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        dpop = environ["dpop"]
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(size).decode()
        nonce = dpop.proof_claims.get("nonce")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"jkt": dpop.jkt, "nonce": nonce, "body": body}).encode()]

    return DPoPWSGIMiddleware(echo, config)


# -- one driver per helper, so every behaviour is checked against all three -----------------------

Send = Callable[..., Any]  # send(method, path, body=None) -> response


@contextmanager
def httpx_sync(config: dict[str, Any], auth: HttpxDPoPAuth) -> Iterator[Send]:
    """httpx.Client over WSGITransport: the WSGI middleware."""
    transport = httpx.WSGITransport(app=wsgi_app(config))
    with httpx.Client(transport=transport, base_url=BASE, auth=auth) as client:
        yield lambda method, path, body=None: client.request(method, path, content=body)


@contextmanager
def httpx_async(config: dict[str, Any], auth: HttpxDPoPAuth) -> Iterator[Send]:
    """httpx.AsyncClient over ASGITransport (the ASGI middleware), on one event loop."""
    loop = asyncio.new_event_loop()
    transport = httpx.ASGITransport(app=asgi_app(config))
    client = httpx.AsyncClient(transport=transport, base_url=BASE, auth=auth)
    try:
        yield lambda method, path, body=None: loop.run_until_complete(
            client.request(method, path, content=body)
        )
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()


@contextmanager
def requests_live(config: dict[str, Any], auth: RequestsDPoPAuth) -> Iterator[Send]:
    """A requests Session against the ASGI app under uvicorn on a free loopback port."""
    with serve(asgi_app(config)) as base, requests.Session() as session:
        session.auth = auth
        yield lambda method, path, body=None: session.request(
            method, base + path, data=body, timeout=5
        )


DRIVERS = {
    "httpx-sync": (HttpxDPoPAuth, httpx_sync),
    "httpx-async": (HttpxDPoPAuth, httpx_async),
    "requests": (RequestsDPoPAuth, requests_live),
}


@pytest.fixture(params=list(DRIVERS))
def driver(request: pytest.FixtureRequest) -> tuple[type[DPoPAuthBase], Any]:
    return DRIVERS[request.param]


def history(response: Any) -> list[int]:
    return [r.status_code for r in response.history]


def test_signs_every_request(driver: Any, issuer: TokenIssuer, key: DPoPKey, token: str) -> None:
    auth_class, open_client = driver
    auth = auth_class(key, access_token=token)
    with open_client(settings(issuer), auth) as send:
        for _ in range(3):  # a fresh proof each time: no replay refusal
            response = send("GET", "/echo?page=2", None)
            assert response.status_code == 200, response.text
            assert response.json()["jkt"] == key.jkt
            assert history(response) == []
        posted = send("POST", "/echo", b"payload")
        assert posted.status_code == 200 and posted.json()["body"] == "payload"


def test_recovers_from_use_dpop_nonce_then_reuses_the_nonce(
    driver: Any, issuer: TokenIssuer, key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    auth_class, open_client = driver
    auth = auth_class(key, access_token=token)
    # nonce_only: the server's clock jumps 200 s ahead below while the client signs iat with the
    # real one; this test is about nonce expiry, not the iat window.
    nonce = {"secret": SECRET, "freshness": "nonce_only"}
    with open_client(settings(issuer, nonce, clock), auth) as send:
        first = send("POST", "/echo", b"body sent twice")
        assert first.status_code == 200, first.text
        assert history(first) == [401]  # use_dpop_nonce, then the retry
        assert first.json()["body"] == "body sent twice"
        nonce = first.json()["nonce"]
        assert nonce is not None and list(auth.nonces.values()) == [nonce]

        second = send("GET", "/echo", None)
        assert (second.status_code, history(second)) == (200, [])
        assert second.json()["nonce"] == nonce

        clock.advance(200)  # the nonce expired (2 steps of 60 s), the token (300 s) has not
        third = send("GET", "/echo", None)
        assert (third.status_code, history(third)) == (200, [401])
        assert third.json()["nonce"] not in (None, nonce)


def test_remembers_a_nonce_offered_on_a_200(
    driver: Any, issuer: TokenIssuer, key: DPoPKey, token: str
) -> None:
    auth_class, open_client = driver
    auth = auth_class(key, access_token=token)
    # Nonces issued but not required: the first 200 carries one, the next proof uses it.
    with open_client(settings(issuer, {"secret": SECRET, "required": False}), auth) as send:
        first = send("GET", "/echo", None)
        assert (first.status_code, first.json()["nonce"]) == (200, None)
        offered = first.headers["DPoP-Nonce"]
        second = send("GET", "/echo", None)
        assert (second.status_code, history(second)) == (200, [])
        assert second.json()["nonce"] == offered


def test_nonces_are_remembered_per_origin(key: DPoPKey) -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        proof = json_object(request.headers["DPoP"].split(".")[1])
        seen.append((request.url.host, proof.get("nonce")))
        return httpx.Response(200, headers={"DPoP-Nonce": f"nonce-of-{request.url.host}"})

    auth = HttpxDPoPAuth(key, access_token="tok")
    with httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as client:
        for url in ("https://a.example/", "https://b.example/", "https://A.example:443/x"):
            client.get(url)
    assert seen == [("a.example", None), ("b.example", None), ("a.example", "nonce-of-a.example")]


ALWAYS_NONCE = {
    "www-authenticate": 'DPoP error="use_dpop_nonce", error_description="fresh nonce"',
}


def test_httpx_retries_only_once(key: DPoPKey) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["DPoP"])
        return httpx.Response(401, headers={**ALWAYS_NONCE, "DPoP-Nonce": f"n{len(calls)}"})

    auth = HttpxDPoPAuth(key, access_token="tok")
    with httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as client:
        response = client.get("https://api.example/")
    assert (response.status_code, history(response), len(calls)) == (401, [401], 2)
    assert calls[0] != calls[1]

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), auth=auth) as ac:
            return await ac.get("https://api.example/")

    response = asyncio.run(run())
    assert (response.status_code, len(calls)) == (401, 4)


def test_requests_retries_only_once(key: DPoPKey) -> None:
    calls: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        calls.append(dict(scope["headers"])[b"dpop"].decode())
        headers = [(k.encode(), v.encode()) for k, v in ALWAYS_NONCE.items()]
        headers.append((b"dpop-nonce", f"n{len(calls)}".encode()))
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    with serve(app) as base:
        response = requests.get(base + "/", auth=RequestsDPoPAuth(key, "tok"), timeout=5)
    assert (response.status_code, history(response), len(calls)) == (401, [401], 2)
    assert calls[0] != calls[1]


def test_token_endpoint_400_with_a_new_nonce_is_retried(key: DPoPKey) -> None:
    """RFC 9449 section 8: the authorization server says use_dpop_nonce with a 400."""
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert "Authorization" not in request.headers  # no token yet: a proof only
        proof = json_object(request.headers["DPoP"].split(".")[1])
        seen.append(proof)
        if proof.get("nonce") != "as-nonce":
            body = {"error": "use_dpop_nonce"}
            return httpx.Response(400, json=body, headers={"DPoP-Nonce": "as-nonce"})
        if len(seen) > 2:  # the same 400 with the nonce already sent is not retried
            return httpx.Response(
                400, json={"error": "invalid_grant"}, headers={"DPoP-Nonce": "as-nonce"}
            )
        return httpx.Response(200, json={"access_token": "t", "token_type": "DPoP"})

    auth = HttpxDPoPAuth(key)
    with httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as client:
        response = client.post("https://as.example/token", data={"grant_type": "x"})
        assert (response.status_code, history(response)) == (200, [400])
        assert "ath" not in seen[0] and seen[1]["nonce"] == "as-nonce"
        refused = client.post("https://as.example/token", data={"grant_type": "x"})
        assert (refused.status_code, history(refused), len(seen)) == (400, [], 3)


def test_requests_resends_a_file_body_on_retry(
    issuer: TokenIssuer, key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    auth = RequestsDPoPAuth(key, access_token=token)
    with serve(asgi_app(settings(issuer, {"secret": SECRET}, clock))) as base:
        body = io.BytesIO(b"xxfile contents")
        body.seek(2)
        response = requests.post(base + "/echo", data=body, auth=auth, timeout=5)
    assert (response.status_code, history(response)) == (200, [401])
    assert response.json()["body"] == "file contents"


def test_access_token_can_be_replaced(issuer: TokenIssuer, key: DPoPKey) -> None:
    auth = HttpxDPoPAuth(key, access_token="stale")
    transport = httpx.WSGITransport(app=wsgi_app(settings(issuer)))
    with httpx.Client(transport=transport, base_url=BASE, auth=auth) as client:
        assert client.get("/echo").status_code == 401
        auth.access_token = issuer.token(bound_to=key)
        assert client.get("/echo").status_code == 200


def test_the_test_kit_imports_without_httpx_or_requests() -> None:
    code = (
        "import sys\n"
        "sys.modules['httpx'] = None; sys.modules['requests'] = None\n"
        "import dpop_middleware.testing, dpop_middleware.client as client\n"
        "for name in ('HttpxDPoPAuth', 'RequestsDPoPAuth'):\n"
        "    try:\n"
        "        getattr(client, name)\n"
        "    except ImportError as exc:\n"
        "        print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "dpop_middleware.client.HttpxDPoPAuth needs httpx: pip install httpx",
        "dpop_middleware.client.RequestsDPoPAuth needs requests: pip install requests",
    ]
