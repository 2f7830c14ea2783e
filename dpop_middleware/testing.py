"""Test kit: client keys that mint DPoP proofs, a local access-token issuer, a live server.

Usable in your own tests (no authorization server needed) and by real clients::

    key = DPoPKey.generate()                      # ES256 by default
    issuer = TokenIssuer()                         # its .jwks plugs into the "jwks" setting
    token = issuer.token(bound_to=key)             # RFC 9068 token with cnf.jkt = key.jkt
    proof = key.proof("GET", "https://api.example/items", access_token=token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}

Clients that sign every request for you (httpx, requests) are in :mod:`dpop_middleware.client`;
the pytest fixtures ``dpop_key`` and ``dpop_issuer`` in :mod:`dpop_middleware.pytest_plugin`.
This module needs only joserfc and cryptography; :func:`serve` imports uvicorn when called.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey, import_key

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

# The algorithm a private JWK implies when it carries no "alg" (RSA keys serve several).
_IMPLIED_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA"}

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
    """A client's DPoP key pair. ``proof()`` signs a fresh proof for one request.

    ``generate()`` makes a new key; ``from_jwk()`` loads one a client stored (``private_jwk``).
    """

    def __init__(self, key: ECKey | RSAKey | OKPKey, alg: str) -> None:
        self.key = key
        self.alg = alg

    def __repr__(self) -> str:
        # The thumbprint is public; the private key never goes into a repr or a log.
        return f"DPoPKey(alg={self.alg!r}, jkt={self.jkt!r})"

    @classmethod
    def generate(cls, alg: str = "ES256") -> DPoPKey:
        """A new key pair for ``alg``: ES256 (default), ES384, ES512, EdDSA, RS256 or PS256."""
        return cls(_generate(alg), alg)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any], alg: str | None = None) -> DPoPKey:
        """Load a private JWK (as ``private_jwk`` gives). ``alg`` defaults to the JWK's ``alg``,
        else the one its curve implies; an RSA key without ``alg`` needs it given."""
        if "d" not in jwk:
            raise ValueError("from_jwk needs a private key (a JWK with 'd')")
        if jwk.get("kty") not in ("EC", "OKP", "RSA"):
            raise ValueError("from_jwk takes an EC, OKP or RSA key")
        chosen = alg or jwk.get("alg") or _IMPLIED_ALG.get(str(jwk.get("crv")))
        if chosen is None:
            raise ValueError("an RSA key needs alg= ('RS256' or 'PS256')")
        if chosen not in _GENERATORS:
            raise ValueError(f"alg must be one of {', '.join(_GENERATORS)}")
        members = {k: v for k, v in jwk.items() if k != "alg"}
        key = import_key(members)
        if not isinstance(key, ECKey | RSAKey | OKPKey):  # pragma: no cover - kty checked above
            raise ValueError("from_jwk takes an EC, OKP or RSA key")
        return cls(key, chosen)

    @property
    def public_jwk(self) -> dict[str, Any]:
        """The public key as a JWK: what goes into the proof header's ``jwk``."""
        return dict(self.key.as_dict(private=False))

    @property
    def private_jwk(self) -> dict[str, Any]:
        """The key pair as a JWK with its ``alg``, for a client that keeps its key. Secret."""
        return {**self.key.as_dict(private=True), "alg": self.alg}

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
        htu: str | None = None,
        claims: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed proof for ``method`` ``url`` (RFC 9449 section 4.2).

        ``url`` may carry a query or fragment: they are dropped from ``htu``. ``access_token``
        adds ``ath``, ``nonce`` the server's nonce. For negative tests: ``iat``, ``jti`` and
        ``htu`` replace the computed values as given; ``claims`` and ``header`` override or add
        members (``REMOVE`` leaves one out), and a ``header`` ``alg`` is also the one signed with.
        """
        payload: dict[str, Any] = {
            "jti": jti or secrets.token_urlsafe(16),
            "htm": method,
            "htu": url.split("#", 1)[0].split("?", 1)[0] if htu is None else htu,
            "iat": int(time.time()) if iat is None else iat,
        }
        if access_token is not None:
            payload["ath"] = ath_for(access_token)
        if nonce is not None:
            payload["nonce"] = nonce
        _merge(payload, claims)
        protected = _merge({"typ": "dpop+jwt", "alg": self.alg, "jwk": self.public_jwk}, header)
        return sign_compact(protected, payload, self.key, protected.get("alg", self.alg))


def _generate(alg: str) -> ECKey | RSAKey | OKPKey:
    if alg not in _GENERATORS:
        raise ValueError(f"alg must be one of {', '.join(_GENERATORS)}, got {alg!r}")
    return _GENERATORS[alg]()


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
        self.key = _generate(alg)

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWK Set, ready for the ``jwks`` setting."""
        jwk = dict(self.key.as_dict(private=False))
        jwk.update({"kid": self.kid, "use": "sig", "alg": self.alg})
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
        """An RFC 9068 access token valid for ``lifetime`` seconds from the issuer's clock.

        ``bound_to`` (a key or a thumbprint) sets ``cnf.jkt`` (RFC 9449 section 6.1); ``claims``
        and ``header`` override or add members (``REMOVE`` leaves one out).
        """
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
        protected = _merge({"typ": "at+jwt", "alg": self.alg, "kid": self.kid}, header)
        return sign_compact(protected, payload, self.key, protected.get("alg", self.alg))


@contextmanager
def serve(app: Any, *, host: str = "127.0.0.1", timeout: float = 5.0) -> Iterator[str]:
    """Run an ASGI ``app`` under uvicorn in a background thread; yield its base URL.

    The server listens on a free port of ``host`` (loopback by default) and is stopped, lifespan
    shutdown included, when the block ends. For tests and demos of clients that need a real
    socket (requests, curl); it needs ``uvicorn``.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    # log_config=None: leave the process's logging configuration alone.
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn:{port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {host}:{port} did not start")
            time.sleep(0.005)
        yield f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


__all__ = ["REMOVE", "DPoPKey", "TokenIssuer", "ath_for", "serve", "sign_compact"]
