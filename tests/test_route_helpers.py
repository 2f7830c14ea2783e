"""The per-route helpers (FastAPI, Starlette, Flask, Django) through each framework's test client
over the real adapters: they refuse exactly as the middleware does (status, challenge, JSON body,
log line, ``on_refusal``): 403 ``insufficient_scope`` when a scope is missing, 401 when the
middleware verified nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any

import pytest
from fastapi import Security, WebSocket
from test_frameworks import ALGS, assert_refused, refusal_log
from test_frameworks_support import Harness, dpop_headers, starlette_test_client

from dpop_middleware import ConfigurationError, DPoPMiddleware, DPoPResult, DPoPWSGIMiddleware
from dpop_middleware.fastapi import DPoPScopes, require_dpop
from dpop_middleware.testing import REMOVE, DPoPKey, TokenIssuer

HELPER_FRAMEWORKS = (
    "starlette", "fastapi", "fastapi_outside", "flask", "django_wsgi", "django_asgi",
)  # fmt: skip
NO_SCOPE = "The access token does not have the scope this request needs"


def seen(result: DPoPResult | None) -> dict[str, Any]:
    return {"scopes": sorted(result.scopes) if result is not None else None}


# -- the apps: /read (read), /write (write), /both (read + write), /cls (write, a class view),
# -- /health (excluded by the settings, but the route requires DPoP), /ws (websocket, write).


def starlette_app(settings: Mapping[str, Any]) -> Any:
    from starlette.applications import Starlette
    from starlette.endpoints import HTTPEndpoint
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute

    from dpop_middleware.starlette import dpop_required

    @dpop_required(scopes=["read"])
    async def read(request: Request) -> Response:
        return JSONResponse(seen(request.scope.get("dpop")))

    @dpop_required(scopes="write")
    def write(request: Request) -> Response:  # a sync endpoint
        return JSONResponse(seen(request.scope.get("dpop")))

    @dpop_required(scopes=["read", "write"])
    async def both(request: Request) -> Response:
        return JSONResponse(seen(request.scope.get("dpop")))

    @dpop_required()
    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    @dpop_required(claims={"tenant": "acme"})
    async def tenant(request: Request) -> Response:
        return JSONResponse(seen(request.scope.get("dpop")))

    @dpop_required(scopes=["write"])
    class Cls(HTTPEndpoint):
        async def get(self, request: Request) -> Response:
            return JSONResponse(seen(request.scope.get("dpop")))

    @dpop_required(scopes=["write"])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(seen(websocket.scope.get("dpop")))
        await websocket.close()

    routes = [
        Route("/read", read),
        Route("/write", write),
        Route("/both", both),
        Route("/health", health),
        Route("/tenant", tenant),
        Route("/cls", Cls),
        WebSocketRoute("/ws", ws),
    ]
    return Starlette(routes=routes, middleware=[Middleware(DPoPMiddleware, settings=settings)])


def fastapi_app(settings: Mapping[str, Any], *, outside: bool = False) -> Any:
    """``outside``: the middleware wrapped around the app (``DPoPMiddleware(FastAPI(), ...)``)
    instead of ``add_middleware``: a refusal raised in a dependency then passes the app's own
    ServerErrorMiddleware, and was a 500 before the middleware registered its handler."""
    # The views' annotations are strings (PEP 563): FastAPI resolves them in this module's
    # globals, hence Security, WebSocket, DPoPScopes and require_dpop are imported at the top.
    from fastapi import FastAPI

    app = FastAPI()
    if not outside:
        app.add_middleware(DPoPMiddleware, settings=settings)

    @app.get("/read")
    def read(dpop: Annotated[DPoPResult, Security(require_dpop, scopes=["read"])]) -> Any:
        return seen(dpop)

    @app.get("/write")
    async def write(dpop: Annotated[DPoPResult, DPoPScopes("write")]) -> Any:
        return seen(dpop)

    @app.get("/both")
    def both(dpop: Annotated[DPoPResult, DPoPScopes("read", "write")]) -> Any:
        return seen(dpop)

    @app.get("/health")
    def health(dpop: Annotated[DPoPResult, Security(require_dpop)]) -> Any:
        return {"ok": True}

    @app.get("/tenant", dependencies=[DPoPScopes(claims={"tenant": "acme"})])
    def tenant() -> Any:
        return {"scopes": ["read"]}

    @app.get("/cls", dependencies=[DPoPScopes("write")])
    def cls() -> Any:
        return {"scopes": ["read", "write"]}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, dpop: Annotated[DPoPResult, DPoPScopes("write")]) -> None:
        await websocket.accept()
        await websocket.send_json(seen(dpop))
        await websocket.close()

    return DPoPMiddleware(app, settings=settings) if outside else app


def flask_app(settings: Mapping[str, Any]) -> Any:
    from flask import Flask
    from flask.views import MethodView

    from dpop_middleware.flask import dpop_required, dpop_result

    app = Flask(__name__)
    app.wsgi_app = DPoPWSGIMiddleware(app.wsgi_app, settings=settings)  # type: ignore[method-assign]

    @app.get("/read")
    @dpop_required(scopes=["read"])
    def read() -> Any:
        return seen(dpop_result())

    @app.get("/write")
    @dpop_required(scopes=["write"])
    async def write() -> Any:
        return seen(dpop_result())

    @app.get("/both")
    @dpop_required(scopes=["read", "write"])
    def both() -> Any:
        return seen(dpop_result())

    @app.get("/health")
    @dpop_required()
    def health() -> Any:
        return {"ok": True}

    @app.get("/tenant")
    @dpop_required(claims={"tenant": "acme"})
    def tenant() -> Any:
        return seen(dpop_result())

    class Cls(MethodView):
        decorators = [dpop_required(scopes=["write"])]  # noqa: RUF012

        def get(self) -> Any:
            return seen(dpop_result())

    app.add_url_rule("/cls", view_func=Cls.as_view("cls"))
    return app


def _django_views() -> list[Any]:
    from django.http import HttpRequest, HttpResponse, JsonResponse
    from django.urls import path
    from django.views import View

    from dpop_middleware.django import DPoPRequiredMixin, dpop_required, dpop_result

    @dpop_required(scopes=["read"])
    def read(request: HttpRequest) -> HttpResponse:
        return JsonResponse(seen(dpop_result(request)))

    @dpop_required(scopes=["write"])
    async def write(request: HttpRequest) -> HttpResponse:
        return JsonResponse(seen(dpop_result(request)))

    @dpop_required(scopes=["read", "write"])
    def both(request: HttpRequest) -> HttpResponse:
        return JsonResponse(seen(dpop_result(request)))

    @dpop_required()
    def health(request: HttpRequest) -> HttpResponse:
        return JsonResponse({"ok": True})

    class Tenant(DPoPRequiredMixin, View):
        dpop_claims = {"tenant": "acme"}  # noqa: RUF012

        def get(self, request: HttpRequest) -> HttpResponse:
            return JsonResponse(seen(dpop_result(request)))

    class Cls(DPoPRequiredMixin, View):
        dpop_scopes = ("write",)

        def get(self, request: HttpRequest) -> HttpResponse:
            return JsonResponse(seen(dpop_result(request)))

    return [
        path("read", read),
        path("write", write),
        path("both", both),
        path("health", health),
        path("tenant", Tenant.as_view()),
        path("cls", Cls.as_view()),
    ]


def __getattr__(name: str) -> Any:
    if name == "urlpatterns":  # this module is the URLconf of the Django apps
        patterns = _django_views()
        globals()["urlpatterns"] = patterns
        return patterns
    raise AttributeError(name)


def django_wsgi_app(settings: Mapping[str, Any]) -> Any:
    from django.core.wsgi import get_wsgi_application

    return DPoPWSGIMiddleware(get_wsgi_application(), settings=settings)


def django_asgi_app(settings: Mapping[str, Any]) -> Any:
    from django.core.asgi import get_asgi_application

    return DPoPMiddleware(get_asgi_application(), settings=settings)


BUILDERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "fastapi_outside": lambda settings: fastapi_app(settings, outside=True),
    "flask": flask_app,
    "django_wsgi": django_wsgi_app,
    "django_asgi": django_asgi_app,
}


@contextmanager
def django_urls() -> Iterator[None]:
    import django
    from django.test.utils import override_settings

    django.setup(set_prefix=False)
    with override_settings(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"]):
        yield


@pytest.fixture(params=HELPER_FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    return param


@pytest.fixture
def serve(framework: str, make_settings: Any) -> Iterator[Callable[..., Harness]]:
    stack: list[Any] = []

    def open_(**extra: Any) -> Harness:
        settings = make_settings(
            **{"algorithms": ["ES256", "PS256"], "exclude_paths": ["/health"], **extra}
        )
        app = BUILDERS[framework](settings)
        if framework.startswith("django"):
            cm = django_urls()
            stack.append(cm)
            cm.__enter__()
        kind = "fastapi" if framework == "fastapi_outside" else framework
        return Harness(kind, app, client_ip="192.0.2.10", root_path="")

    yield open_
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def insufficient(scope: str, scheme: str = "DPoP") -> str:
    err = f'error="insufficient_scope", error_description="{NO_SCOPE}", scope="{scope}"'
    if scheme == "Bearer":
        return f"Bearer {err}, DPoP {ALGS}"
    return f"DPoP {err}, {ALGS}"


def get(h: Harness, issuer: TokenIssuer, key: DPoPKey, path: str, **claims: Any) -> Any:
    token = issuer.token(bound_to=key, claims=claims or None)
    return h.get(path, dpop_headers(key, token, "GET", h.url(path), iat=issuer.clock()))


def test_read_token_on_read_and_write_routes(
    serve: Callable[..., Harness],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = serve()
    ok = get(h, issuer, dpop_key, "/read")
    assert ok.status == 200, ok.body
    assert ok.json() == {"scopes": ["read"]}
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        refused = get(h, issuer, dpop_key, "/write")
    assert_refused(refused, 403, "insufficient_scope", challenge=insufficient("write"))
    assert refused.json()["error_description"] == NO_SCOPE
    (line,) = refusal_log(caplog)
    assert line.startswith("dpop refused reason=insufficient_scope status=403 ")


@pytest.mark.parametrize(
    ("path", "claims", "status", "scope"),
    [
        pytest.param("/both", {}, 403, "read write", id="two-needed-one-held"),
        pytest.param("/both", {"scope": "read write"}, 200, "", id="two-needed-both-held"),
        pytest.param("/cls", {}, 403, "write", id="class-view-refused"),
        pytest.param("/cls", {"scope": "write read"}, 200, "", id="class-view-passes"),
        pytest.param("/write", {"scope": REMOVE, "scp": ["write"]}, 200, "", id="scp-list"),
        pytest.param("/read", {"scope": REMOVE}, 403, "read", id="no-scope-claim"),
    ],
)
def test_scoped_routes(
    serve: Callable[..., Harness],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    path: str,
    claims: dict[str, Any],
    status: int,
    scope: str,
) -> None:
    h = serve()
    resp = get(h, issuer, dpop_key, path, **claims)
    if status == 200:
        assert resp.status == 200, resp.body
    else:
        assert_refused(resp, 403, "insufficient_scope", challenge=insufficient(scope))


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        pytest.param({"tenant": "acme"}, 200, id="claim-held"),
        pytest.param({"tenant": "evil"}, 403, id="claim-other-value"),
        pytest.param({}, 403, id="claim-absent"),
    ],
)
def test_required_claim_is_403_with_its_own_reason(
    serve: Callable[..., Harness],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
    claims: dict[str, Any],
    status: int,
) -> None:
    h = serve()
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        resp = get(h, issuer, dpop_key, "/tenant", **claims)
    if status == 200:
        assert resp.status == 200, resp.body
        return
    assert_refused(resp, 403, "forbidden", challenge=f"DPoP {ALGS}")
    assert resp.json()["error_description"] == "The access token does not allow this request"
    (line,) = refusal_log(caplog)
    assert line.startswith("dpop refused reason=claim_mismatch status=403 error=None ")


def test_nothing_verified_is_401_as_the_middleware_sends_it(
    serve: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """``/health`` is excluded, so the middleware verified nothing; the route still requires DPoP."""
    calls: list[str] = []
    h = serve(on_refusal=lambda reason, info: calls.append(reason))
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        resp = h.get("/health")
    assert_refused(resp, 401, None, description="DPoP authentication required")
    (line,) = refusal_log(caplog)
    assert line.startswith("dpop refused reason=not_verified status=401 ")
    assert calls == ["not_verified"]


def test_report_only_route_still_refuses(
    serve: Callable[..., Harness], issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = serve(mode="report_only")
    assert_refused(h.get("/read"), 401, None)
    assert_refused(
        get(h, issuer, dpop_key, "/write"),
        403,
        "insufficient_scope",
        challenge=insufficient("write"),
    )
    assert get(h, issuer, dpop_key, "/read").status == 200


def test_bearer_gets_the_error_on_the_bearer_challenge(
    serve: Callable[..., Harness], issuer: TokenIssuer
) -> None:
    h = serve(mode="dpop_or_bearer")
    resp = h.get("/write", [("Authorization", f"Bearer {issuer.token()}")])
    assert_refused(resp, 403, "insufficient_scope", challenge=insufficient("write", "Bearer"))
    assert h.get("/read", [("Authorization", f"Bearer {issuer.token()}")]).status == 200


# -- websockets (Starlette and FastAPI) -------------------------------------------------------


@pytest.mark.parametrize("build", [starlette_app, fastapi_app], ids=["starlette", "fastapi"])
def test_websocket_denied_before_accept(
    build: Callable[[Mapping[str, Any]], Any],
    make_settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    from starlette.testclient import WebSocketDenialResponse

    client = starlette_test_client()(build(make_settings(algorithms=["ES256", "PS256"])))
    url = "http://testserver/ws"

    def headers(**claims: Any) -> dict[str, str]:
        token = issuer.token(bound_to=dpop_key, claims=claims or None)
        return dict(dpop_headers(dpop_key, token, "GET", url, iat=issuer.clock()))

    with (
        pytest.raises(WebSocketDenialResponse) as denied,
        client.websocket_connect("/ws", headers=headers()),
    ):
        pass
    assert denied.value.status_code == 403
    assert denied.value.headers["www-authenticate"] == insufficient("write")
    assert denied.value.json()["error"] == "insufficient_scope"
    with client.websocket_connect("/ws", headers=headers(scope="write")) as ws:
        assert ws.receive_json() == {"scopes": ["write"]}


# -- declared once, checked at start-up --------------------------------------------------------


@pytest.mark.parametrize("bad", ['a"', "x\\y", ""])
def test_bad_scope_names_fail_when_the_route_is_declared(bad: str) -> None:
    from dpop_middleware.django import dpop_required as django_required
    from dpop_middleware.flask import dpop_required as flask_required
    from dpop_middleware.starlette import dpop_required as starlette_required

    if bad == "":
        assert DPoPScopes("") is not None  # an empty name is ignored, not an error
        return
    for helper in (starlette_required, flask_required, django_required):
        with pytest.raises(ConfigurationError, match="dpop_required"):
            helper(scopes=[bad])
    with pytest.raises(ConfigurationError, match="DPoPScopes"):
        DPoPScopes(bad)


def test_fastapi_openapi_shows_the_dpop_scheme(make_settings: Any) -> None:
    spec = fastapi_app(make_settings()).openapi()
    assert spec["components"]["securitySchemes"]["DPoP"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["DPoP"]["scheme"] == "DPoP"
    assert spec["paths"]["/write"]["get"]["security"] == [{"DPoP": ["write"]}]
    assert spec["paths"]["/health"]["get"]["security"] == [{"DPoP": []}]


def test_flask_dpop_result_is_none_on_an_excluded_path(make_settings: Any) -> None:
    from flask import Flask

    from dpop_middleware.flask import dpop_result

    app = Flask(__name__)
    app.wsgi_app = DPoPWSGIMiddleware(app.wsgi_app, settings=make_settings(exclude_paths=["/open"]))  # type: ignore[method-assign]

    @app.get("/open")
    def open_() -> Any:
        return {"dpop": dpop_result()}

    resp = app.test_client().get("/open")
    assert (resp.status_code, resp.get_json()) == (200, {"dpop": None})


def test_helper_without_the_middleware_refuses_401(make_settings: Any) -> None:
    from flask import Flask

    from dpop_middleware.flask import dpop_required

    app = Flask(__name__)

    @app.get("/x")
    @dpop_required(scopes=["read"])
    def x() -> Any:
        return {"ok": True}

    resp = app.test_client().get("/x")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "DPoP"
    assert resp.get_json()["error"] == "unauthorized"


def test_bad_claims_fail_when_the_route_is_declared() -> None:
    from dpop_middleware.django import dpop_required as django_required
    from dpop_middleware.flask import dpop_required as flask_required
    from dpop_middleware.starlette import dpop_required as starlette_required

    for helper in (starlette_required, flask_required, django_required):
        with pytest.raises(ConfigurationError, match="dpop_required"):
            helper(claims={"tenant": 1.5})
    with pytest.raises(ConfigurationError, match=r"DPoPSecurity\(claims="):
        DPoPScopes(claims={"tenant": None})
