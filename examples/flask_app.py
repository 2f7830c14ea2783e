"""Flask behind DPoPWSGIMiddleware.

Run:    .venv/bin/flask --app examples.flask_app run
   or:  .venv/bin/gunicorn examples.flask_app:app
Call:   .venv/bin/python -m examples.client http://127.0.0.1:5000/me   (gunicorn: port 8000)

The verified result is in ``request.environ["dpop"]``.
"""

from __future__ import annotations

from flask import Flask, request

from dpop_middleware import DPoPResult, DPoPWSGIMiddleware
from examples.local_issuer import SETTINGS, issuer

app = Flask(__name__)
app.wsgi_app = DPoPWSGIMiddleware(app.wsgi_app, settings=SETTINGS)  # type: ignore[method-assign]


@app.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}  # in exclude_paths: no DPoP needed


@app.get("/me")
def me() -> dict[str, object]:
    result: DPoPResult = request.environ["dpop"]
    return {
        "sub": result.subject,
        "scheme": result.scheme,
        "jkt": result.jkt,
        "scope": result.claims.get("scope"),
    }


__all__ = ["app", "issuer"]
