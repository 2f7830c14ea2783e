"""A pure ASGI app behind :class:`DPoPMiddleware`: ``uvicorn tests.apps.asgi_app:app``.

``/health`` is left unprotected (``exclude_paths`` in the settings file); every other path
answers 200 with the token's ``sub`` and the worker's pid as JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dpop_middleware import DPoPMiddleware
from tests.apps.settings import load


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    result = scope.get("dpop")
    body = json.dumps({
        "pid": os.getpid(),
        "sub": result.claims.get("sub") if result is not None else None,
    }).encode()  # fmt: skip
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = DPoPMiddleware(hello, load())
