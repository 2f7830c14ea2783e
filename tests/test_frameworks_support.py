"""Shared by the adapter tests (no tests here): one small app per framework, each wrapped by the
middleware exactly as the README says, and one client interface over their test clients.

Every app serves the same routes:

* ``GET|POST /me`` and ``GET /files/<path>``: ``{"dpop": <what the view read> | null}``;
  ``OPTIONS /me`` answers 204 itself (to show that a preflight reaches the app);
* ``GET /health``: ``{"ok": true}`` (the tests put it in ``exclude_paths``);
* ``GET /cached``: like ``/me``, and the app sets its own ``Cache-Control`` and ``DPoP-Nonce``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpop_middleware import DPoPMiddleware, DPoPResult, DPoPWSGIMiddleware
from dpop_middleware.fastapi import DPoPAuth, OptionalDPoPAuth
from dpop_middleware.testing import DPoPKey

# The examples are not installed; they import as ``examples.*`` from the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")

BASE = "http://testserver"
FRAMEWORKS = ("starlette", "fastapi", "flask", "django_wsgi", "django_asgi")
ASGI_FRAMEWORKS = ("starlette", "fastapi", "django_asgi")
WSGI_FRAMEWORKS = ("flask", "django_wsgi")
APP_CACHE_CONTROL = "max-age=60"
APP_NONCE = "app-set-nonce"

Headers = Sequence[tuple[str, str]]


def describe(result: DPoPResult | None) -> dict[str, Any]:
    if result is None:
        return {"dpop": None}
    return {
        "dpop": {
            "sub": result.subject,
            "scheme": result.scheme,
            "jkt": result.jkt,
            "scope": result.claims.get("scope"),
            "htu": result.proof_claims.get("htu"),
        }
    }


def dpop_headers(
    key: DPoPKey, token: str, method: str, url: str, **proof: Any
) -> list[tuple[str, str]]:
    """``Authorization: DPoP <token>`` and a fresh proof for ``method url``."""
    return [
        ("Authorization", f"DPoP {token}"),
        ("DPoP", key.proof(method, url, access_token=token, **proof)),
    ]


@dataclass(frozen=True)
class Resp:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, every line kept
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def one(self, name: str) -> str:
        values = self.all(name)
        assert len(values) == 1, f"{name}: {values!r}"
        return values[0]

    def has(self, name: str) -> bool:
        return bool(self.all(name))

    @property
    def error(self) -> str | None:
        error: str | None = self.json().get("error")
        return error

    @property
    def seen(self) -> dict[str, Any] | None:
        """What the view read from the middleware's result."""
        seen: dict[str, Any] | None = self.json()["dpop"]
        return seen


# -- the apps ---------------------------------------------------------------------------------


def starlette_app(settings: Mapping[str, Any], **kw: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def me(request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"x-app": "preflight"})
        return JSONResponse(describe(request.scope.get("dpop")))

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def cached(request: Request) -> Response:
        headers = {"Cache-Control": APP_CACHE_CONTROL, "DPoP-Nonce": APP_NONCE}
        return JSONResponse(describe(request.scope.get("dpop")), headers=headers)

    routes = [
        Route("/me", me, methods=["GET", "POST", "OPTIONS"]),
        Route("/files/{rest:path}", me),
        Route("/health", health),
        Route("/cached", cached),
    ]
    return Starlette(
        routes=routes, middleware=[Middleware(DPoPMiddleware, settings=settings, **kw)]
    )


def fastapi_app(settings: Mapping[str, Any], **kw: Any) -> Any:
    # The views' annotations are strings (PEP 563): FastAPI resolves them in this module's
    # globals, hence DPoPAuth / OptionalDPoPAuth are imported at the top.
    from fastapi import FastAPI, Response
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.add_middleware(DPoPMiddleware, settings=settings, **kw)

    @app.get("/me")
    @app.post("/me")
    def me(dpop: OptionalDPoPAuth) -> dict[str, Any]:
        return describe(dpop)

    @app.options("/me")
    def preflight() -> Response:
        return Response(status_code=204, headers={"x-app": "preflight"})

    @app.get("/files/{rest:path}")
    def files(rest: str, dpop: OptionalDPoPAuth) -> dict[str, Any]:
        return describe(dpop)

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/cached")
    def cached(dpop: OptionalDPoPAuth) -> JSONResponse:
        headers = {"Cache-Control": APP_CACHE_CONTROL, "DPoP-Nonce": APP_NONCE}
        return JSONResponse(describe(dpop), headers=headers)

    @app.get("/required")
    def required(dpop: DPoPAuth) -> dict[str, Any]:
        return describe(dpop)

    return app


