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

from dpop_middleware.core.frozen import freeze
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


def _broken_verifier(returned: object) -> TokenVerifierError:
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
    version: int  # the JWK Set version it was verified under (0 for a token_verifier)


class AccessTokenChecker:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._issuer = settings.issuer
        self._audience = frozenset(settings.audience)
        self._algorithms = frozenset(settings.access_token_algorithms)
        self._leeway = settings.leeway
        self._types = _STRICT_TYPES if settings.strict_access_token_typ else _LAX_TYPES
        self._custom = settings.token_verifier
        self.keys: IssuerKeys | None = None
        if self._custom is None:
            self.keys = IssuerKeys(
                settings.jwks,
                uri=settings.jwks_uri,
                cache_ttl=settings.jwks_cache_ttl,
                refresh_interval=settings.jwks_refresh_interval,
            )
        self._cache: LRU[str, VerifiedToken] = LRU(
            settings.token_cache_size, max_bytes=TOKEN_CACHE_MAX_BYTES
        )

    def cached(self, authorization: str, now: float) -> VerifiedToken | None:
        """The cache entry for an ``Authorization`` value if it is current: verified under this
        JWK Set, and that set is not due for a refresh. A due set sends the token down the miss
        path, which fetches it; a changed set has a new version: no entry outlives its key."""
        entry = self._cache.get(authorization)
        keys = self.keys
        if (
            entry is not None
            and keys is not None
            and entry.version == keys.version
            and not keys.fetch_due(None, now=now)
        ):
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
    ) -> VerifiedToken:
        """The verified token, or InvalidTokenError; ``cached`` is what :meth:`cached` gave for
        ``authorization``. ``scheme`` says which challenge gets the error."""
        if cached is not None:
            exp, nbf, leeway = cached.exp, cached.nbf, self._leeway
            if exp is not None and now >= exp + leeway:
                raise _invalid("token_expired", "The access token has expired", scheme)
            if nbf is not None and nbf > now + leeway:
                raise _invalid("token_not_yet_valid", "The access token is not yet valid", scheme)
            return cached
        name = scheme.lower()
        if self._custom is not None:
            claims = self._custom(token)
            if not isinstance(claims, Mapping):
                raise _broken_verifier(claims)
            claims = _frozen(claims, scheme)
            # RFC 7662: an inactive token is no token.
            if "active" in claims and claims["active"] is not True:
                raise _invalid("token_inactive", "The access token is not active", scheme)
            token_type = claims.get("token_type")
            if token_type is not None and scheme == "DPoP" and str(token_type).lower() != "dpop":
                # RFC 9449 section 6.2: if present it MUST be DPoP.
                raise _invalid(
                    "token_type_mismatch", "The access token is not a DPoP token", scheme
                )
            exp, nbf = self._check_times(claims, now, scheme, required=False)
            return VerifiedToken(name, token, claims, exp, nbf, _bound(claims, scheme), ath, 0)
        keys = self.keys
        assert keys is not None
        claims = _frozen(self._verify_jwt(token, keys, now, scheme), scheme)
        exp, nbf = self._check_times(claims, now, scheme, required=True)
        entry = VerifiedToken(
            name, token, claims, exp, nbf, _bound(claims, scheme), ath, keys.version
        )
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
            raise _invalid("issuer_mismatch", "The access token issuer is not accepted", scheme)
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in self._audience for a in auds):
            raise _invalid("audience_mismatch", "The access token audience is not accepted", scheme)
        return claims

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
