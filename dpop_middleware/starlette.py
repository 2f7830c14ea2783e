"""Starlette: require DPoP (and scopes) on one route, function or class, HTTP or websocket::

    from dpop_middleware.starlette import dpop_required

    @dpop_required(scopes=["write"])
    async def create(request: Request) -> Response: ...

    @dpop_required(scopes=["admin"])
    class Admin(HTTPEndpoint): ...

    routes = [Route("/items", create, methods=["POST"]), Route("/admin", Admin)]

A request that does not pass is refused exactly as :class:`~dpop_middleware.DPoPMiddleware`
refuses (status, challenge, JSON body, log line, ``on_refusal``): 403 ``insufficient_scope`` when
a scope is missing, 401 when the middleware verified nothing (an ``exclude_paths`` path, a
preflight, ``report_only``). A websocket is refused before accept: with the HTTP refusal where
the server supports ``websocket.http.response``, else by closing with 1008.

This is the only module that imports Starlette for this purpose; it needs the middleware in front.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.websockets import WebSocket

from dpop_middleware.asgi import Receive, Scope, Send, _deny_websocket, _send_refusal
from dpop_middleware.core.verifier import Refusal
from dpop_middleware.routes import asgi_refusal, route_claims, route_scopes
from dpop_middleware.settings import ClaimRequirements

__all__ = ["dpop_required", "refusal_response"]

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def refusal_response(refusal: Refusal) -> Response:
    """The refusal as a Starlette response (the headers the middleware sends)."""
    return Response(refusal.body, status_code=refusal.status, headers=dict(refusal.headers))


class _GuardedApp:
    """An ASGI endpoint (an ``HTTPEndpoint`` / ``WebSocketEndpoint`` class) behind the check."""

    def __init__(
        self, app: Callable[..., Any], scopes: tuple[str, ...], claims: ClaimRequirements
    ) -> None:
        self.app = app
        self.scopes = scopes
        self.claims = claims
        functools.update_wrapper(self, app, updated=())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = await asgi_refusal(scope, self.scopes, self.claims)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await _send_refusal(send, refusal, head=scope["method"] == "HEAD")
        else:
            await _deny_websocket(scope, receive, send, refusal)


def dpop_required(
    *, scopes: str | Iterable[str] = (), claims: Mapping[str, Any] | None = None
) -> Callable[[Endpoint], Endpoint]:
    """Require a verified DPoP (or, in ``dpop_or_bearer`` mode, Bearer) token with every scope in
    ``scopes`` (and every claim value in ``claims``) on a Starlette endpoint: a request/websocket
    function (sync or async) or an ``HTTPEndpoint`` / ``WebSocketEndpoint`` class. Both are
    checked here, at start-up."""
    needed = route_scopes(scopes, "dpop_required(scopes=...)")
    required = route_claims(claims, "dpop_required(claims=...)")

    def decorate(endpoint: Endpoint) -> Endpoint:
        if inspect.isclass(endpoint):
            return cast(Endpoint, _GuardedApp(endpoint, needed, required))
        is_async = inspect.iscoroutinefunction(endpoint)

        @functools.wraps(endpoint)
        async def guarded(connection: HTTPConnection, *args: Any, **kwargs: Any) -> Any:
            scope = connection.scope
            refusal = await asgi_refusal(scope, needed, required)
            if refusal is not None:
                if scope["type"] == "http":
                    return refusal_response(refusal)
                # A websocket function: deny through the socket's own receive/send.
                assert isinstance(connection, WebSocket)
                await _deny_websocket(scope, connection.receive, connection.send, refusal)
                return None
            if is_async:
                return await endpoint(connection, *args, **kwargs)
            return await run_in_threadpool(endpoint, connection, *args, **kwargs)

        return cast(Endpoint, guarded)

    return decorate
