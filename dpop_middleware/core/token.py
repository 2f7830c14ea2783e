"""Access token checks (RFC 9068 JWT access tokens, or a user-supplied verifier) and the key
binding (RFC 9449 section 6).

A verified JWT is cached (LRU, keyed by the whole ``Authorization`` value) as a
:class:`VerifiedToken`: the claims
and what every request needs of them, extracted once (``exp``, ``nbf``, the bound ``cnf.jkt``)
and the token's ``ath`` value. A cache hit still checks ``exp`` and ``nbf`` against the clock, so
a cached token is never accepted past its expiry; a JWK Set that is due for a refresh, or that
changed, makes every entry stale.
The claims are frozen (:mod:`frozen`) before they are cached: every request with the token gets
the same deeply immutable object, so nothing an application does can reach the cache.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from joserfc import jwt
from joserfc.errors import JoseError

from dpop_middleware.core.discovery import IssuerMetadata, Metadata
from dpop_middleware.core.frozen import freeze
from dpop_middleware.core.introspection import (
    REFUSAL_TTL,
    Refused,
    TokenAnswerNeeded,
    answer_cache,
    answer_cost,
    audience_values,
    shown,
)
from dpop_middleware.core.jose import COMPACT_JWS, MalformedError, b64encode, json_object
from dpop_middleware.core.keys import LRU, IssuerKeys, JWKSFetchNeeded, ProofKey
from dpop_middleware.errors import (
    InvalidTokenError,
    Scheme,
    ServiceUnavailableError,
    TokenVerifierError,
)
from dpop_middleware.settings import Settings

_STRICT_TYPES = frozenset({"at+jwt", "application/at+jwt"})
#: The verified-token cache's byte budget. An entry's cost is estimated from the Authorization
#: value: it holds that string, the token, the decoded claims and the ``ath`` (about 2.4 KB for a
#: 470-byte token, so 5 bytes a character is generous). ``token_cache_size`` entries of ordinary
#: tokens fit well inside; 16 KB tokens are kept about 800 at a time instead of 10,000.
TOKEN_CACHE_MAX_BYTES = 64 << 20
_LAX_TYPES = _STRICT_TYPES | {"jwt", "application/jwt"}


def _invalid(reason: str, description: str, scheme: Scheme) -> InvalidTokenError:
    return InvalidTokenError(reason, description, scheme=scheme)


def broken_verifier(returned: object) -> TokenVerifierError:
    """A ``token_verifier`` that gave no mapping of claims: an awaitable (an async verifier the
    settings could not recognise) is closed unawaited; the request is refused, never let through."""
    if inspect.iscoroutine(returned):
        returned.close()  # never run, and no "never awaited" warning
    return TokenVerifierError(
        "token_verifier_error",
        "The access token cannot be checked right now",
        log_detail={"returned": type(returned).__name__},
    )


def token_ath(token: str) -> bytes:
    """RFC 9449 section 4.2: ``ath`` = base64url(SHA-256(ASCII(access token))), as bytes.

    The token is token68 by then (:mod:`headers` checked it), so it is ASCII.
    """
    return b64encode(hashlib.sha256(token.encode("ascii")).digest()).encode("ascii")


class VerifiedToken(NamedTuple):
    """An access token that passed every check but the clock, with what each request needs.

    Cached under the whole ``Authorization`` value it came in, which therefore parsed as
    ``scheme`` + ``token`` (the same string always does)."""

    scheme: str  # "dpop" or "bearer"
    token: str
    claims: Mapping[str, Any]
    exp: float | None  # None only from a token_verifier that gave no exp
    nbf: float | None
    #: ``cnf.jkt`` as UTF-8 bytes (RFC 9449 section 6.1), or None for an unbound token.
    jkt: bytes | None
    ath: bytes
    #: The JWK Set version it was verified under (JWTs: 1 or more); 0 for an introspection or
    #: ``token_verifier`` answer.
    version: int


class Accepted(NamedTuple):
    """A cached answer of the introspection endpoint or the ``token_verifier`` that passed every
    check but the clock and the request's scheme."""

    verified: VerifiedToken
    #: ``token_type`` lower-cased, or None when absent (RFC 9449 section 6.2).
    token_type: str | None
    #: Reused until then: ``min(exp, answered + cache_ttl)``.
    until: float


