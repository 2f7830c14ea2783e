"""The verifier: runs every check in order on a neutral request.

Sans-IO: it never touches a network. It hands the adapter what I/O it needs and takes the answer
back:

* :meth:`Verifier.check` returns a :class:`Pending` (the replay key and TTL to record), or
  ``None`` for a request that is not protected, or raises a :class:`~dpop_middleware.errors.DPoPError`;
  it raises :class:`~dpop_middleware.core.keys.JWKSFetchNeeded` when the issuer's JWK Set must be
  fetched first (the adapter fetches, calls ``verifier.keys.load`` and calls ``check`` again),
  :class:`~dpop_middleware.core.discovery.MetadataFetchNeeded` for the issuer's metadata, and
  :class:`~dpop_middleware.core.introspection.TokenAnswerNeeded` when the introspection endpoint
  or the ``token_verifier`` must be asked (the adapter asks, and passes the answer to ``check``);
* :meth:`Verifier.finish` takes the replay store's answer and returns the :class:`DPoPResult`.

The replay record is made only after every other check passed, so a bad request never burns a
``jti`` (RFC 9449 section 11.1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from dpop_middleware.core import headers as hdr
from dpop_middleware.core.frozen import EMPTY
from dpop_middleware.core.htu import check_htu, request_htu
from dpop_middleware.core.keys import IssuerKeys
from dpop_middleware.core.nonce import NonceIssuer
from dpop_middleware.core.paths import check_path, under
from dpop_middleware.core.proof import Proof, ProofParser, check_ath, check_iat
from dpop_middleware.core.request import RequestInfo
from dpop_middleware.core.scopes import ScopeRules, check_claims, check_scopes, parse_scopes
from dpop_middleware.core.token import (
    AccessTokenChecker,
    Answer,
    VerifiedToken,
    check_binding,
    token_ath,
)
from dpop_middleware.errors import (
    DPoPError,
    InvalidDPoPProofError,
    InvalidTokenError,
    MissingCredentialsError,
    ServiceUnavailableError,
    UseDPoPNonceError,
)
from dpop_middleware.settings import ClaimRequirements, Settings

Header = tuple[str, str]
EXPOSE_HEADERS: Header = ("access-control-expose-headers", "WWW-Authenticate, DPoP-Nonce")
NO_STORE: Header = ("cache-control", "no-store")


_NO_CLAIMS: Mapping[str, Any] = EMPTY


class DPoPResult(NamedTuple):
    """What the application gets (ASGI ``scope["dpop"]``, WSGI ``environ["dpop"]``).

    Immutable; a NamedTuple because one is built per request and that is the cheapest
    immutable value Python has. ``claims`` and ``proof_claims`` are deeply immutable
    (:mod:`frozen`: read-only dicts, arrays as tuples); every request with the same token gets
    the same ``claims`` object.
    """

    claims: Mapping[str, Any]
    #: RFC 7638 thumbprint of the proof key (None for an unbound Bearer token in migration mode).
    jkt: str | None
    #: "DPoP", or "Bearer" for an unbound token accepted in ``dpop_or_bearer`` mode.
    scheme: Literal["DPoP", "Bearer"]
    proof_claims: Mapping[str, Any] = _NO_CLAIMS

    @property
    def bound(self) -> bool:
        return self.jkt is not None

    @property
    def subject(self) -> str | None:
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else None

    @property
    def scopes(self) -> frozenset[str]:
        """The token's scopes: ``scope`` split on spaces (RFC 9068 section 2.2.3), or ``scp``
        (a list or a string); empty when absent or malformed. Parsed on each access, so apps
        that never ask pay nothing."""
        return parse_scopes(self.claims)


class Pending(NamedTuple):
    """A request that passed every check but replay; the adapter records ``replay_key``.

    A NamedTuple: immutable, and cheap to build once per request.
    """

    result: DPoPResult
    replay_key: bytes | None
    ttl: float
    #: Headers to add to the application's response (a fresh ``DPoP-Nonce`` and no-store).
    response_headers: tuple[Header, ...] = ()
    #: The token was accepted on an introspection / ``token_verifier`` answer (not a JWT).
    answered: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """A complete refusal response, rendered by the core, copied out by the adapters."""

    status: int
    headers: tuple[Header, ...]
    body: bytes
    error: DPoPError


class Verifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._clock = settings.clock
        self._proofs = ProofParser(
            settings.algorithms,
            max_jti_length=settings.max_jti_length,
            cache_size=settings.key_cache_size,
        )
        self._tokens = AccessTokenChecker(settings)
        self._nonces = NonceIssuer(settings.nonce) if settings.nonce is not None else None
        self._nonce_only = settings.nonce is not None and settings.nonce.freshness == "nonce_only"
        metadata = settings.resource_metadata
        self._metadata_url = metadata.url if metadata is not None else None
        self._public_url = (
            (settings.public_url.scheme, settings.public_url.authority, settings.public_url.prefix)
            if settings.public_url is not None
            else None
        )
        self._bearer = settings.mode == "dpop_or_bearer"
        self._ttl = settings.replay_ttl
        self._excluded = bool(settings.exclude_paths)
        self._pass_preflight = settings.cors_preflight == "pass"
        self._max_path = settings.max_path_length
        # None without rules: the warm path pays one ``is not None`` test.
        self._scope_rules = (
            ScopeRules(settings.required_scopes) if settings.required_scopes else None
        )

    @property
    def keys(self) -> IssuerKeys | None:
        """The issuer's JWK Set holder (None with a ``token_verifier``)."""
        return self._tokens.keys

    @property
    def tokens(self) -> AccessTokenChecker:
        """The access token checks (the adapter hands introspection answers to them)."""
        return self._tokens

    def now(self) -> float:
        return self._clock()

    # -- which requests ------------------------------------------------------------------------

    def is_protected(self, request: RequestInfo) -> bool:
        """False for ``exclude_paths`` (matched on the path the application routes on, by whole
        segments: ``/healthx`` is not excluded by ``/health``; :mod:`paths`), and for a CORS
        preflight (``OPTIONS`` with ``Access-Control-Request-Method``) only with
        ``cors_preflight="pass"``: any client can send that header, so by default a preflight is
        checked like every request and never reaches a protected handler unauthenticated.
        """
        if (
            self._pass_preflight
            and request.method == "OPTIONS"
            and request.header_values("access-control-request-method")
        ):
            return False
        excluded = self.settings.exclude_paths
        return not (excluded and under(request.route_path, excluded))

    def _nonce_required(self, request: RequestInfo) -> bool:
        nonce = self.settings.nonce
        if nonce is None or nonce.required is False:
            return False
        if nonce.required is True:
            return True
        # RFC 9449 section 11.3, on the path the application routes on (``/api%2Fx`` is /api/x).
        return under(request.route_path, nonce.required)

    # -- the checks ----------------------------------------------------------------------------

    def check(self, request: RequestInfo, answer: Answer | None = None) -> Pending | None:
        # Every request, excluded or not: a path we would judge differently from the app is refused.
        check_path(request.path, request.route_path, self._max_path)
        if (self._pass_preflight or self._excluded) and not self.is_protected(request):
            return None
        settings = self.settings
        now = self._clock()
        tokens = self._tokens
        found = hdr.scan_headers(request)
        authorization = found.authorization
        # A cached token was verified as this very Authorization value, so the value parsed then.
        cached = tokens.cached(authorization, now)
        if cached is not None:
            scheme, token, ath = cached.scheme, cached.token, cached.ath
        else:
            scheme, token = hdr.parse_authorization(authorization, settings.max_token_size)
            ath = token_ath(token)
        proof_value = hdr.proof_value(found.proofs, settings.max_proof_size)

        if scheme == "bearer":
            pending = self._check_bearer(authorization, token, ath, now, cached, answer)
            if self._scope_rules is not None:
                self._check_scope_rules(request, pending.result, self._scope_rules)
            return pending

        # RFC 9449 section 7.1: a DPoP token MUST come with a proof.
        if proof_value is None:
            raise InvalidDPoPProofError("proof_missing", "DPoP proof is missing")
        proof = self._proofs.parse(proof_value)
        if proof.htm != request.method:  # step 8 (methods are case-sensitive, RFC 9110 9.1)
            raise InvalidDPoPProofError(
                "htm_mismatch", "DPoP proof htm does not match the request method"
            )
        expected = request_htu(request, found.hosts, self._public_url, settings.trusted_proxies)
        # Step 9. An htu equal to the normalised request URI needs no normalising (normalisation
        # is idempotent: tests/test_core_fuzz.py); any other is normalised and compared.
        if proof.htu != expected:
            check_htu(proof.htu, expected)
        check_ath(proof, ath)
        if self._nonces is None:  # step 11 by iat alone
            check_iat(proof, now, settings.proof_max_age, settings.clock_skew)
            response_headers: tuple[Header, ...] = ()
        else:
            response_headers = self._nonce_freshness(proof, request, now, self._nonces)
        verified = tokens.check(authorization, token, ath, now, "DPoP", cached, answer)
        key = proof.key
        check_binding(verified, key)
        # The replay key: a hash of (key thumbprint, jti), so two clients cannot collide.
        # BLAKE2b-256 (CPython's own): on this path it costs half of OpenSSL's SHA-256 set-up.
        replay_key = hashlib.blake2b(
            key.jkt_bytes + b"\x00" + proof.jti.encode("utf-8", "surrogatepass"), digest_size=32
        ).digest()
        # The claims were frozen when the token was verified: no copy per request.
        result = DPoPResult(verified.claims, key.jkt, "DPoP", proof.claims)
        if self._scope_rules is not None:
            # After every other check, before the replay record: a refusal burns no jti.
            self._check_scope_rules(request, result, self._scope_rules)
        # version 0: an introspection / token_verifier answer (a JWT carries its JWK Set's, >= 1).
        return Pending(result, replay_key, self._ttl, response_headers, verified.version == 0)

    @staticmethod
    def _check_scope_rules(request: RequestInfo, result: DPoPResult, rules: ScopeRules) -> None:
        """``required_scopes``: 403 ``insufficient_scope`` (RFC 6750 section 3.1), then 403
        ``claim_mismatch`` for a rule's ``claims``."""
        needed, claims = rules.needed(request.route_path, request.method)
        if needed:
            check_scopes(needed, result.claims, result.scheme)
        if claims:
            check_claims(claims, result.claims, result.scheme)

    def _nonce_freshness(
        self, proof: Proof, request: RequestInfo, now: float, nonces: NonceIssuer
    ) -> tuple[Header, ...]:
        """Steps 10 and 11 with nonces on: the nonce, and the proof's age by ``iat`` (default) or,
        with ``nonce.freshness="nonce_only"``, by the nonce alone."""
        settings = self.settings
        if proof.nonce is not None:
            if not nonces.valid(proof.nonce, now):
                raise UseDPoPNonceError(
                    "nonce_invalid", "Resource server requires a fresh nonce in DPoP proof"
                )
            if not self._nonce_only:
                # The iat window holds with nonces on: a bad iat is 401 invalid_dpop_proof, as
                # without nonces (a new nonce would not fix the client's clock).
                check_iat(proof, now, settings.proof_max_age, settings.clock_skew)
            # Nonce-only: a valid nonce is a server-managed timestamp (section 11.1) and judges
            # freshness by itself.
            if nonces.is_current(proof.nonce, now):
                return ()
            return (("dpop-nonce", nonces.current(now)), NO_STORE)
        if self._nonce_required(request):
            raise UseDPoPNonceError("nonce_missing", "Resource server requires nonce in DPoP proof")
        if not self._nonce_only:
            check_iat(proof, now, settings.proof_max_age, settings.clock_skew)
            return (("dpop-nonce", nonces.current(now)), NO_STORE)
        try:
            check_iat(proof, now, settings.proof_max_age, settings.clock_skew)
        except InvalidDPoPProofError as exc:
            # With nonces on, a bad clock is recoverable: offer a nonce instead of a hard failure.
            raise UseDPoPNonceError(
                exc.reason, "Resource server requires nonce in DPoP proof"
            ) from None
        return (("dpop-nonce", nonces.current(now)), NO_STORE)

    def _check_bearer(
        self,
        authorization: str,
        token: str,
        ath: bytes,
        now: float,
        cached: VerifiedToken | None,
        answer: Answer | None,
    ) -> Pending:
        if not self._bearer:
            # Only DPoP is accepted; a Bearer token (bound or not) is refused (section 7.2).
            raise InvalidTokenError(
                "bearer_not_allowed", "Bearer tokens are not accepted; use DPoP", scheme="DPoP"
            )
        verified = self._tokens.check(authorization, token, ath, now, "Bearer", cached, answer)
        if verified.jkt is not None:
            # Section 7.2: "MUST reject a DPoP-bound access token received as a bearer token".
            raise InvalidTokenError(
                "downgrade", "DPoP-bound access token sent as a Bearer token", scheme="Bearer"
            )
        result = DPoPResult(verified.claims, None, "Bearer")
        return Pending(result, None, 0.0, (), verified.version == 0)

    def authorize(
        self,
        result: DPoPResult | None,
        scopes: Iterable[str] = (),
        claims: ClaimRequirements = (),
    ) -> None:
        """A per-route check: 401 (no error code, RFC 6750 section 3.1) when nothing was verified
        (an excluded path, a preflight, ``report_only``), else 403 ``insufficient_scope`` unless
        the token has every scope in ``scopes``, then 403 (reason ``claim_mismatch``) unless it
        has every claim value in ``claims``."""
        if result is None:
            raise MissingCredentialsError("not_verified", "DPoP authentication required")
        if scopes:
            check_scopes(scopes, result.claims, result.scheme)
        if claims:
            check_claims(claims, result.claims, result.scheme)

    def finish(self, pending: Pending, first_seen: bool) -> DPoPResult:
        """Take the replay store's answer (RFC 9449 section 11.1)."""
        if not first_seen:
            raise InvalidDPoPProofError("replayed", "DPoP proof has already been used")
        return pending.result

    # -- refusals ------------------------------------------------------------------------------

    def refusal(self, error: DPoPError) -> Refusal:
        """The full response for a refusal: status, challenge, nonce, JSON body."""
        headers: list[Header] = [
            ("content-type", "application/json"),
            NO_STORE,
            EXPOSE_HEADERS,
        ]
        if isinstance(error, ServiceUnavailableError):
            headers.append(("retry-after", "1"))
        elif error.status in (400, 401, 403):
            headers.append((
                "www-authenticate",
                hdr.challenge(
                    error, algs=self.settings.algs_value, realm=self.settings.realm, bearer=self._bearer,
                    resource_metadata=self._metadata_url,
                ),
            ))  # fmt: skip
        if isinstance(error, UseDPoPNonceError) and self._nonces is not None:
            headers.append(("dpop-nonce", self._nonces.current(self._clock())))
        body: dict[str, str] = {"error": error.error or error.body_error}
        body["error_description"] = error.description
        status = error.status
        if self.settings.always_401 and status in (400, 403):
            status = 401  # the MCP profile (SEP-1932): every refusal is a 401 with the challenge
        return Refusal(status, tuple(headers), json.dumps(body).encode(), error)


__all__ = [
    "DPoPResult",
    "Pending",
    "Refusal",
    "Verifier",
]
