"""Flask: require DPoP (and scopes) on a view, and read the result without a ``KeyError``::

    from dpop_middleware.flask import dpop_required, dpop_result

    @app.post("/items")
    @dpop_required(scopes=["write"])
    def create() -> dict[str, object]:
        return {"sub": dpop_result().subject}

:func:`dpop_required` refuses exactly as :class:`~dpop_middleware.DPoPWSGIMiddleware` does
(status, challenge, JSON body, log line, ``on_refusal``): 403 ``insufficient_scope`` when a scope
is missing, 401 when the middleware verified nothing (an ``exclude_paths`` path, a preflight,
``report_only``). :func:`dpop_result` returns the result or ``None``.

Flask is imported only here (and only when this module is imported).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

from flask import Response, request

from dpop_middleware.core.verifier import DPoPResult, Refusal
from dpop_middleware.routes import (
    header_name,
    result_of,
    route_claims,
    route_scopes,
    wsgi_refusal,
)

__all__ = ["dpop_required", "dpop_result", "refusal_response"]

View = TypeVar("View", bound=Callable[..., Any])


def dpop_result() -> DPoPResult | None:
    """The verified result for the current request, or ``None`` when the middleware verified
    nothing (an excluded path, a passed preflight, ``report_only``)."""
    return result_of(request.environ)


def refusal_response(refusal: Refusal) -> Response:
    """The refusal as a Flask response (the headers the middleware sends)."""
    headers = [(header_name(name), value) for name, value in refusal.headers]
    return Response(refusal.body, status=refusal.status, headers=headers)


def dpop_required(
    *, scopes: str | Iterable[str] = (), claims: Mapping[str, Any] | None = None
) -> Callable[[View], View]:
    """Require a verified token with every scope in ``scopes`` (and every claim value in
    ``claims``) on a Flask view (sync or async). Both are checked here, at start-up."""
    needed = route_scopes(scopes, "dpop_required(scopes=...)")
    required = route_claims(claims, "dpop_required(claims=...)")

    def decorate(view: View) -> View:
        if inspect.iscoroutinefunction(view):

            @functools.wraps(view)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                refusal = wsgi_refusal(request.environ, needed, required)
                if refusal is not None:
                    return refusal_response(refusal)
                return await view(*args, **kwargs)

            return cast(View, guarded_async)

        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            refusal = wsgi_refusal(request.environ, needed, required)
            if refusal is not None:
                return refusal_response(refusal)
            return view(*args, **kwargs)

        return cast(View, guarded)

    return decorate
