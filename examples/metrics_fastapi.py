"""FastAPI with Prometheus metrics: the middleware counts, ``/metrics`` exposes.

Run:    .venv/bin/uvicorn examples.metrics_fastapi:app
Scrape: curl http://127.0.0.1:8000/metrics

Several workers: see ``examples/metrics_starlette.py`` (``PROMETHEUS_MULTIPROC_DIR``).
"""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import make_asgi_app

from dpop_middleware import DPoPMiddleware
from dpop_middleware.fastapi import DPoPAuth
from dpop_middleware.prometheus import metrics_registry
from examples.metrics_starlette import METRICS_SETTINGS, issuer

app = FastAPI()
app.add_middleware(DPoPMiddleware, settings=METRICS_SETTINGS)
app.mount("/metrics", make_asgi_app(registry=metrics_registry()))


@app.get("/me")
def me(dpop: DPoPAuth) -> dict[str, object]:
    return {"sub": dpop.subject, "jkt": dpop.jkt}


__all__ = ["app", "issuer"]
