"""FastAPI dependencies that hand a path operation the verified DPoP result, and require scopes.

:class:`~dpop_middleware.DPoPMiddleware` puts the :class:`~dpop_middleware.DPoPResult` in
``scope["dpop"]``; these dependencies read it from there::

    from dpop_middleware.fastapi import DPoPAuth, DPoPScopes

    @app.get("/me")
    def me(dpop: DPoPAuth) -> dict[str, object]:
        return {"sub": dpop.subject, "scheme": dpop.scheme}

    @app.post("/items")
    def create(dpop: Annotated[DPoPResult, DPoPScopes("write")]) -> dict[str, str]: ...

:data:`require_dpop` is a security scheme (``type: http, scheme: DPoP`` in OpenAPI, RFC 9449
is in the IANA HTTP authentication scheme registry), so ``/docs`` shows which routes need DPoP
and which scopes. ``Security(require_dpop, scopes=[...])`` and ``SecurityScopes`` work as with
FastAPI's own schemes. A route that does not pass is refused exactly as the middleware refuses
(same status, challenge, JSON body, log line and ``on_refusal``): 403 ``insufficient_scope``
when a scope is missing, 401 when the middleware verified nothing (an ``exclude_paths`` path, a
preflight, a would-be refusal in ``report_only`` mode). A dependency cannot return a response,
so it raises :class:`~dpop_middleware.flow.RouteRefusedError`, which the middleware turns into
the refusal (a websocket is denied before accept, as the middleware does). Without the
middleware: 401 (websocket: close 1008). :func:`optional_dpop` returns ``None`` instead.

This is the only module that imports FastAPI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Security, WebSocketException, status
from fastapi.openapi.models import HTTPBase
from fastapi.security import SecurityScopes
from fastapi.security.base import SecurityBase
from starlette.requests import HTTPConnection

from dpop_middleware.core.verifier import DPoPResult
from dpop_middleware.flow import ENGINE_KEY, RouteRefusedError
from dpop_middleware.routes import asgi_refusal, result_of, route_claims, route_scopes

__all__ = [
    "DPoPAuth",
    "DPoPScopes",
    "DPoPSecurity",
    "OptionalDPoPAuth",
    "optional_dpop",
    "require_dpop",
]


def optional_dpop(connection: HTTPConnection) -> DPoPResult | None:
    """The verified result for this request or websocket, or ``None``."""
    return result_of(connection.scope)


class DPoPSecurity(SecurityBase):
    """The DPoP security scheme as a FastAPI dependency: the verified result, or a refusal.

    In OpenAPI: ``{"type": "http", "scheme": "DPoP"}`` named ``scheme_name``. Swagger UI lists it
    under "Authorize" but cannot sign proofs, so "Try it out" cannot call a protected route.
    """

    def __init__(
        self,
        *,
        claims: Mapping[str, Any] | None = None,
        scheme_name: str = "DPoP",
        description: str | None = None,
    ) -> None:
        #: Claim values every request through this dependency needs (403 ``claim_mismatch``).
        self.claims = route_claims(claims, "DPoPSecurity(claims=...)")
        self.model = HTTPBase(
            scheme="DPoP",
            description=description
            or "DPoP-bound access token (RFC 9449): 'Authorization: DPoP <token>' and a 'DPoP' "
            "proof header on every request",
        )
        self.scheme_name = scheme_name

    async def __call__(
        self, connection: HTTPConnection, security_scopes: SecurityScopes
    ) -> DPoPResult:
        scope = connection.scope
        scopes = security_scopes.scopes
        refusal = await asgi_refusal(scope, scopes, self.claims)
        if refusal is None:
            result = result_of(scope)
            assert result is not None  # asgi_refusal passed it
            return result
        if ENGINE_KEY in scope:
            raise RouteRefusedError(refusal)  # the middleware sends it
        if scope["type"] == "websocket":
            raise WebSocketException(
                code=status.WS_1008_POLICY_VIOLATION, reason="DPoP authentication required"
            )
        raise HTTPException(
            status_code=refusal.status,
            detail=refusal.error.description,
            headers={"WWW-Authenticate": "DPoP", "Cache-Control": "no-store"},
        )


#: ``Depends(require_dpop)`` / ``Security(require_dpop, scopes=[...])``: the result, or a refusal.
require_dpop = DPoPSecurity()


# CamelCase like FastAPI's own markers (Depends, Security).
def DPoPScopes(*scopes: str, claims: Mapping[str, Any] | None = None) -> Any:
    """``Security(require_dpop, scopes=[...])`` in one call, with the scope names checked when the
    route is declared: ``dpop: Annotated[DPoPResult, DPoPScopes("write")]`` or
    ``dependencies=[DPoPScopes("admin")]``. ``claims={"tenant": "acme"}`` also requires claim
    values (403, reason ``claim_mismatch``)."""
    checker = require_dpop if not claims else DPoPSecurity(claims=claims)
    return Security(checker, scopes=list(route_scopes(scopes, "DPoPScopes")))


#: ``dpop: DPoPAuth`` in a path operation's parameters: the result, or 401.
DPoPAuth = Annotated[DPoPResult, Depends(require_dpop)]
#: ``dpop: OptionalDPoPAuth``: the result, or ``None``.
OptionalDPoPAuth = Annotated[DPoPResult | None, Depends(optional_dpop)]
