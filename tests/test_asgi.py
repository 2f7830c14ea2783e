"""DPoPMiddleware (pure ASGI): lifespan, websockets, streaming, background tasks, the async replay
store, and how a scope becomes the request the core checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from test_frameworks_support import dpop_headers, starlette_test_client

from dpop_middleware import DPoPMiddleware, DPoPResult
from dpop_middleware.asgi import request_info
from dpop_middleware.fastapi import DPoPAuth  # module level: FastAPI resolves string annotations
from dpop_middleware.testing import DPoPKey, TokenIssuer

TestClient = starlette_test_client()
ALGS = 'algs="ES256"'
WS_URL = "http://testserver/ws"  # what a client signs for ws://testserver/ws


@pytest.fixture
def settings(make_settings: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def make(**extra: Any) -> dict[str, Any]:
        return make_settings(**{"algorithms": ["ES256"], **extra})

    return make


def app_with(settings: dict[str, Any], **kw: Any) -> Starlette:
    """A Starlette app with a streaming route, a background task and a websocket."""
    tasks: list[str] = []

    async def stream(request: Request) -> Response:
        result: DPoPResult = request.scope["dpop"]

        async def chunks() -> Any:
            for i in range(3):
                await asyncio.sleep(0)
                yield f"{result.subject}-{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain", headers={"DPoP-Nonce": "app"})

    async def background(request: Request) -> Response:
        result: DPoPResult = request.scope["dpop"]
        return JSONResponse(
            {"queued": True}, background=BackgroundTask(tasks.append, f"done for {result.subject}")
        )

    async def ws(websocket: WebSocket) -> None:
        result: DPoPResult = websocket.scope["dpop"]
        await websocket.accept(headers=[(b"dpop-nonce", b"app")])
        await websocket.send_json({"sub": result.subject, "jkt": result.jkt})
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/stream", stream),
            Route("/background", background),
            WebSocketRoute("/ws", ws),
        ],
        middleware=[Middleware(DPoPMiddleware, settings=settings, **kw)],
    )
    app.state.tasks = tasks
    return app


# -- streaming and background tasks -------------------------------------------------------------


def test_streaming_response_passes_through_with_the_nonce_headers_replaced(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    client = TestClient(app_with(settings(nonce={"secret": "x" * 32, "required": False})))
    token = issuer.token(bound_to=dpop_key)
    url = "http://testserver/stream"
    resp = client.get(
        "/stream", headers=dpop_headers(dpop_key, token, "GET", url, iat=issuer.clock())
    )
    assert resp.status_code == 200
    assert resp.text == "user-123-0;user-123-1;user-123-2;"
    assert len(resp.headers.get_list("dpop-nonce")) == 1
    assert resp.headers["dpop-nonce"] != "app"
    assert resp.headers.get_list("cache-control") == ["no-store"]


def test_background_task_runs_after_the_response(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    app = app_with(settings())
    client = TestClient(app)
    token = issuer.token(bound_to=dpop_key)
    headers = dpop_headers(
        dpop_key, token, "GET", "http://testserver/background", iat=issuer.clock()
    )
    resp = client.get("/background", headers=headers)
    assert resp.status_code == 200
    assert resp.json() == {"queued": True}
    assert app.state.tasks == ["done for user-123"]


# -- websockets ---------------------------------------------------------------------------------


def test_websocket_handshake_with_a_valid_proof_for_the_http_url_is_accepted(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    client = TestClient(app_with(settings()))
    token = issuer.token(bound_to=dpop_key)
    headers = dpop_headers(dpop_key, token, "GET", WS_URL, iat=issuer.clock())
    with client.websocket_connect("/ws", headers=dict(headers)) as ws:
        assert ws.receive_json() == {"sub": "user-123", "jkt": dpop_key.jkt}
        assert ws.extra_headers == [(b"dpop-nonce", b"app")]  # nothing added: no nonces


@pytest.mark.parametrize(
    ("signed_url", "with_proof", "error", "reason"),
    [
        pytest.param(None, False, None, "no_credentials", id="no_credentials"),
        pytest.param(WS_URL, False, "invalid_dpop_proof", "proof_missing", id="proof_missing"),
        pytest.param("ws://testserver/ws", True, "invalid_dpop_proof", "htu_invalid", id="htu_with_ws_scheme"),
        pytest.param("http://testserver/other", True, "invalid_dpop_proof", "htu_mismatch", id="htu_other_path"),
    ],
)  # fmt: skip
def test_websocket_handshake_is_refused_before_accept_with_a_denial_response(
    settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    signed_url: str | None,
    with_proof: bool,
    error: str | None,
    reason: str,
) -> None:
    from starlette.testclient import WebSocketDenialResponse

    calls: list[str] = []
    client = TestClient(app_with(settings(on_refusal=lambda r, info: calls.append(r))))
    headers: dict[str, str] = {}
    if signed_url is not None:
        token = issuer.token(bound_to=dpop_key)
        headers["Authorization"] = f"DPoP {token}"
        if with_proof:
            headers["DPoP"] = dpop_key.proof(
                "GET", signed_url, access_token=token, iat=issuer.clock()
            )
    with (
        pytest.raises(WebSocketDenialResponse) as denied,
        client.websocket_connect("/ws", headers=headers),
    ):
        pass  # pragma: no cover - never accepted
    resp = denied.value
    assert resp.status_code == 401
    body = json.loads(resp.content)
    assert body["error"] == (error or "unauthorized")
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["access-control-expose-headers"] == "WWW-Authenticate, DPoP-Nonce"
    www = resp.headers["www-authenticate"]
    if error is None:
        assert www == f"DPoP {ALGS}"
    else:
        assert www.startswith(f'DPoP error="{error}", ')
    assert calls == [reason]


def test_websocket_replayed_handshake_is_refused(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    from starlette.testclient import WebSocketDenialResponse

    client = TestClient(app_with(settings()))
    headers = dict(
        dpop_headers(dpop_key, issuer.token(bound_to=dpop_key), "GET", WS_URL, iat=issuer.clock())
    )
    with client.websocket_connect("/ws", headers=headers) as ws:
        ws.receive_json()
    with (
        pytest.raises(WebSocketDenialResponse) as denied,
        client.websocket_connect("/ws", headers=headers),
    ):
        pass  # pragma: no cover - never accepted
    assert denied.value.status_code == 401
    assert (
        json.loads(denied.value.content)["error_description"] == "DPoP proof has already been used"
    )


def test_websocket_accept_carries_one_fresh_nonce(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    client = TestClient(app_with(settings(nonce={"secret": "x" * 32, "required": False})))
    headers = dpop_headers(
        dpop_key, issuer.token(bound_to=dpop_key), "GET", WS_URL, iat=issuer.clock()
    )
    with client.websocket_connect("/ws", headers=dict(headers)) as ws:
        ws.receive_json()
        accepted = dict(ws.extra_headers)
        assert len(ws.extra_headers) == 2
        assert accepted[b"dpop-nonce"] != b"app"
        assert accepted[b"cache-control"] == b"no-store"


def run_asgi(
    app: Any, scope: dict[str, Any], incoming: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Call an ASGI app directly; return what it sent."""
    sent: list[dict[str, Any]] = []
    queue = list(incoming)

    async def receive() -> dict[str, Any]:
        return queue.pop(0) if queue else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def ws_scope(headers: list[tuple[bytes, bytes]], **extra: Any) -> dict[str, Any]:
    return {
        "type": "websocket",
        "scheme": "wss",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"api.example"), *headers],
        "client": ("192.0.2.1", 5000),
        "server": ("api.example", 443),
        **extra,
    }


