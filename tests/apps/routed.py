"""Apps with the routes attackers aim at, behind the middleware, for tests/test_path_attacks.py.

Settings come from the JSON file named by ``DPOP_TEST_SETTINGS`` (``exclude_paths: ["/health"]``).
Every handler answers what it ran as, so a test can tell which handler a request reached and
whether the middleware verified it (``dpop``):

* ``/health``: ``{"route": "health"}`` (excluded);
* ``/files/{p}`` (any rest of the path): ``{"route": "files", "p": ...}``;
* ``/admin/purge`` (any method, OPTIONS included, as a Django function view would):
  ``{"route": "purge"}``;
* ``/api/{p}``: ``{"route": "api", "p": ...}``;
* ``/graphql/...``: a mounted sub-app, ``{"route": "graphql"}``.

``starlette`` (uvicorn), ``flask`` and ``django`` (gunicorn).
"""

from __future__ import annotations

from typing import Any

from dpop_middleware import DPoPMiddleware, DPoPWSGIMiddleware
from tests.apps.settings import load

METHODS = ["GET", "POST", "DELETE", "OPTIONS"]


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    def answer(request: Request, route: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"route": route, "dpop": "dpop" in request.scope, **extra})

    async def health(request: Request) -> JSONResponse:
        return answer(request, "health")

    async def files(request: Request) -> JSONResponse:
        return answer(request, "files", p=request.path_params["p"])

    async def purge(request: Request) -> JSONResponse:
        return answer(request, "purge")

    async def api(request: Request) -> JSONResponse:
        return answer(request, "api", p=request.path_params["p"])

    async def graphql(request: Request) -> JSONResponse:
        return answer(request, "graphql")

    sub = Starlette(routes=[Route("/{p:path}", graphql, methods=METHODS)])
    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/files/{p:path}", files, methods=METHODS),
            Route("/admin/purge", purge, methods=METHODS),
            Route("/api/{p:path}", api, methods=METHODS),
            Mount("/graphql", app=sub),
        ]
    )
    return DPoPMiddleware(app, settings=load())


def _flask() -> Any:
    from flask import Flask, jsonify, request

    app = Flask(__name__)

    def answer(route: str, **extra: Any) -> Any:
        return jsonify({"route": route, "dpop": "dpop" in request.environ, **extra})

    @app.route("/health")
    def health() -> Any:
        return answer("health")

    @app.route("/files/<path:p>", methods=METHODS)
    def files(p: str) -> Any:
        return answer("files", p=p)

    @app.route("/admin/purge", methods=METHODS)
    def purge() -> Any:
        return answer("purge")

    @app.route("/api/<path:p>", methods=METHODS)
    def api(p: str) -> Any:
        return answer("api", p=p)

    app.wsgi_app = DPoPWSGIMiddleware(app.wsgi_app, settings=load())  # type: ignore[method-assign]
    return app


def _django() -> Any:
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application
    from django.http import HttpRequest, JsonResponse
    from django.urls import path, re_path

    def answer(request: HttpRequest, route: str, **extra: Any) -> JsonResponse:
        return JsonResponse({"route": route, "dpop": "dpop" in request.META, **extra})

    def health(request: HttpRequest) -> JsonResponse:
        return answer(request, "health")

    def files(request: HttpRequest, p: str) -> JsonResponse:
        return answer(request, "files", p=p)

    def purge(request: HttpRequest) -> JsonResponse:  # a plain function view: any method
        return answer(request, "purge")

    def api(request: HttpRequest, p: str) -> JsonResponse:
        return answer(request, "api", p=p)

    global urlpatterns
    urlpatterns = [
        path("health", health),
        re_path(r"^files/(?P<p>.*)$", files),
        path("admin/purge", purge),
        re_path(r"^api/(?P<p>.*)$", api),
    ]
    settings.configure(
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="test-only",
        DEBUG=False,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={},
        APPEND_SLASH=False,
    )
    return DPoPWSGIMiddleware(get_wsgi_application(), settings=load())


urlpatterns: list[Any] = []


def __getattr__(name: str) -> Any:
    """``tests.apps.routed:starlette`` / ``:flask`` / ``:django``, built on first access."""
    builders = {"starlette": _starlette, "flask": _flask, "django": _django}
    if name not in builders:
        raise AttributeError(name)
    app = builders[name]()
    globals()[name] = app
    return app
