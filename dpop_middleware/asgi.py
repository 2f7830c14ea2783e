"""``DPoPMiddleware``: pure ASGI (Starlette, FastAPI, Django ASGI, any ASGI 3 app).

Configuration work happens once in ``__init__``; ``__call__`` keeps per-request state in locals.
Non-HTTP scopes other than websockets (``lifespan``) pass through untouched. A websocket
handshake is checked like a ``GET`` of the same URL with ``http``/``https`` in ``htu``, and refused
before accept: with a denial response where the server supports the
``websocket.http.response`` extension, else by closing with code 1008 (policy violation).
Response headers the verifier asks for (a fresh ``DPoP-Nonce`` with ``Cache-Control: no-store``)
replace the application's own headers of those names at ``http.response.start`` or
``websocket.accept``, so the client sees exactly one of each (RFC 9449 section 8).
The replay store is async (never blocks the loop); it is built at start-up and opens its
connections on first use, so each worker process after a fork gets its own connection pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from dpop_middleware.core.metadata import Reply
from dpop_middleware.core.request import RequestInfo, encoded_path
from dpop_middleware.core.verifier import Header, Refusal
from dpop_middleware.errors import ConfigurationError, ReplayStoreError
from dpop_middleware.flow import ENGINE_KEY, Engine, RouteRefusedError
from dpop_middleware.replay import create_async_store
from dpop_middleware.replay.base import AsyncReplayStore
from dpop_middleware.settings import Settings
from dpop_middleware.startup import FailedStartup, built_lazily_by_starlette

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_WS_SCHEMES = {"ws": "http", "wss": "https"}


def request_info(scope: Scope) -> RequestInfo:
    """The neutral request view of an ASGI ``http`` or ``websocket`` scope."""
    websocket = scope["type"] == "websocket"
    scheme: str = scope.get("scheme") or ("ws" if websocket else "http")
    root: str = scope.get("root_path", "")
    path: str = scope["path"]
    # ASGI puts the mount prefix in both ``root_path`` and ``path``; older servers and test
    # clients leave it out of ``path``. Strip it only at a segment boundary.
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root) :]
    raw = scope.get("raw_path")
    client = scope.get("client")
    server = scope.get("server")
    return RequestInfo(
        method="GET" if websocket else scope["method"],
        scheme=_WS_SCHEMES.get(scheme, scheme),
        path=encoded_path(path.encode(), raw.decode("latin-1") if raw else None, root),
        root_path=encoded_path(root.encode(), None),
        headers=tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in scope.get("headers", ())
        ),
        query_string=scope.get("query_string", b"").decode("latin-1"),
        client_ip=client[0] if client else None,
        server=(server[0], server[1]) if server else None,
        route_path=path or "/",  # what the application's router matches (Starlette: ``path``)
    )


def _encode(headers: tuple[Header, ...]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


class DPoPMiddleware:
    """Wrap an ASGI app: ``DPoPMiddleware(app, settings={...})``.

    The verified :class:`~dpop_middleware.DPoPResult` is put in ``scope["dpop"]``.
    ``store`` overrides the ``replay_store`` setting with a ready :class:`AsyncReplayStore`.
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Mapping[str, Any] | Settings,
        *,
        store: AsyncReplayStore | None = None,
    ) -> None:
        self.app = app
        self.failed: FailedStartup | None = None
        try:
            config = settings if isinstance(settings, Settings) else Settings.from_dict(settings)
            self.settings, self.engine = config, Engine(config)
            # Built now, so a bad store setting or a failed ``ping_on_startup`` stops start-up;
            # the stores open their connections on first use, and again after a fork.
            if store is None:
                store = create_async_store(config.replay_store, replay_ttl=config.replay_ttl)
            self.store: AsyncReplayStore = store
            _install_route_refusal_handler(app)
        except (ConfigurationError, ReplayStoreError) as exc:
            # Built by Starlette on the first ASGI call, raising would not stop the server
            # (dpop_middleware.startup): fail the lifespan startup instead.
            if not built_lazily_by_starlette():
                raise
            self.failed = FailedStartup(exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.failed is not None:
            await self.failed(scope, receive, send)
            return
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request = request_info(scope)
        if kind == "http" and (reply := self.engine.reply(request)) is not None:
            await _send_refusal(send, reply, head=scope["method"] == "HEAD")  # RFC 9728 document
            return
        outcome = await self.engine.run_async(request, self.store)
        if outcome.refusal is not None:
            if kind == "http":
                await _send_refusal(send, outcome.refusal, head=scope["method"] == "HEAD")
            else:
                await _deny_websocket(scope, receive, send, outcome.refusal)
            return
        scope = dict(scope)
        # The per-route helpers (dpop_middleware.routes) refuse through this Engine.
        scope[ENGINE_KEY] = self.engine
        if outcome.result is not None:
            scope["dpop"] = outcome.result
        extra = outcome.response_headers
        if not extra:
            await self._call_app(scope, receive, send)
            return
        names = {name.encode("latin-1") for name, _ in extra}
        added = _encode(extra)

        async def send_with_headers(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = dict(message)
                # Replace, never duplicate: exactly one DPoP-Nonce (RFC 9449 section 8).
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in names]
                message["headers"] = kept + added
            await send(message)

        await self._call_app(scope, receive, send_with_headers)

    async def _call_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except RouteRefusedError as refused:
            # A FastAPI dependency (dpop_middleware.fastapi) refused before the route ran: the
            # refusal is already logged; send it as the middleware's own.
            if scope["type"] == "http":
                await _send_refusal(send, refused.refusal, head=scope["method"] == "HEAD")
            else:
                await _deny_websocket(scope, receive, send, refused.refusal)


def _install_route_refusal_handler(app: ASGIApp) -> None:
    """Wrapped around a Starlette/FastAPI app from outside (``DPoPMiddleware(FastAPI(), ...)``),
    a route helper's :class:`RouteRefusedError` would first reach the app's own
    ``ServerErrorMiddleware`` and become a 500. Registering a handler on the app (its middleware
    stack is built later, on the first call) renders it inside the app, exactly as the middleware
    would. Duck-typed: this module imports no framework."""
    add = getattr(app, "add_exception_handler", None)
    if callable(add) and getattr(app, "middleware_stack", False) is None:
        add(RouteRefusedError, _route_refusal_handler)


async def _route_refusal_handler(connection: Any, exc: Exception) -> Any:
    assert isinstance(exc, RouteRefusedError)
    refusal = exc.refusal
    scope = connection.scope
    if scope["type"] == "websocket":
        await _deny_websocket(scope, connection.receive, connection.send, refusal)
        return None

    async def respond(scope: Scope, receive: Receive, send: Send) -> None:
        await _send_refusal(send, refusal, head=scope["method"] == "HEAD")

    return respond  # Starlette calls what a handler returns as an ASGI app


def _refusal_headers(refusal: Refusal | Reply) -> list[tuple[bytes, bytes]]:
    return [*_encode(refusal.headers), (b"content-length", str(len(refusal.body)).encode())]


async def _send_refusal(send: Send, refusal: Refusal | Reply, *, head: bool = False) -> None:
    headers = _refusal_headers(refusal)
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    # A HEAD response has no body (RFC 9110 section 9.3.2); Content-Length stays.
    await send({"type": "http.response.body", "body": b"" if head else refusal.body})


async def _deny_websocket(scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
    """Refuse a handshake before accept: the refusal as an HTTP response where the server offers
    the ``websocket.http.response`` extension, else a close with 1008 (the server answers 403)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return  # the client went away first
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = _refusal_headers(refusal)
        await send(
            {"type": "websocket.http.response.start", "status": refusal.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": refusal.body})
        return
    await send({"type": "websocket.close", "code": 1008, "reason": refusal.error.reason})
