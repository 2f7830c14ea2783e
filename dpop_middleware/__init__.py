"""dpop-middleware: RFC 9449 DPoP proof and token verification for ASGI and WSGI apps.

Importing this package pulls in no web framework and no Redis client; the middleware classes are
loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dpop_middleware.core.request import RequestInfo
from dpop_middleware.core.verifier import DPoPResult, Refusal, Verifier
from dpop_middleware.errors import (
    ConfigurationError,
    DPoPError,
    InsufficientClaimsError,
    InsufficientScopeError,
    InvalidDPoPProofError,
    InvalidRequestError,
    InvalidTokenError,
    MissingCredentialsError,
    ReplayStoreError,
    ServiceUnavailableError,
    UseDPoPNonceError,
)
from dpop_middleware.settings import Settings

if TYPE_CHECKING:
    from dpop_middleware.asgi import DPoPMiddleware
    from dpop_middleware.wsgi import DPoPWSGIMiddleware

__all__ = [
    "ConfigurationError",
    "DPoPError",
    "DPoPMiddleware",
    "DPoPResult",
    "DPoPWSGIMiddleware",
    "InsufficientClaimsError",
    "InsufficientScopeError",
    "InvalidDPoPProofError",
    "InvalidRequestError",
    "InvalidTokenError",
    "MissingCredentialsError",
    "Refusal",
    "ReplayStoreError",
    "RequestInfo",
    "ServiceUnavailableError",
    "Settings",
    "UseDPoPNonceError",
    "Verifier",
]


def __getattr__(name: str) -> Any:
    if name == "DPoPMiddleware":
        from dpop_middleware.asgi import DPoPMiddleware

        return DPoPMiddleware
    if name == "DPoPWSGIMiddleware":
        from dpop_middleware.wsgi import DPoPWSGIMiddleware

        return DPoPWSGIMiddleware
    raise AttributeError(f"module 'dpop_middleware' has no attribute {name!r}")