def test_websocket_without_the_denial_extension_is_closed_with_1008(settings: Any) -> None:
    reached: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    sent = run_asgi(
        DPoPMiddleware(app, settings=settings()), ws_scope([]), [{"type": "websocket.connect"}]
    )
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "no_credentials"}]
    assert reached == []


def test_websocket_client_gone_before_the_refusal_gets_nothing_sent(settings: Any) -> None:
    sent = run_asgi(
        DPoPMiddleware(lambda *a: None, settings=settings()),  # type: ignore[arg-type,return-value]
        ws_scope([], extensions={"websocket.http.response": {}}),
        [{"type": "websocket.disconnect", "code": 1001}],
    )
    assert sent == []


def test_wss_handshake_is_checked_as_https(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", "https://api.example/ws", access_token=token, iat=issuer.clock())
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["dpop"])
        await send({"type": "websocket.accept"})

    headers = [(b"authorization", f"DPoP {token}".encode()), (b"dpop", proof.encode())]
    sent = run_asgi(DPoPMiddleware(app, settings=settings()), ws_scope(headers), [])
    assert sent == [{"type": "websocket.accept"}]
    assert seen[0].jkt == dpop_key.jkt


def test_fastapi_dependency_refuses_what_the_middleware_did_not_verify(settings: Any) -> None:
    from starlette.testclient import WebSocketDenialResponse

    app = FastAPI()
    app.add_middleware(DPoPMiddleware, settings=settings(exclude_paths=["/open"]))

    @app.get("/open/required")
    def required(dpop: DPoPAuth) -> dict[str, str | None]:  # pragma: no cover - never reached
        return {"sub": dpop.subject}

    @app.websocket("/open/ws")
    async def ws(websocket: WebSocket, dpop: DPoPAuth) -> None:  # pragma: no cover
        await websocket.accept()

    client = TestClient(app)
    resp = client.get("/open/required")
    # Exactly the middleware's own 401: JSON body, the DPoP challenge with algs, no error code.
    assert resp.status_code == 401
    assert resp.json() == {
        "error": "unauthorized",
        "error_description": "DPoP authentication required",
    }
    assert resp.headers["www-authenticate"].startswith("DPoP algs=")
    assert resp.headers["cache-control"] == "no-store"
    # The test client supports websocket.http.response: denied with the same HTTP refusal.
    with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect("/open/ws"):
        pass  # pragma: no cover - never accepted
    assert denied.value.status_code == 401
    assert denied.value.json()["error_description"] == "DPoP authentication required"


