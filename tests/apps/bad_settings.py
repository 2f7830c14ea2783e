"""Apps whose ``DPoPMiddleware`` has a bad setting, added the way Starlette and FastAPI add
middleware: the stack, and so the middleware, is built lazily on the first ASGI call.

``uvicorn tests.apps.bad_settings:fastapi_app`` / ``:starlette_app`` must not start. Each app has
an open ``/health`` route that answers 200 if it ever serves a request.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dpop_middleware import DPoPMiddleware
from dpop_middleware.testing import TokenIssuer

BAD_KEY = "replay_sotre"
BAD: dict[str, Any] = {
    **TokenIssuer(audience="https://api.example").settings(),
    "exclude_paths": ["/health"],
    BAD_KEY: "memory://",
}


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


fastapi_app = FastAPI()
fastapi_app.add_api_route("/health", health)
fastapi_app.add_middleware(DPoPMiddleware, settings=BAD)

starlette_app = Starlette(
    routes=[Route("/health", health)], middleware=[Middleware(DPoPMiddleware, settings=BAD)]
)
