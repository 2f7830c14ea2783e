"""A plain WSGI app behind :class:`DPoPWSGIMiddleware`: ``gunicorn tests.apps.wsgi_app:app``.

Same behaviour as :mod:`tests.apps.asgi_app`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from dpop_middleware import DPoPWSGIMiddleware
from tests.apps.settings import load


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    result = environ.get("dpop")
    body = json.dumps({
        "pid": os.getpid(),
        "sub": result.claims.get("sub") if result is not None else None,
    }).encode()  # fmt: skip
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


app = DPoPWSGIMiddleware(hello, load())