def test_fastapi_dependency_without_the_middleware_refuses_401() -> None:
    app = FastAPI()

    @app.get("/required")
    def required(dpop: DPoPAuth) -> dict[str, str | None]:  # pragma: no cover - never reached
        return {"sub": dpop.subject}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, dpop: DPoPAuth) -> None:  # pragma: no cover
        await websocket.accept()

    client = TestClient(app)
    resp = client.get("/required")
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "DPoP"
    assert resp.headers["cache-control"] == "no-store"
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/ws"):
        pass  # pragma: no cover - never accepted
    assert closed.value.code == 1008


def test_cors_middleware_outside_answers_preflight_and_makes_refusals_readable(
    settings: Any,
) -> None:
    """The recommended order for browser clients: CORS outermost, so a refusal carries
    Access-Control-Allow-Origin too, and the challenge and nonce headers stay exposed."""
    from starlette.middleware.cors import CORSMiddleware

    app = Starlette(
        routes=[Route("/me", lambda request: JSONResponse({}))],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=["https://app.example"],
                allow_headers=["Authorization", "DPoP"],
                expose_headers=["WWW-Authenticate", "DPoP-Nonce"],
            ),
            Middleware(DPoPMiddleware, settings=settings()),
        ],
    )
    client = TestClient(app)
    preflight = client.options(
        "/me",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, dpop",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    refused = client.get("/me", headers={"Origin": "https://app.example"})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://app.example"
    assert refused.headers.get_list("access-control-expose-headers") == [
        "WWW-Authenticate, DPoP-Nonce"
    ]
    assert refused.headers["www-authenticate"] == f"DPoP {ALGS}"


# -- lifespan, the async store, the scope -------------------------------------------------------


def test_lifespan_scope_passes_through_untouched(settings: Any) -> None:
    got: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append((scope, receive, send))

    async def receive() -> dict[str, Any]:  # pragma: no cover
        return {}

    async def send(message: Any) -> None:  # pragma: no cover
        pass

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    asyncio.run(DPoPMiddleware(app, settings=settings())(scope, receive, send))
    assert got == [(scope, receive, send)]
    assert got[0][0] is scope and got[0][1] is receive and got[0][2] is send


def test_lifespan_startup_and_shutdown_run_through_the_middleware(settings: Any) -> None:
    from contextlib import asynccontextmanager

    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        events.append("startup")
        yield
        events.append("shutdown")

    app = Starlette(lifespan=lifespan, middleware=[Middleware(DPoPMiddleware, settings=settings())])
    with TestClient(app):
        assert events == ["startup"]
    assert events == ["startup", "shutdown"]


class RecordingStore:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, float]] = []

    async def add(self, key: bytes, ttl: float) -> bool:
        await asyncio.sleep(0)
        first = all(key != k for k, _ in self.calls)
        self.calls.append((key, ttl))
        return first

    async def aclose(self) -> None:
        pass


