"""One exception tree for every refusal.

Each refusal knows three things: the HTTP status, the RFC error code that goes into the
``WWW-Authenticate`` challenge (RFC 6750 section 3.1, RFC 9449 sections 7.1 and 8) and a stable
``reason`` code for log lines that an operator can grep. Descriptions are fixed strings written
here; a token, a proof or a key never goes into an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar, Literal

Scheme = Literal["DPoP", "Bearer", "both"]


class ConfigurationError(ValueError):
    """Bad settings, raised at start-up. The message names the key, the value and what is allowed."""


class DPoPError(Exception):
    """Base of every refusal.

    Subclasses only set ``error`` (the RFC code, or ``None`` for a challenge without one) and
    ``status``. ``scheme`` says which challenge carries the error when both Bearer and DPoP are
    offered (RFC 9449 section 7.2, figures 18 and 19).
    """

    error: ClassVar[str | None] = None
    status: ClassVar[int] = 401
    #: The level of the refusal's log line: a client's mistake is a WARNING.
    log_level: ClassVar[int] = logging.WARNING
    #: The JSON body's ``error`` when there is no RFC code (``error`` is None).
    body_error: ClassVar[str] = "unauthorized"

    def __init__(
        self,
        reason: str,
        description: str,
        *,
        scheme: Scheme = "DPoP",
        log_detail: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description
        self.scheme: Scheme = scheme
        # Extra fields for the operator's log line only (e.g. expected vs received htu), as
        # name -> raw value: the log line quotes each value, so one taken from the request can
        # neither hold a control character nor pass for another field. Never in a response.
        self.log_detail = log_detail


class MissingCredentialsError(DPoPError):
    """No usable credentials: challenge without an error code (RFC 6750 section 3.1)."""

    error = None
    status = 401


class InvalidRequestError(DPoPError):
    error = "invalid_request"
    status = 400


class InvalidTokenError(DPoPError):
    error = "invalid_token"
    status = 401


class InvalidDPoPProofError(DPoPError):
    error = "invalid_dpop_proof"
    status = 401


class UseDPoPNonceError(DPoPError):
    """RFC 9449 section 9: the server requires a (fresh) nonce; a ``DPoP-Nonce`` header goes along."""

    error = "use_dpop_nonce"
    status = 401


class InsufficientScopeError(DPoPError):
    """The token is valid but lacks a scope the route needs (RFC 6750 section 3.1): 403, and the
    challenge names the scopes needed in its ``scope`` parameter (RFC 6750 section 3)."""

    error = "insufficient_scope"
    status = 403

    def __init__(
        self,
        scopes: tuple[str, ...],
        *,
        scheme: Scheme = "DPoP",
        log_detail: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            "insufficient_scope",
            "The access token does not have the scope this request needs",
            scheme=scheme,
            log_detail=log_detail,
        )
        #: The scopes the request needs, in the order configured (all of them, not only the
        #: missing ones: RFC 6750 section 3 "the scope necessary to access the resource").
        self.scopes = scopes


class InsufficientClaimsError(DPoPError):
    """403: the token is valid, but a claim the route requires (``claims``) has another value.

    RFC 6750 registers no error code for this, and ``insufficient_scope`` would send the client
    to ask for scopes that cannot help, so the challenge carries no error code; the JSON body
    says ``forbidden`` and the log line's reason is ``claim_mismatch``."""

    error = None
    status = 403
    body_error = "forbidden"


class ServiceUnavailableError(DPoPError):
    """We cannot decide (replay store or JWKS unreachable): refuse, but not as the client's fault."""

    error = "temporarily_unavailable"
    status = 503


class TokenVerifierError(ServiceUnavailableError):
    """The application's ``token_verifier`` broke its contract (gave an awaitable, or no mapping
    of claims): a fault of the server, not the client, so a 503 and an ERROR log line."""

    log_level = logging.ERROR


class ReplayStoreError(Exception):
    """The replay store backend failed; the cause is kept as ``__cause__``."""


class ReplayStoreFullError(ReplayStoreError):
    """The in-memory store is at its size cap; it never evicts live entries."""