#: What the adapter hands back for a :class:`TokenAnswerNeeded`: the token's key and the answer.
Answer = tuple[bytes, Accepted | Refused]


def uses_discovery(settings: Settings) -> bool:
    """Whether the issuer's metadata (RFC 8414) is read: no ``jwks``, ``jwks_uri`` or
    ``token_verifier`` to check tokens locally, or an introspection endpoint to find."""
    if settings.token_verifier is not None or settings.issuer is None:
        return False
    intro = settings.introspection
    source: str = settings.token_source
    local = source != "introspection"
    return (local and settings.jwks is None and settings.jwks_uri is None) or (
        intro is not None and intro.endpoint is None
    )


class AccessTokenChecker:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._issuer = settings.issuer
        self._audience = frozenset(settings.audience)
        self._algorithms = frozenset(settings.access_token_algorithms)
        self._leeway = settings.leeway
        self._types = _STRICT_TYPES if settings.strict_access_token_typ else _LAX_TYPES
        self._custom = settings.token_verifier
        self._introspection = settings.introspection
        self._source = settings.token_source
        self.keys: IssuerKeys | None = None
        if self._custom is None and self._source != "introspection":
            self.keys = IssuerKeys(
                settings.jwks,
                uri=settings.jwks_uri,
                cache_ttl=settings.jwks_cache_ttl,
                refresh_interval=settings.jwks_refresh_interval,
                max_stale=settings.jwks_max_stale,
            )
        self.discovery: IssuerMetadata | None = None
        if uses_discovery(settings):
            assert settings.issuer is not None
            self.discovery = IssuerMetadata(
                settings.issuer,
                cache_ttl=settings.jwks_cache_ttl,
                refresh_interval=settings.jwks_refresh_interval,
            )
        self._cache: LRU[str, VerifiedToken] = LRU(
            settings.token_cache_size, max_bytes=TOKEN_CACHE_MAX_BYTES
        )
        #: Answers of the introspection endpoint or the token_verifier, by the token's hash.
        self._answers: LRU[bytes, Accepted | Refused] | None = None
        if self._custom is not None or self._introspection is not None:
            self._answers = answer_cache(settings.token_cache_size)

    def cached(self, authorization: str, now: float) -> VerifiedToken | None:
        """The cache entry for an ``Authorization`` value if it is current: verified under this
        JWK Set, and that set is not due for a refresh. A due set sends the token down the miss
        path, which fetches it; a changed set has a new version: no entry outlives its key."""
        entry = self._cache.get(authorization)
        keys = self.keys
        if entry is None or keys is None or entry.version != keys.version:
            return None
        # Within the set's refresh time (the common case), no need to ask fetch_due.
        if now < keys.fresh_until or not keys.fetch_due(None, now=now):
            return entry
        return None

    def check(
        self,
        authorization: str,
        token: str,
        ath: bytes,
        now: float,
        scheme: Scheme,
        cached: VerifiedToken | None,
        answer: Answer | None = None,
    ) -> VerifiedToken:
        """The verified token, or InvalidTokenError; ``cached`` is what :meth:`cached` gave for
        ``authorization``. ``scheme`` says which challenge gets the error. ``answer`` is what the
        adapter was asked for last (:class:`TokenAnswerNeeded`): used even if the cache kept
        nothing."""
        if cached is not None:
            exp, nbf, leeway = cached.exp, cached.nbf, self._leeway
            if exp is not None and now >= exp + leeway:
                raise _invalid("token_expired", "The access token has expired", scheme)
            if nbf is not None and nbf > now + leeway:
                raise _invalid("token_not_yet_valid", "The access token is not yet valid", scheme)
            return cached
        name = scheme.lower()
        answers = self._answers
        if answers is not None:
            found = answer[1] if answer is not None and answer[0] == ath else answers.get(ath)
            if found is not None and (now < found.until or answer is not None):
                return self._answered(found, now, scheme)
            if self._custom is not None or self._remote(token):
                raise TokenAnswerNeeded(token, ath, self._endpoint(now))
        keys = self.keys
        assert keys is not None
        if self.discovery is not None:
            self._use_discovered_keys(keys, now)
        assert keys is not None
        # The version before the keys are read: a JWK Set loaded by another thread meanwhile
        # (a removed key) must not have its version on an entry verified with the old keys.
        version = keys.version
        claims = _frozen(self._verify_jwt(token, keys, now, scheme), scheme)
        exp, nbf = self._check_times(claims, now, scheme, required=True)
        entry = VerifiedToken(name, token, claims, exp, nbf, _bound(claims, scheme), ath, version)
        if len(authorization) == len(name) + 1 + len(token):
            # Only the form clients send (one space): otherwise one token in a few thousand
            # spacings could fill the cache and push out everyone else's entries. Other forms
            # still pass; they are verified each time.
            self._cache.put(authorization, entry, 5 * len(authorization) + 512)
        return entry

    def _verify_jwt(
        self, token: str, keys: IssuerKeys, now: float, scheme: Scheme
    ) -> Mapping[str, Any]:
        if COMPACT_JWS.fullmatch(token) is None:
            raise _invalid("token_malformed", "The access token is not a valid JWT", scheme)
        try:
            header = json_object(token.split(".", 1)[0])
        except MalformedError:
            raise _invalid(
                "token_malformed", "The access token is not a valid JWT", scheme
            ) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _invalid("token_alg_not_allowed", "The access token alg is not allowed", scheme)
        typ = header.get("typ")
        if typ is None:
            if self._settings.strict_access_token_typ:
                raise _invalid("token_typ_invalid", "The access token typ must be at+jwt", scheme)
        elif not isinstance(typ, str) or typ.lower() not in self._types:
            raise _invalid("token_typ_invalid", "The access token typ is not accepted", scheme)
        if "crit" in header:
            raise _invalid("token_malformed", "The access token uses critical headers", scheme)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("token_malformed", "The access token kid is not a string", scheme)
        if keys.fetch_due(kid, now=now):
            assert keys.uri is not None
            raise JWKSFetchNeeded(keys.uri)
        key_set = keys.key_set
        if key_set is None:
            raise ServiceUnavailableError("jwks_unavailable", "Signing keys are not available")
        if keys.too_stale(now):
            # The endpoint has failed for longer than jwks_max_stale past the refresh time: a
            # key removed meanwhile would still verify. Refuse rather than trust it (fail closed).
            raise ServiceUnavailableError(
                "jwks_unavailable",
                "Signing keys are not available",
                log_detail={"cause": f"JWK Set not refreshed for {now - keys.loaded_at:.0f} s"},
            )
        if kid is None:
            if len(key_set) != 1:
                raise _invalid("kid_missing", "The access token has no kid", scheme)
            key = key_set[0]
        else:
            found = keys.find(kid)
            if found is None:
                raise _invalid(
                    "unknown_kid", "The access token is signed by an unknown key", scheme
                )
            key = found
        try:
            decoded = jwt.decode(token, key, algorithms=[alg])
        except JoseError:
            raise _invalid(
                "token_signature_invalid", "The access token signature is invalid", scheme
            ) from None
        except (ValueError, TypeError, RecursionError):
            # RecursionError: claims nested past the JSON decoder's depth (a few thousand
            # brackets fit in the size limit). Malformed, never a 500.
            raise _invalid(
                "token_malformed", "The access token is not a valid JWT", scheme
            ) from None
        claims = decoded.claims
        if not isinstance(claims, dict):
            raise _invalid("token_malformed", "The access token claims are not an object", scheme)
        # RFC 9068 section 4: iss must match exactly, aud must contain our audience.
        if claims.get("iss") != self._issuer:
            raise self._issuer_mismatch(claims.get("iss"), scheme)
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in self._audience for a in auds):
            raise self._audience_mismatch(aud, scheme)
        return claims

    def _issuer_mismatch(self, iss: Any, scheme: Scheme) -> InvalidTokenError:
        return InvalidTokenError(
            "issuer_mismatch",
            "The access token issuer is not accepted",
            scheme=scheme,
            log_detail={"expected": str(self._issuer), "received": shown(iss)},
        )

    def _audience_mismatch(self, aud: Any, scheme: Scheme) -> InvalidTokenError:
        expected = self._settings.audience
        return InvalidTokenError(
            "audience_mismatch",
            "The access token audience is not accepted",
            scheme=scheme,
            log_detail={
                "expected": expected[0] if len(expected) == 1 else shown(list(expected)),
                "received": shown(aud),
            },
        )

    # -- discovery, introspection, token_verifier ------------------------------------------------

    def metadata(self, now: float) -> Metadata:
        """The issuer's metadata; MetadataFetchNeeded when due; 503 while none can be had."""
        discovery = self.discovery
        assert discovery is not None
        current = discovery.get(now)
        if current is None:
            raise ServiceUnavailableError(
                "metadata_unavailable", "The authorization server's metadata is not available"
            )
        return current

    def _use_discovered_keys(self, keys: IssuerKeys, now: float) -> None:
        jwks_uri = self.metadata(now).jwks_uri
        if jwks_uri is None:
            raise ServiceUnavailableError(
                "jwks_unavailable",
                "Signing keys are not available",
                log_detail={"cause": "the issuer's metadata has no jwks_uri"},
            )
        if keys.uri != jwks_uri:
            keys.uri = jwks_uri

    def _remote(self, token: str) -> bool:
        """Whether the token goes to the introspection endpoint: always with token_source
        "introspection"; with "auto", unless it is a JWS whose payload names our issuer."""
        if self._introspection is None:
            return False
        if self._source == "introspection":
            return True
        if COMPACT_JWS.fullmatch(token) is None:
            return True
        try:
            payload = json_object(token.split(".", 2)[1])
        except MalformedError:
            return True
        return payload.get("iss") != self._issuer

    def _endpoint(self, now: float) -> str | None:
        """Where to introspect (None: ask the token_verifier)."""
        intro = self._introspection
        if intro is None:
            return None
        if intro.endpoint is not None:
            return intro.endpoint
        endpoint = self.metadata(now).introspection_endpoint
        if endpoint is None:
            raise ServiceUnavailableError(
                "introspection_unavailable",
                "The access token cannot be checked right now",
                log_detail={"cause": "the issuer's metadata has no introspection_endpoint"},
            )
        return endpoint

    def _answered(self, entry: Accepted | Refused, now: float, scheme: Scheme) -> VerifiedToken:
        """An answer, checked against the clock and the request's scheme."""
        if isinstance(entry, Refused):
            raise InvalidTokenError(
                entry.reason, entry.description, scheme=scheme, log_detail=entry.log_detail
            )
        kind = entry.token_type
        if kind is not None and scheme == "DPoP" and kind != "dpop":
            # RFC 9449 section 6.2: if present it MUST be DPoP.
            raise _invalid("token_type_mismatch", "The access token is not a DPoP token", scheme)
        verified, leeway = entry.verified, self._leeway
        if verified.exp is not None and now >= verified.exp + leeway:
            raise _invalid("token_expired", "The access token has expired", scheme)
        if verified.nbf is not None and verified.nbf > now + leeway:
            raise _invalid("token_not_yet_valid", "The access token is not yet valid", scheme)
        return verified

    def refused_by_verifier(self, key: bytes, error: InvalidTokenError, now: float) -> None:
        """Remember for a few seconds that the ``token_verifier`` refused this token."""
        if self._answers is not None and self._settings.token_verifier_cache_ttl > 0:
            entry = Refused(error.reason, error.description, now + REFUSAL_TTL, error.log_detail)
            self._answers.put(key, entry, 512)

    def answer(
        self, key: bytes, token: str, claims: Mapping[str, Any], now: float, *, introspected: bool
    ) -> Accepted | Refused:
        """Judge an introspection answer (``introspected``, RFC 7662 section 2.2) or a
        ``token_verifier``'s claims, cache the verdict and return it."""
        if introspected:
            assert self._introspection is not None
            ttl = self._introspection.cache_ttl
        else:
            ttl = self._settings.token_verifier_cache_ttl
        entry = self._judge(key, token, claims, now, ttl, introspected=introspected)
        if self._answers is not None and ttl > 0:
            self._answers.put(key, entry, answer_cost(claims))
        return entry

    def _judge(
        self,
        key: bytes,
        token: str,
        claims: Mapping[str, Any],
        now: float,
        ttl: float,
        *,
        introspected: bool,
    ) -> Accepted | Refused:
        try:
            # RFC 7662: an inactive token is no token.
            if "active" in claims and claims["active"] is not True:
                raise _invalid("token_inactive", "The access token is not active", "DPoP")
            if introspected:
                iss = claims.get("iss")
                if iss is not None and iss != self._issuer:
                    raise self._issuer_mismatch(iss, "DPoP")
                if "aud" in claims:
                    auds = audience_values(claims["aud"])
                    if auds is None or not any(a in self._audience for a in auds):
                        raise self._audience_mismatch(claims["aud"], "DPoP")
            exp, nbf = self._check_times(claims, now, "DPoP", required=False)
            jkt = _bound(claims, "DPoP")
            frozen = _frozen(claims, "DPoP")
        except InvalidTokenError as exc:
            return Refused(exc.reason, exc.description, now + REFUSAL_TTL, exc.log_detail)
        token_type = claims.get("token_type")
        until = now + ttl if exp is None else min(exp, now + ttl)
        verified = VerifiedToken("dpop", token, frozen, exp, nbf, jkt, key, 0)
        return Accepted(verified, None if token_type is None else str(token_type).lower(), until)

    def _check_times(
        self, claims: Mapping[str, Any], now: float, scheme: Scheme, *, required: bool
    ) -> tuple[float | None, float | None]:
        """Check ``exp`` and ``nbf`` (RFC 7519 sections 4.1.4, 4.1.5); return them as floats.

        NumericDate is a finite number: ``NaN`` would compare false with every time (a token that
        never expires), and an integer past the float range would overflow the comparison.
        """
        exp = _numeric_date(claims.get("exp"))
        if exp is None:
            if required or claims.get("exp") is not None:
                raise _invalid("token_exp_missing", "The access token has no valid exp", scheme)
        elif now >= exp + self._leeway:
            raise _invalid("token_expired", "The access token has expired", scheme)
        nbf = _numeric_date(claims.get("nbf"))
        if nbf is None:
            if claims.get("nbf") is not None:
                raise _invalid("token_malformed", "The access token nbf is not a number", scheme)
        elif nbf > now + self._leeway:
            raise _invalid("token_not_yet_valid", "The access token is not yet valid", scheme)
        return exp, nbf


