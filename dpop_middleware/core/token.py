"""Access token checks (RFC 9068 JWT access tokens, or a user-supplied verifier) and the key
binding (RFC 9449 section 6).

Verified JWTs are cached by the SHA-256 of the token (the same digest ``ath`` needs, computed once
per request); a cache hit still re-checks ``exp`` and ``nbf`` against the clock, so a cached token
is never accepted past its expiry, and a JWK Set change empties the cache.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError

from dpop_middleware.core.jose import COMPACT_JWS, MalformedError, json_object
from dpop_middleware.core.keys import LRU, IssuerKeys, JWKSFetchNeeded
from dpop_middleware.errors import InvalidTokenError, Scheme, ServiceUnavailableError
from dpop_middleware.settings import Settings

_STRICT_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_LAX_TYPES = _STRICT_TYPES | {"jwt", "application/jwt"}


def _invalid(reason: str, description: str, scheme: Scheme) -> InvalidTokenError:
    return InvalidTokenError(reason, description, scheme=scheme)


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
        # digest -> (claims, JWK Set version it was verified under)
        self._cache: LRU[bytes, tuple[Mapping[str, Any], int]] = LRU(settings.token_cache_size)

    def check(self, token: str, digest: bytes, now: float, scheme: Scheme) -> Mapping[str, Any]:
        """The token's claims, or InvalidTokenError. ``scheme`` says which challenge gets the error."""
        if self._custom is not None:
            claims = self._custom(token)
            if not isinstance(claims, Mapping):
                raise TypeError("token_verifier must return a mapping of claims")
            # RFC 7662: an inactive token is no token.
            if "active" in claims and claims["active"] is not True:
                raise _invalid("token_inactive", "The access token is not active", scheme)
            token_type = claims.get("token_type")
            if token_type is not None and scheme == "DPoP" and str(token_type).lower() != "dpop":
                # RFC 9449 section 6.2: if present it MUST be DPoP.
                raise _invalid(
                    "token_type_mismatch", "The access token is not a DPoP token", scheme
                )
            self._check_times(claims, now, scheme, required=False)
            return claims
        keys = self.keys
        assert keys is not None
        cached = self._cache.get(digest)
        if cached is not None and cached[1] == keys.version:
            self._check_times(cached[0], now, scheme, required=True)
            return cached[0]
        claims = self._verify_jwt(token, keys, now, scheme)
        self._check_times(claims, now, scheme, required=True)
        self._cache.put(digest, (claims, keys.version))
        return claims

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
        except (ValueError, TypeError):
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
        auds = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()
        if not self._audience & {a for a in auds if isinstance(a, str)}:
            raise _invalid("audience_mismatch", "The access token audience is not accepted", scheme)
        return claims

    def _check_times(
        self, claims: Mapping[str, Any], now: float, scheme: Scheme, *, required: bool
    ) -> None:
        exp = claims.get("exp")
        if exp is None and not required:
            pass
        elif isinstance(exp, bool) or not isinstance(exp, int | float):
            raise _invalid("token_exp_missing", "The access token has no valid exp", scheme)
        elif now >= exp + self._leeway:
            raise _invalid("token_expired", "The access token has expired", scheme)
        nbf = claims.get("nbf")
        if nbf is not None:
            if isinstance(nbf, bool) or not isinstance(nbf, int | float):
                raise _invalid("token_malformed", "The access token nbf is not a number", scheme)
            if nbf > now + self._leeway:
                raise _invalid("token_not_yet_valid", "The access token is not yet valid", scheme)


def bound_jkt(claims: Mapping[str, Any]) -> str | None:
    """The ``cnf.jkt`` the token is bound to (RFC 9449 section 6.1), or None if unbound."""
    cnf = claims.get("cnf")
    if isinstance(cnf, Mapping):
        jkt = cnf.get("jkt")
        if isinstance(jkt, str):
            return jkt
    return None


def check_binding(claims: Mapping[str, Any], jkt: str) -> None:
    """RFC 9449 section 6 / step 12: the proof key is the key the token is bound to."""
    bound = bound_jkt(claims)
    if bound is None:
        raise InvalidTokenError("token_not_bound", "The access token is not DPoP-bound")
    if not hmac.compare_digest(bound.encode("utf-8", "surrogatepass"), jkt.encode("ascii")):
        raise InvalidTokenError("jkt_mismatch", "Invalid DPoP key binding")
