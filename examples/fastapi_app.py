"""FastAPI behind DPoPMiddleware.

Run:    .venv/bin/uvicorn examples.fastapi_app:app
Call:   .venv/bin/python -m examples.client http://127.0.0.1:8000/me

Path operations take the verified result with the ``DPoPAuth`` dependency (401 if absent).
"""

from __future__ import annotations

from fastapi import FastAPI

from dpop_middleware import DPoPMiddleware
from dpop_middleware.fastapi import DPoPAuth
from examples.local_issuer import SETTINGS, issuer

app = FastAPI()
app.add_middleware(DPoPMiddleware, settings=SETTINGS)


@app.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}  # in exclude_paths: no DPoP needed


@app.get("/me")
def me(dpop: DPoPAuth) -> dict[str, object]:
    return {
        "sub": dpop.subject,
        "scheme": dpop.scheme,
        "jkt": dpop.jkt,
        "scope": dpop.claims.get("scope"),
    }


__all__ = ["app", "issuer"]
