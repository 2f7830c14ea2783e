"""What every per-route helper shares: "does this request pass this route?" and, if not, the
refusal, logged, hooked and rendered by the middleware's own Engine (one behaviour for clients).

The adapters put their :class:`~dpop_middleware.flow.Engine` in the ASGI scope / WSGI environ
beside the result, so a helper needs nothing but the request. Two answers:

* nothing verified (an excluded path, a passed preflight, a ``report_only`` would-be refusal):
  401 with the challenge and no error code (RFC 6750 section 3.1), reason ``not_verified``;
* a verified token without every scope the route names: 403 ``insufficient_scope`` with the
  scopes on the challenge (RFC 6750 section 3.1, RFC 9449 section 7.1);
* a verified token without a claim value the route names (``claims``): 403, reason
  ``claim_mismatch``.

Without the middleware in front there is nothing to render with: the helper still refuses
(401, a bare ``DPoP`` challenge) and logs why. Framework-free: the helpers in ``fastapi.py``,
``starlette.py``, ``flask.py`` and ``django.py`` only copy the :class:`Refusal` out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from dpop_middleware.core.verifier import EXPOSE_HEADERS, NO_STORE, DPoPResult, Refusal
from dpop_middleware.errors import ConfigurationError, DPoPError, MissingCredentialsError
from dpop_middleware.flow import ENGINE_KEY, Engine
from dpop_middleware.logfields import log_extra
from dpop_middleware.settings import ClaimRequirements

logger = logging.getLogger("dpop_middleware")


def route_scopes(scopes: str | Iterable[str], where: str = "scopes") -> tuple[str, ...]:
    """A helper's scopes, checked when the route is declared (like every setting): a string is
    one space-delimited list; each scope is an RFC 6749 scope-token (no space, quote or
    backslash)."""
    from dpop_middleware.settings import SCOPE_TOKEN

    items = scopes.split(" ") if isinstance(scopes, str) else list(scopes)
    out = tuple(dict.fromkeys(s for s in items if s != ""))
    for scope in out:
        if not isinstance(scope, str) or SCOPE_TOKEN.fullmatch(scope) is None:
            raise ConfigurationError(
                f"dpop_middleware {where}: got {scope!r}; allowed: scope names without spaces, "
                "quotes or backslashes (RFC 6749 section 3.3)"
            )
    return out


def route_claims(claims: Mapping[str, Any] | None, where: str = "claims") -> ClaimRequirements:
    """A helper's required claim values, checked when the route is declared."""
    from dpop_middleware.settings import claim_requirements

    return claim_requirements(claims or {}, where)


def result_of(source: Mapping[str, Any]) -> DPoPResult | None:
    """The verified result in an ASGI scope or WSGI environ, or ``None``."""
    result = source.get("dpop")
    return result if isinstance(result, DPoPResult) else None


def _error(
    source: Mapping[str, Any], scopes: Iterable[str], claims: ClaimRequirements
) -> tuple[Engine | None, DPoPError | None]:
    engine = source.get(ENGINE_KEY)
    if not isinstance(engine, Engine):
        return None, MissingCredentialsError("not_verified", "DPoP authentication required")
    try:
        engine.verifier.authorize(result_of(source), scopes, claims)
    except DPoPError as error:
        return engine, error
    return engine, None


def _without_middleware(error: DPoPError, path: str) -> Refusal:
    logger.error(
        "dpop refused reason=%s status=%d error=%s path=%r: no DPoP middleware in front of "
        "this route",
        error.reason,
        error.status,
        error.error,
        path[:200],
        extra=log_extra(
            "refused",
            {"reason": error.reason, "status": error.status, "error": error.error, "path": path},
        ),
    )
    body = {"error": error.error or "unauthorized", "error_description": error.description}
    headers = (
        ("content-type", "application/json"),
        NO_STORE,
        EXPOSE_HEADERS,
        ("www-authenticate", "DPoP"),
    )
    return Refusal(error.status, headers, json.dumps(body).encode(), error)


async def asgi_refusal(
    scope: Mapping[str, Any], scopes: Iterable[str] = (), claims: ClaimRequirements = ()
) -> Refusal | None:
    """``None`` when the request passes, else the refusal to send (ASGI ``http``/``websocket``)."""
    engine, error = _error(scope, scopes, claims)
    if error is None:
        return None
    if engine is None:
        return _without_middleware(error, str(scope.get("path", "")))
    from dpop_middleware.asgi import request_info

    return await engine.route_refusal_async(request_info(dict(scope)), error)


def wsgi_refusal(
    environ: Mapping[str, Any], scopes: Iterable[str] = (), claims: ClaimRequirements = ()
) -> Refusal | None:
    """``None`` when the request passes, else the refusal to send (WSGI)."""
    engine, error = _error(environ, scopes, claims)
    if error is None:
        return None
    if engine is None:
        return _without_middleware(error, str(environ.get("PATH_INFO", "")))
    from dpop_middleware.wsgi import request_info

    return engine.route_refusal_sync(request_info(dict(environ)), error)


def sync_refusal(
    source: Mapping[str, Any], scopes: Iterable[str] = (), claims: ClaimRequirements = ()
) -> Refusal | None:
    """For sync code under either protocol (a sync Django view served by ASGI): an ASGI scope
    is recognised by its ``type`` key."""
    if "type" in source and "asgi" in source:
        engine, error = _error(source, scopes, claims)
        if error is None:
            return None
        if engine is None:
            return _without_middleware(error, str(source.get("path", "")))
        from dpop_middleware.asgi import request_info

        return engine.route_refusal_sync(request_info(dict(source)), error)
    return wsgi_refusal(source, scopes, claims)


def header_name(name: str) -> str:
    """The usual spelling of a header name, for frameworks that show it as given."""
    from dpop_middleware.wsgi import _title

    return _title(name)
