"""Starlette with Prometheus metrics: the middleware counts, ``/metrics`` exposes.

Run:    .venv/bin/uvicorn examples.metrics_starlette:app
Call:   .venv/bin/python -m examples.client http://127.0.0.1:8000/me
Scrape: curl http://127.0.0.1:8000/metrics

Several workers (``uvicorn --workers 4``, gunicorn): export ``PROMETHEUS_MULTIPROC_DIR`` (an
empty directory) before starting; ``metrics_registry()`` then adds up every worker's numbers.
``/metrics`` is left out of DPoP (``exclude_paths``): serve it on a private network or port.
"""

from __future__ import annotations

from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from dpop_middleware import DPoPMiddleware, DPoPResult
from dpop_middleware.prometheus import metrics_registry
from examples.local_issuer import SETTINGS, issuer

#: The example settings plus ``metrics`` (the default registry); /metrics needs no DPoP.
METRICS_SETTINGS = {**SETTINGS, "metrics": True, "exclude_paths": ["/health", "/metrics"]}


async def me(request: Request) -> JSONResponse:
    result: DPoPResult = request.scope["dpop"]
    return JSONResponse({"sub": result.subject, "jkt": result.jkt})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/me", me),
        Route("/health", health),
        Mount("/metrics", app=make_asgi_app(registry=metrics_registry())),
    ],
    middleware=[Middleware(DPoPMiddleware, settings=METRICS_SETTINGS)],
)

__all__ = ["METRICS_SETTINGS", "app", "issuer"]
