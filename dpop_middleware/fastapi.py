"""FastAPI dependencies that hand a path operation the verified DPoP result.

:class:`~dpop_middleware.DPoPMiddleware` puts the :class:`~dpop_middleware.DPoPResult` in
``scope["dpop"]``; these dependencies read it from there::

    from dpop_middleware.fastapi import DPoPAuth

    @app.get("/me")
    def me(dpop: DPoPAuth) -> dict[str, object]:
        return {"sub": dpop.subject, "scheme": dpop.scheme}

The result is absent when the middleware did not verify the request: an ``exclude_paths`` path, an
``OPTIONS`` preflight, a would-be refusal in ``report_only`` mode, or no middleware at all.
:func:`require_dpop` then answers 401 (or closes a websocket with 1008), so such a route can never
run unauthenticated; :func:`optional_dpop` returns ``None`` instead.

This is the only module that imports FastAPI.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, WebSocketException, status
from starlette.requests import HTTPConnection

from dpop_middleware.core.verifier import DPoPResult

__all__ = ["DPoPAuth", "OptionalDPoPAuth", "optional_dpop", "require_dpop"]


def optional_dpop(connection: HTTPConnection) -> DPoPResult | None:
    """The verified result for this request or websocket, or ``None``."""
    result = connection.scope.get("dpop")
    return result if isinstance(result, DPoPResult) else None


def require_dpop(connection: HTTPConnection) -> DPoPResult:
    """The verified result; 401 (websocket: close 1008) when the middleware verified nothing."""
    result = optional_dpop(connection)
    if result is not None:
        return result
    if connection.scope["type"] == "websocket":
        raise WebSocketException(
            code=status.WS_1008_POLICY_VIOLATION, reason="DPoP authentication required"
        )
    # RFC 6750 section 3.1: no verified credentials, so a challenge without an error code.
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="DPoP authentication required",
        headers={"WWW-Authenticate": "DPoP", "Cache-Control": "no-store"},
    )


#: ``dpop: DPoPAuth`` in a path operation's parameters: the result, or 401.
DPoPAuth = Annotated[DPoPResult, Depends(require_dpop)]
#: ``dpop: OptionalDPoPAuth``: the result, or ``None``.
OptionalDPoPAuth = Annotated[DPoPResult | None, Depends(optional_dpop)]
