"""DPoP for MCP servers: the SEP-1932 profile and RFC 9728 metadata around any MCP ASGI app.

Three lines protect a server built with the official MCP Python SDK (streamable HTTP)::

    from dpop_middleware.mcp import protect_mcp
    app = protect_mcp(server.streamable_http_app(), resource="https://tools.example/mcp",
                      authorization_servers=["https://as.example"], jwks_uri="https://as.example/jwks")

The profile (SEP-1932, DPoP for MCP, adopts RFC 9449 as is):

* every refusal of the request's credentials is ``401`` with the ``DPoP`` challenge
  (``always_401``: a ``400 invalid_request`` keeps its error code but becomes a ``401``); a
  ``503`` (replay store or JWK Set unreachable) stays a ``503``: it is not the client's fault;
* ``iat`` within +-5 minutes, always, with or without server nonces (``proof_max_age`` and
  ``clock_skew`` 300 s; ``nonce.freshness="nonce_only"`` is refused);
* the token's ``aud`` is the resource (``audience`` defaults to it), the proof's ``htu`` is
  built on the resource's scheme and host (with the server's mount prefix);
* RFC 9728 metadata is served and every challenge names it (``resource_metadata``).

Tools read who called with :func:`caller`. This module does not import the MCP SDK (it wraps any
ASGI app and reads the Starlette request the SDK hands tools), so ``import dpop_middleware.mcp``
works without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dpop_middleware.asgi import ASGIApp, DPoPMiddleware
from dpop_middleware.core.verifier import DPoPResult
from dpop_middleware.errors import ConfigurationError
from dpop_middleware.replay.base import AsyncReplayStore

#: SEP-1932: the proof's ``iat`` within five minutes of the server's clock, both ways.
IAT_WINDOW = 300.0


def mcp_settings(
    *,
    resource: str,
    authorization_servers: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """The settings dict of the MCP profile; ``settings`` are passed through (and win), except
    what would break the profile. ``metadata`` adds RFC 9728 members (``scopes_supported``...).
    ``issuer`` defaults to the only authorization server when there is one."""
    if settings.get("always_401") is False:
        raise ConfigurationError("dpop_middleware.mcp: the MCP profile answers every refusal 401")
    nonce = settings.get("nonce")
    if isinstance(nonce, Mapping) and nonce.get("freshness") == "nonce_only":
        raise ConfigurationError(
            "dpop_middleware.mcp: 'nonce.freshness' 'nonce_only' is not allowed in the MCP profile "
            "(SEP-1932 checks iat always); leave it at 'iat_and_nonce'"
        )
    servers = list(authorization_servers) if not isinstance(authorization_servers, str) else None
    document: dict[str, Any] = {
        **(metadata or {}),
        "resource": resource,
        "authorization_servers": servers if servers is not None else authorization_servers,
    }
    profile: dict[str, Any] = {
        "proof_max_age": IAT_WINDOW,
        "clock_skew": IAT_WINDOW,
        "always_401": True,
        "resource_metadata": document,
    }
    if servers is not None and len(servers) == 1 and "token_verifier" not in settings:
        profile["issuer"] = servers[0]
    return {**profile, **settings}


def protect_mcp(
    app: ASGIApp,
    *,
    resource: str,
    authorization_servers: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
    store: AsyncReplayStore | None = None,
    **settings: Any,
) -> DPoPMiddleware:
    """Wrap an MCP server's ASGI app (e.g. ``server.streamable_http_app()``) in the MCP profile.

    Settings are validated now, so a mistake stops start-up. Keyword ``settings`` are any of the
    middleware's settings (``jwks_uri`` or ``jwks``, ``nonce``, ``replay_store``...)."""
    return DPoPMiddleware(
        app,
        mcp_settings(
            resource=resource,
            authorization_servers=authorization_servers,
            metadata=metadata,
            **settings,
        ),
        store=store,
    )


@dataclass(frozen=True, slots=True)
class MCPCaller:
    """Who called a tool: from the verified access token and DPoP proof."""

    subject: str | None
    scopes: frozenset[str]
    #: RFC 7638 thumbprint of the client's DPoP key (None for a Bearer token in migration mode).
    jkt: str | None
    client_id: str | None
    claims: Mapping[str, Any]
    result: DPoPResult


def caller(ctx: Any) -> MCPCaller:
    """The verified caller of the current MCP request, from a tool's ``ctx`` (the SDK's
    ``Context``), its ``ctx.request_context``, or the Starlette ``Request``.

    The SDK hands each request's Starlette ``Request`` to handlers as
    ``ctx.request_context.request``; the middleware put the result in its ``scope["dpop"]``.
    Raises ``LookupError`` when the request was not verified (no middleware, stdio transport, an
    excluded path): a tool must not run as nobody.
    """
    request = ctx
    for attribute in ("request_context", "request"):
        if not hasattr(request, "scope"):
            request = getattr(request, attribute, None)
    scope = getattr(request, "scope", None)
    result = scope.get("dpop") if isinstance(scope, Mapping) else None
    if not isinstance(result, DPoPResult):
        raise LookupError("no verified DPoP result for this MCP request")
    claims = result.claims
    client_id = claims.get("client_id")
    return MCPCaller(
        subject=result.subject,
        scopes=result.scopes,  # the same parse as the middleware's scope rules (scope or scp)
        jkt=result.jkt,
        client_id=client_id if isinstance(client_id, str) else None,
        claims=claims,
        result=result,
    )


__all__ = ["IAT_WINDOW", "MCPCaller", "caller", "mcp_settings", "protect_mcp"]