def test_replay_store_is_awaited_once_per_verified_request(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    store = RecordingStore()
    middleware = DPoPMiddleware(_echo, settings=settings(), store=store)
    client = TestClient(middleware)
    token = issuer.token(bound_to=dpop_key)
    headers = dpop_headers(dpop_key, token, "GET", "http://testserver/x", iat=issuer.clock())
    assert client.get("/x", headers=headers).status_code == 200
    assert client.get("/x", headers=headers).status_code == 401
    assert client.get("/x").status_code == 401  # refused before the store
    assert len(store.calls) == 2
    assert store.calls[0] == store.calls[1]
    assert store.calls[0][1] == 60 + 10 + 1  # proof_max_age + clock_skew + 1


async def _echo(scope: Any, receive: Any, send: Any) -> None:
    body = json.dumps({"jkt": scope["dpop"].jkt, "scope_keys": sorted(scope)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [[b"content-type", b"application/json"]],
        }
    )
    await send({"type": "http.response.body", "body": body})


def test_head_refusal_sends_no_body(settings: Any) -> None:
    scope = {"type": "http", "method": "HEAD", "scheme": "http", "path": "/x", "headers": []}
    sent = run_asgi(DPoPMiddleware(_echo, settings=settings()), scope, [])
    assert sent[0]["status"] == 401
    assert (b"content-length", b"65") in sent[0]["headers"]  # what a GET would get
    assert sent[1] == {"type": "http.response.body", "body": b""}


def test_callers_scope_is_not_mutated(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", "https://api.example/x", access_token=token, iat=issuer.clock())
    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "https",
        "path": "/x",
        "raw_path": b"/x",
        "query_string": b"",
        "headers": [
            (b"host", b"api.example"),
            (b"authorization", f"DPoP {token}".encode()),
            (b"dpop", proof.encode()),
        ],
    }
    sent = run_asgi(DPoPMiddleware(_echo, settings=settings()), scope, [])
    assert sent[0]["status"] == 200
    assert "dpop" in json.loads(sent[1]["body"])["scope_keys"]
    assert "dpop" not in scope


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        pytest.param({"path": "/api/me", "root_path": "/api"}, ("/api", "/me"), id="asgi_convention"),
        pytest.param({"path": "/me", "root_path": "/api"}, ("/api", "/me"), id="path_without_root"),
        pytest.param({"path": "/api", "root_path": "/api"}, ("/api", ""), id="root_itself"),
        pytest.param({"path": "/apiary", "root_path": "/api"}, ("/api", "/apiary"), id="not_a_segment"),
        pytest.param(
            {"path": "/api/a/b", "raw_path": b"/api/a%2Fb", "root_path": "/api"},
            ("/api", "/a%2Fb"),
            id="raw_path_kept",
        ),
        pytest.param(
            {"path": "/a/b", "raw_path": b"/a%2fb"}, ("", "/a%2fb"), id="raw_path_without_root"
        ),
        pytest.param(
            {"path": "/caf\u00e9 x", "raw_path": None}, ("", "/caf%C3%A9%20x"), id="re_encoded"
        ),
        pytest.param(
            {"path": "/a\ufffd", "raw_path": b"/a%FF"}, ("", "/a%FF"), id="raw_path_not_utf8"
        ),
        pytest.param(
            {"path": "/a\ufffd", "raw_path": b"/a%EF%BF%BD"}, ("", "/a%EF%BF%BD"), id="raw_replacement_char"
        ),
        pytest.param(
            {"path": "/a\ufffd", "raw_path": b"/b%FF"}, ("", "/a%EF%BF%BD"), id="raw_path_disagrees"
        ),
        pytest.param(
            {"path": "/\u00e9", "raw_path": "/\u00e9".encode()}, ("", "/%C3%A9"), id="raw_path_not_ascii"
        ),
    ],
)  # fmt: skip
def test_request_info_paths(scope: dict[str, Any], expected: tuple[str, str]) -> None:
    info = request_info({"type": "http", "method": "GET", "headers": [], **scope})
    assert (info.root_path, info.path) == expected


