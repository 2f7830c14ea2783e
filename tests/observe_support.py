"""One bare app behind the ASGI or the WSGI middleware, driven through a test client, for the
observability tests (metrics, spans, log fields)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from test_frameworks_support import starlette_test_client
from werkzeug.test import Client

from dpop_middleware import DPoPMiddleware, DPoPWSGIMiddleware
from dpop_middleware.errors import ReplayStoreError

KINDS = ("asgi", "wsgi")


class FailingStore:
    def add(self, key: bytes, ttl: float) -> bool:
        raise ReplayStoreError("connection refused")

    def close(self) -> None:
        pass


class AsyncFailingStore:
    async def add(self, key: bytes, ttl: float) -> bool:
        raise ReplayStoreError("connection refused")

    async def aclose(self) -> None:
        pass


class Api:
    """``get(path, headers)`` -> status, against a tiny app that answers 200 ``ok``.

    ``inner`` runs inside the app (for spans the application makes itself); ``wrap`` wraps the
    middleware (for a server span around it)."""

    def __init__(
        self,
        kind: str,
        settings: dict[str, Any],
        *,
        store_down: bool = False,
        inner: Callable[[], None] | None = None,
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        self.kind = kind
        self.base = "http://testserver" if kind == "asgi" else "http://localhost"
        if kind == "asgi":

            async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
                if inner is not None:
                    inner()
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"ok"})

            store = AsyncFailingStore() if store_down else None
            app: Any = DPoPMiddleware(asgi_app, settings=settings, store=store)
            self._client: Any = starlette_test_client()(wrap(app) if wrap else app)
        else:

            def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
                if inner is not None:
                    inner()
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok"]

            wstore = FailingStore() if store_down else None
            app = DPoPWSGIMiddleware(wsgi_app, settings=settings, store=wstore)
            self._client = Client(wrap(app) if wrap else app)

    def get(self, path: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        resp = self._client.get(path, headers=list(headers))
        return int(resp.status_code)