def _frozen(claims: Mapping[str, Any], scheme: Scheme) -> Mapping[str, Any]:
    """The claims deeply frozen, once per verified token; token_malformed if they are nested too
    deep to walk (the JSON decoder's own limit is a little deeper)."""
    try:
        frozen: Mapping[str, Any] = freeze(claims)
    except RecursionError:
        raise _invalid(
            "token_malformed", "The access token claims are nested too deep", scheme
        ) from None
    return frozen


def _numeric_date(value: Any) -> float | None:
    """A JSON NumericDate as a finite float, or None (absent, not a number, NaN, infinite, or
    beyond the float range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _bound(claims: Mapping[str, Any], scheme: Scheme) -> bytes | None:
    """The ``cnf.jkt`` the token is bound to (RFC 9449 section 6.1) as bytes, or None for a token
    without ``cnf``.

    Any ``cnf`` makes the token sender-constrained (RFC 7800 section 3.1): one we cannot read, or
    bound by another method (``x5t#S256`` of RFC 8705, ``jwk``, ...), is refused, never taken for
    an unbound Bearer token.
    """
    if "cnf" not in claims:
        return None
    cnf = claims["cnf"]
    if not isinstance(cnf, Mapping):
        raise _invalid("token_malformed", "The access token cnf claim is not an object", scheme)
    if "jkt" not in cnf:
        raise _invalid(
            "token_binding_unsupported",
            "The access token is bound by a method this server cannot verify",
            scheme,
        )
    jkt = cnf["jkt"]
    if not isinstance(jkt, str) or not jkt:
        raise _invalid("token_malformed", "The access token cnf.jkt is malformed", scheme)
    return jkt.encode("utf-8", "surrogatepass")


def check_binding(token: VerifiedToken, key: ProofKey) -> None:
    """RFC 9449 section 6 / step 12: the proof key is the key the token is bound to."""
    if token.jkt is None:
        raise InvalidTokenError("token_not_bound", "The access token is not DPoP-bound")
    if not hmac.compare_digest(token.jkt, key.jkt_bytes):
        raise InvalidTokenError("jkt_mismatch", "Invalid DPoP key binding")