@pytest.mark.parametrize(
    ("kind", "scheme", "expected"),
    [("websocket", "ws", "http"), ("websocket", "wss", "https"), ("http", "https", "https")],
)
def test_request_info_scheme_and_method(kind: str, scheme: str, expected: str) -> None:
    scope = {
        "type": kind,
        "method": "PUT",
        "scheme": scheme,
        "path": "/",
        "headers": [(b"DPoP", b"a"), (b"dpop", b"b")],
        "client": ("10.0.0.1", 1),
        "server": ("h", 8000),
    }
    info = request_info(scope)
    assert info.scheme == expected
    assert info.method == ("GET" if kind == "websocket" else "PUT")
    assert info.header_values("dpop") == ["a", "b"]  # duplicates kept, names lower-cased
    assert (info.client_ip, info.server) == ("10.0.0.1", ("h", 8000))


# -- the claims: deeply immutable, the same for every request -----------------------------------

ROLES = {"realm_access": {"roles": ["reader"]}}


def try_to_change(result: DPoPResult) -> list[str]:
    """What a careless handler does to the claims; the names of the errors it gets."""
    errors = []
    for change in (
        lambda: result.claims["realm_access"]["roles"].append("admin"),
        lambda: result.claims.__setitem__("admin", True),
        lambda: result.claims["realm_access"].update(roles=["admin"]),
        lambda: result.proof_claims.__setitem__("htm", "POST"),
    ):
        try:
            change()
        except (TypeError, AttributeError) as exc:
            errors.append(type(exc).__name__)
    return errors


def immutable_claims_app(settings: dict[str, Any]) -> FastAPI:
    """FastAPI (its own JSON encoding, with and without a response model) and a Starlette
    JSONResponse (json.dumps) of the claims, each after a try to change them."""
    app = FastAPI()
    app.add_middleware(DPoPMiddleware, settings=settings)

    @app.get("/plain")
    def plain(dpop: DPoPAuth) -> Any:
        return {"errors": try_to_change(dpop), "claims": dpop.claims, "proof": dpop.proof_claims}

    @app.get("/model")
    def model(dpop: DPoPAuth) -> dict[str, Any]:
        return {"errors": try_to_change(dpop), "claims": dpop.claims, "proof": dpop.proof_claims}

    @app.get("/starlette")
    def starlette(request: Request) -> JSONResponse:
        result: DPoPResult = request.scope["dpop"]
        errors = try_to_change(result)
        return JSONResponse(
            {"errors": errors, "claims": result.claims, "proof": result.proof_claims}
        )

    return app


@pytest.mark.parametrize("path", ["/plain", "/model", "/starlette"])
def test_the_app_cannot_change_the_claims_the_next_request_sees(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey, path: str
) -> None:
    client = TestClient(immutable_claims_app(settings()))
    token = issuer.token(bound_to=dpop_key, claims=ROLES)
    for _ in range(2):  # the second request gets the cached token's claims
        url = "http://testserver" + path
        headers = dpop_headers(dpop_key, token, "GET", url, iat=issuer.clock())
        resp = client.get(path, headers=headers)
        assert resp.status_code == 200
        body = resp.json()
        assert body["errors"] == ["AttributeError", "TypeError", "TypeError", "TypeError"]
        assert body["claims"]["realm_access"] == {"roles": ["reader"]}
        assert "admin" not in body["claims"]
        assert body["claims"]["cnf"] == {"jkt": dpop_key.jkt}
        assert body["proof"]["htm"] == "GET"
