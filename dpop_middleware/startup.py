"""Start-up failures under Starlette's lazy middleware stack (Starlette, FastAPI).

``app.add_middleware(DPoPMiddleware, settings=...)`` and ``Starlette(middleware=[...])`` only
record the middleware; Starlette builds it on the app's first ASGI call, which under uvicorn is the
``lifespan`` startup. A :class:`~dpop_middleware.ConfigurationError` raised there is taken by
uvicorn (``--lifespan auto``, its default) as "lifespan unsupported": the server starts anyway and
answers every request with a 500 and a traceback in its log.

So when the middleware is built there and its settings are bad, it does not raise: it becomes
:class:`FailedStartup`, which fails the ``lifespan`` startup with the error's message (uvicorn logs
it and exits non-zero) and answers any request that still comes (no lifespan: ``--lifespan off``)
with a 500 that carries neither a traceback nor a setting. Built anywhere else, including by a
direct call to ``build_middleware_stack`` at import time, the middleware raises at once.

This module imports nothing from Starlette: it recognises Starlette's frames by the loaded module.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from dpop_middleware.logfields import log_extra

logger = logging.getLogger("dpop_middleware")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Frames between the middleware's ``__init__`` and Starlette's ``build_middleware_stack`` (one,
#: or a few with subclasses and factories).
_MAX_DEPTH = 8
_BODY = json.dumps({
    "error": "server_error",
    "error_description": "The DPoP middleware is misconfigured; see the server log",
}).encode()  # fmt: skip


def built_lazily_by_starlette() -> bool:
    """True when the caller is being built by a Starlette app's ``build_middleware_stack``, itself
    called from a coroutine (the app's ``__call__``: the first ASGI call)."""
    applications = sys.modules.get("starlette.applications")
    if applications is None:
        return False
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return False
        if frame.f_code.co_name == "build_middleware_stack" and isinstance(
            frame.f_locals.get("self"), applications.Starlette
        ):
            caller = frame.f_back
            return caller is not None and bool(caller.f_code.co_flags & inspect.CO_COROUTINE)
    return False


class FailedStartup:
    """What a middleware with bad settings serves when Starlette built it lazily.

    ``lifespan``: ``lifespan.startup.failed`` with the error's message, then the error raised, as
    Starlette's own router does (uvicorn exits; Starlette's ``TestClient`` raises it).
    ``http``: a 500 JSON refusal. ``websocket``: closed before accept with 1011 (internal error).
    The error is logged once, at ERROR, when this is built.
    """

    def __init__(self, error: Exception) -> None:
        self.error = error
        logger.error(
            "dpop startup_failed: %s",
            error,
            extra=log_extra("startup_failed", {"cause": str(error)}),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.failed", "message": str(self.error)})
                raise self.error
            return
        if kind == "http":
            headers = [
                (b"content-type", b"application/json"),
                (b"cache-control", b"no-store"),
                (b"content-length", str(len(_BODY)).encode()),
            ]
            body = b"" if scope["method"] == "HEAD" else _BODY  # HEAD: no body, RFC 9110 9.3.2
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if kind == "websocket":
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1011})
