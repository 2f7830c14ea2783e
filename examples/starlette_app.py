"""Starlette behind DPoPMiddleware.

Run:    .venv/bin/uvicorn examples.starlette_app:app
Call:   .venv/bin/python -m examples.client http://127.0.0.1:8000/me

The verified result is in ``request.scope["dpop"]`` (websockets: ``websocket.scope["dpop"]``).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from dpop_middleware import DPoPMiddleware, DPoPResult
from examples.local_issuer import SETTINGS, issuer


def describe(result: DPoPResult) -> dict[str, object]:
    return {
        "sub": result.subject,
        "scheme": result.scheme,
        "jkt": result.jkt,
        "scope": result.claims.get("scope"),
    }


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})  # in exclude_paths: no DPoP needed


async def me(request: Request) -> JSONResponse:
    result: DPoPResult = request.scope["dpop"]
    return JSONResponse(describe(result))


async def ws(websocket: WebSocket) -> None:
    # Reached only after the handshake passed the same checks as a GET of http(s)://.../ws.
    result: DPoPResult = websocket.scope["dpop"]
    await websocket.accept()
    await websocket.send_json(describe(result))
    await websocket.close()


app = Starlette(
    routes=[Route("/health", health), Route("/me", me), WebSocketRoute("/ws", ws)],
    middleware=[Middleware(DPoPMiddleware, settings=SETTINGS)],
)

__all__ = ["app", "issuer"]
