"""Test kit: client keys that mint DPoP proofs, and a local access-token issuer.

Usable in your own tests (no authorization server needed) and by real clients::

    key = DPoPKey.generate()                      # ES256 by default
    issuer = TokenIssuer()                         # its .jwks plugs into the "jwks" setting
    token = issuer.token(bound_to=key)             # RFC 9068 token with cnf.jkt = key.jkt
    proof = key.proof("GET", "https://api.example/items", access_token=token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey

from dpop_middleware.core.jose import b64encode

_GENERATORS: dict[str, Callable[[], ECKey | RSAKey | OKPKey]] = {
    "ES256": lambda: ECKey.generate_key("P-256"),
    "ES384": lambda: ECKey.generate_key("P-384"),
    "ES512": lambda: ECKey.generate_key("P-521"),
    "RS256": lambda: RSAKey.generate_key(2048),
    "PS256": lambda: RSAKey.generate_key(2048),
    "EdDSA": lambda: OKPKey.generate_key("Ed25519"),
    "Ed25519": lambda: OKPKey.generate_key("Ed25519"),
}

_REMOVE = object()
#: Pass as a claim or header value to leave that member out (for negative tests).
REMOVE: Any = _REMOVE


def ath_for(access_token: str) -> str:
    """base64url(SHA-256(access token)) as RFC 9449 section 4.2 defines ``ath``."""
    return b64encode(hashlib.sha256(access_token.encode("ascii")).digest())


def _merge(base: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra:
        for name, value in extra.items():
            if value is _REMOVE:
                base.pop(name, None)
            else:
                base[name] = value
    return base


class DPoPKey:
    """A client's DPoP key pair. ``proof()`` signs a fresh proof for one request."""

    def __init__(self, key: ECKey | RSAKey | OKPKey, alg: str) -> None:
        self.key = key
        self.alg = alg

    @classmethod
    def generate(cls, alg: str = "ES256") -> DPoPKey:
        if alg not in _GENERATORS:
            raise ValueError(f"alg must be one of {', '.join(_GENERATORS)}")
        return cls(_GENERATORS[alg](), alg)

    @property
    def public_jwk(self) -> dict[str, Any]:
        return dict(self.key.as_dict(private=False))

    @property
    def jkt(self) -> str:
        """RFC 7638 SHA-256 thumbprint of the public key (what ``cnf.jkt`` carries)."""
        return self.key.thumbprint()

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        iat: float | None = None,
        jti: str | None = None,
        claims: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed proof for ``method`` ``url``. ``url`` may carry a query: it is dropped from
        ``htu`` (RFC 9449 section 4.2). ``claims``/``header`` override or add members
        (``REMOVE`` leaves one out)."""
        htu = url.split("#", 1)[0].split("?", 1)[0]
        payload: dict[str, Any] = {
            "jti": jti or secrets.token_urlsafe(16),
            "htm": method,
            "htu": htu,
            "iat": int(time.time()) if iat is None else iat,
        }
        if access_token is not None:
            payload["ath"] = ath_for(access_token)
        if nonce is not None:
            payload["nonce"] = nonce
        _merge(payload, claims)
        protected = _merge({"typ": "dpop+jwt", "alg": self.alg, "jwk": self.public_jwk}, header)
        return sign_compact(protected, payload, self.key, protected.get("alg", self.alg))


def sign_compact(
    header: Mapping[str, Any], payload: Mapping[str, Any], key: ECKey | RSAKey | OKPKey, alg: str
) -> str:
    """Sign a compact JWS with exactly the given header (joserfc, explicit algorithm list)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return jws.serialize_compact(dict(header), body, key, algorithms=[alg])


class TokenIssuer:
    """A local authorization server stand-in: a signing key, its JWK Set, RFC 9068 tokens."""

    def __init__(
        self,
        issuer: str = "https://issuer.example",
        audience: str = "https://api.example",
        *,
        alg: str = "ES256",
        kid: str = "test-key-1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.alg = alg
        self.kid = kid
        self.clock = clock
        self.key = _GENERATORS[alg]()
        self._kid = kid

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWK Set, ready for the ``jwks`` setting."""
        jwk = dict(self.key.as_dict(private=False))
        jwk.update({"kid": self._kid, "use": "sig", "alg": self.alg})
        return {"keys": [jwk]}

    def settings(self, **extra: Any) -> dict[str, Any]:
        """A settings dict for the middleware that trusts this issuer."""
        return {"issuer": self.issuer, "audience": self.audience, "jwks": self.jwks, **extra}

    def token(
        self,
        *,
        bound_to: DPoPKey | str | None = None,
        lifetime: float = 300,
        claims: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> str:
        """An RFC 9068 access token; ``bound_to`` (a key or a thumbprint) sets ``cnf.jkt``."""
        now = int(self.clock())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "user-123",
            "client_id": "client-abc",
            "iat": now,
            "exp": now + int(lifetime),
            "jti": secrets.token_urlsafe(12),
            "scope": "read",
        }
        if bound_to is not None:
            jkt = bound_to.jkt if isinstance(bound_to, DPoPKey) else bound_to
            payload["cnf"] = {"jkt": jkt}
        _merge(payload, claims)
        protected = _merge({"typ": "at+jwt", "alg": self.alg, "kid": self._kid}, header)
        return sign_compact(protected, payload, self.key, protected.get("alg", self.alg))


__all__ = ["REMOVE", "DPoPKey", "TokenIssuer", "ath_for", "sign_compact"]
