"""The applications the HTTP rows serve: a minimal ``GET /items`` answering ``ok``, bare or behind
the middleware. Servers load them as factories; the middleware settings (issuer, audience, public
JWK Set, replay store) come from the JSON file named by ``$DPOP_BENCH_SETTINGS``.

    uvicorn --factory benchmarks.apps:starlette_plain | benchmarks.apps:starlette_dpop
    gunicorn 'benchmarks.apps:flask_plain()'         | 'benchmarks.apps:flask_dpop()'
"""

from __future__ import annotations

import json
import os
from typing import Any

SETTINGS_ENV = "DPOP_BENCH_SETTINGS"


def _settings() -> dict[str, Any]:
    with open(os.environ[SETTINGS_ENV], encoding="utf-8") as file:
        settings: dict[str, Any] = json.load(file)
    return settings


def _starlette(middleware: list[Any]) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def items(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/items", items)], middleware=middleware)


def starlette_plain() -> Any:
    return _starlette([])


def starlette_dpop() -> Any:
    from starlette.middleware import Middleware

    from dpop_middleware import DPoPMiddleware

    return _starlette([Middleware(DPoPMiddleware, settings=_settings())])


def flask_plain() -> Any:
    from flask import Flask

    app = Flask("dpop_bench")

    @app.get("/items")
    def items() -> str:
        return "ok"

    return app


def flask_dpop() -> Any:
    from dpop_middleware import DPoPWSGIMiddleware

    app = flask_plain()
    app.wsgi_app = DPoPWSGIMiddleware(app.wsgi_app, settings=_settings())
    return app