def flask_app(settings: Mapping[str, Any], **kw: Any) -> Any:
    from flask import Flask, request

    app = Flask(__name__)
    app.wsgi_app = DPoPWSGIMiddleware(app.wsgi_app, settings=settings, **kw)  # type: ignore[method-assign]

    @app.route("/me", methods=["GET", "POST", "OPTIONS"])
    def me() -> Any:
        if request.method == "OPTIONS":
            return "", 204, {"x-app": "preflight"}
        return describe(request.environ.get("dpop"))

    @app.get("/files/<path:rest>")
    def files(rest: str) -> Any:
        return describe(request.environ.get("dpop"))

    @app.get("/health")
    def health() -> Any:
        return {"ok": True}

    @app.get("/cached")
    def cached() -> Any:
        headers = {"Cache-Control": APP_CACHE_CONTROL, "DPoP-Nonce": APP_NONCE}
        return describe(request.environ.get("dpop")), 200, headers

    return app


# Django: this module is the URLconf while a Django harness is open.


def _django_views() -> list[Any]:
    from django.http import HttpRequest, HttpResponse, JsonResponse
    from django.urls import path

    from dpop_middleware.django import dpop_result

    def me(request: HttpRequest, rest: str = "") -> HttpResponse:
        if request.method == "OPTIONS":
            response = HttpResponse(status=204)
            response["x-app"] = "preflight"
            return response
        return JsonResponse(describe(dpop_result(request)))

    def health(request: HttpRequest) -> HttpResponse:
        return JsonResponse({"ok": True})

    def cached(request: HttpRequest) -> HttpResponse:
        response = JsonResponse(describe(dpop_result(request)))
        response["Cache-Control"] = APP_CACHE_CONTROL
        response["DPoP-Nonce"] = APP_NONCE
        return response

    return [
        path("me", me),
        path("files/<path:rest>", me),
        path("health", health),
        path("cached", cached),
    ]


def __getattr__(name: str) -> Any:
    if name == "urlpatterns":  # built on first use, after Django is set up
        patterns = _django_views()
        globals()["urlpatterns"] = patterns
        return patterns
    raise AttributeError(name)


@contextmanager
def django_urls() -> Iterator[None]:
    import django
    from django.test.utils import override_settings

    django.setup(set_prefix=False)
    with override_settings(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"]):
        yield


def django_wsgi_app(settings: Mapping[str, Any], **kw: Any) -> Any:
    from django.core.wsgi import get_wsgi_application

    return DPoPWSGIMiddleware(get_wsgi_application(), settings=settings, **kw)


def django_asgi_app(settings: Mapping[str, Any], **kw: Any) -> Any:
    from django.core.asgi import get_asgi_application

    return DPoPMiddleware(get_asgi_application(), settings=settings, **kw)


BUILDERS = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "flask": flask_app,
    "django_wsgi": django_wsgi_app,
    "django_asgi": django_asgi_app,
}


# -- one client interface ---------------------------------------------------------------------


def starlette_test_client() -> Any:
    """Starlette's TestClient, without its notice that it would rather use ``httpx2``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    return TestClient


class Harness:
    """One framework's app behind the middleware, driven through its own test client."""

    def __init__(self, framework: str, app: Any, *, client_ip: str, root_path: str) -> None:
        self.framework = framework
        self.app = app
        self.asgi = framework in ASGI_FRAMEWORKS
        self.client_ip = client_ip
        self.root_path = root_path
        if self.asgi:
            TestClient = starlette_test_client()
            self._asgi_client = TestClient(
                app, base_url=BASE, root_path=root_path, client=(client_ip, 50000)
            )
        else:
            from werkzeug.test import Client

            self._wsgi_client = Client(app)

    def url(self, path: str) -> str:
        return BASE + self.root_path + path

    def request(self, method: str, path: str, headers: Headers = (), *, query: str = "") -> Resp:
        if self.asgi:
            target = path + ("?" + query if query else "")
            r = self._asgi_client.request(method, target, headers=list(headers))
            pairs = [(k.lower(), v) for k, v in r.headers.multi_items()]
            return Resp(r.status_code, pairs, r.content)
        w = self._wsgi_client.open(
            path,
            method=method,
            headers=list(headers),
            query_string=query,
            base_url=BASE + self.root_path,
            environ_base={"REMOTE_ADDR": self.client_ip},
        )
        pairs = [(k.lower(), v) for k, v in w.headers.to_wsgi_list()]
        return Resp(w.status_code, pairs, w.get_data())

    def get(self, path: str, headers: Headers = (), **kw: Any) -> Resp:
        return self.request("GET", path, headers, **kw)


@contextmanager
def open_harness(
    framework: str,
    settings: Mapping[str, Any],
    *,
    client_ip: str = "192.0.2.10",
    root_path: str = "",
    **kw: Any,
) -> Iterator[Harness]:
    """``kw`` goes to the middleware (e.g. ``store=``)."""
    app = BUILDERS[framework](settings, **kw)
    if framework.startswith("django"):
        with django_urls():
            yield Harness(framework, app, client_ip=client_ip, root_path=root_path)
    else:
        yield Harness(framework, app, client_ip=client_ip, root_path=root_path)
