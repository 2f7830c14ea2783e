"""Flask with Prometheus metrics: the middleware counts, ``/metrics`` exposes.

Run:    .venv/bin/gunicorn examples.metrics_flask:app
Scrape: curl http://127.0.0.1:8000/metrics

gunicorn with several workers: export ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, emptied
at every start) and, in ``gunicorn.conf.py``::

    from prometheus_client import multiprocess

    def child_exit(server, worker):
        multiprocess.mark_process_dead(worker.pid)

``/metrics`` is left out of DPoP (``exclude_paths``): serve it on a private network or port.
"""

from __future__ import annotations

from flask import Flask, request
from prometheus_client import make_wsgi_app
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from dpop_middleware import DPoPResult, DPoPWSGIMiddleware
from dpop_middleware.prometheus import metrics_registry
from examples.local_issuer import SETTINGS, issuer

METRICS_SETTINGS = {**SETTINGS, "metrics": True, "exclude_paths": ["/health", "/metrics"]}

app = Flask(__name__)
# DPoP around the whole dispatcher: /metrics is excluded, as in the ASGI example, so that a
# refusal count never misses a request the middleware saw.
app.wsgi_app = DPoPWSGIMiddleware(  # type: ignore[method-assign]
    DispatcherMiddleware(app.wsgi_app, {"/metrics": make_wsgi_app(metrics_registry())}),
    settings=METRICS_SETTINGS,
)


@app.get("/me")
def me() -> dict[str, object]:
    result: DPoPResult = request.environ["dpop"]
    return {"sub": result.subject, "jkt": result.jkt}


__all__ = ["app", "issuer"]
