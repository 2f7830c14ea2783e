"""Everything a DPoP client needs: its key, a token from the authorization server, signed requests.

* :class:`DPoPKey`: the client's key pair; ``proof()`` signs a proof for one request (RFC 9449
  section 4).
* :class:`TokenClient`: gets a DPoP-bound access token from an authorization server's token
  endpoint (RFC 9449 section 5), found by discovery from the issuer (RFC 8414), and caches it
  until shortly before it expires. Client credentials and refresh token grants;
  ``client_secret_basic``, ``client_secret_post`` or ``none`` client authentication.
* :class:`HttpxDPoPAuth` (``httpx.Client`` and ``AsyncClient``) and :class:`RequestsDPoPAuth`:
  sign a fresh proof for every request, with ``ath`` for the access token, and send
  ``Authorization: DPoP <token>``; the token is fixed (``access_token=``) or comes from a
  :class:`TokenClient` (``tokens=``).

Nonces (RFC 9449 sections 8 and 9) are handled for you:

* the latest ``DPoP-Nonce`` seen on any response from a server (a 200 too) goes into the next
  proof sent to that server (remembered per origin: a nonce is only good where it was issued);
* a refusal that asks for a nonce is retried once with it: a resource server's 401 with
  ``error="use_dpop_nonce"`` in ``WWW-Authenticate`` (section 9), or an authorization server's
  400 carrying a new ``DPoP-Nonce`` (section 8, where the error is in the body).

httpx::

    from dpop_middleware.client import DPoPKey, HttpxDPoPAuth, TokenClient
    key = DPoPKey.generate()                       # the key the token is bound to
    tokens = TokenClient(key, issuer="https://as.example", client_id="app", client_secret="...")
    with httpx.Client(auth=HttpxDPoPAuth(key, tokens=tokens)) as client:
        client.get("https://api.example/items")

requests::

    from dpop_middleware.client import RequestsDPoPAuth
    requests.get("https://api.example/items", auth=RequestsDPoPAuth(key, access_token=token))

Without a token the helpers sign proofs only (no ``ath``, no ``Authorization``).

httpx and requests are optional dependencies: each helper exists when its library is installed,
and asking for it otherwise raises an ImportError that names the package to install;
:class:`TokenClient` needs httpx for its requests. Redirects are followed by the HTTP library with
the first request's proof, whose ``htu`` no longer matches: a DPoP-protected API should not
redirect, or the client should not follow. A token, proof, secret or key never goes into an
error message or a repr.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote_plus, urlencode, urlsplit

from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey, import_key

from dpop_middleware.core.jose import b64encode

if TYPE_CHECKING:
    import httpx as httpx_types


# -- the client's key ---------------------------------------------------------------------------

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


# -- tokens from the authorization server -------------------------------------------------------

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
_AUTH_METHODS: tuple[str, ...] = ("client_secret_basic", "client_secret_post", "none")
#: Token responses and metadata documents are small; anything larger is refused unread.
MAX_RESPONSE_BYTES = 1 << 20


class TokenError(Exception):
    """The token request failed. ``error`` is the authorization server's error code (RFC 6749
    section 5.2) or ours (``discovery_failed``, ``issuer_mismatch``, ``invalid_response``,
    ``token_type_mismatch``, ``request_failed``); ``status`` the HTTP status, if there was one."""

    def __init__(self, error: str, description: str = "", status: int | None = None) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status = status


class DiscoveryError(TokenError):
    """The issuer's metadata could not be found or is not acceptable (RFC 8414 section 3)."""


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A token response (RFC 6749 section 5.1). The repr never shows the tokens."""

    access_token: str = field(repr=False)
    token_type: str
    #: When the token expires (the client's clock), or None when the server said nothing.
    expires_at: float | None
    scope: str | None = None
    refresh_token: str | None = field(default=None, repr=False)


def _local_http_ok(url: str) -> bool:
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    return parts.scheme == "https" or (parts.scheme == "http" and local)


def _require_url(name: str, url: str) -> str:
    if not isinstance(url, str) or not _local_http_ok(url):
        raise ValueError(f"{name} must be an https:// URL (http:// only for localhost)")
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"{name} must have no query and no fragment")
    return url


def metadata_urls(issuer: str) -> list[str]:
    """Where the issuer's metadata may be, in the order to try.

    RFC 8414 section 3.1: ``/.well-known/oauth-authorization-server`` is inserted between the
    host and the issuer's path (``https://as.example/t1`` ->
    ``https://as.example/.well-known/oauth-authorization-server/t1``); then OpenID Connect
    Discovery 1.0 section 4: ``/.well-known/openid-configuration`` appended to the issuer.
    """
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    return [
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{origin}{path}/.well-known/openid-configuration",
    ]


def check_metadata(document: Any, issuer: str, alg: str, auth_method: str) -> str:
    """The token endpoint of an issuer's metadata document, after the checks a client owes.

    RFC 8414 section 3.3: the ``issuer`` in the document MUST be identical to the one the URL was
    built from (else an attacker's document could name its own endpoints). RFC 9449 section 5.1:
    ``dpop_signing_alg_values_supported``, when present, must list our key's algorithm; RFC 8414
    section 2: ``token_endpoint_auth_methods_supported`` (default ``client_secret_basic``) our
    client authentication method.
    """
    if not isinstance(document, dict):
        raise DiscoveryError("invalid_response", "the metadata document is not a JSON object")
    if document.get("issuer") != issuer:
        raise DiscoveryError(
            "issuer_mismatch",
            "the metadata document's issuer is not the issuer asked for (RFC 8414 section 3.3)",
        )
    endpoint = document.get("token_endpoint")
    if not isinstance(endpoint, str) or not _local_http_ok(endpoint):
        raise DiscoveryError(
            "invalid_response", "the metadata has no https token_endpoint (RFC 8414 section 2)"
        )
    algs = document.get("dpop_signing_alg_values_supported")
    if isinstance(algs, list) and alg not in algs:
        supported = ", ".join(str(a) for a in algs[:20])
        raise DiscoveryError(
            "alg_not_supported",
            f"the server accepts DPoP proofs signed with {supported}, not {alg} "
            "(RFC 9449 section 5.1): generate a key with one of those",
        )
    methods = document.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
    if isinstance(methods, list) and auth_method not in methods:
        raise DiscoveryError(
            "auth_method_not_supported",
            f"the server does not support {auth_method} at the token endpoint; it lists "
            + ", ".join(str(m) for m in methods[:20]),
        )
    return endpoint


def _json_body(content: bytes) -> Any:
    if len(content) > MAX_RESPONSE_BYTES:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def _jwt_exp(token: str) -> float | None:
    """The ``exp`` of a JWT access token, read without verifying it (only to know when to renew:
    the client cannot and need not verify a token meant for the resource server)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


_RETRY = object()


class TokenClient:
    """Gets DPoP-bound access tokens from an authorization server, and caches them.

    Give the ``issuer`` (the token endpoint is found by discovery, RFC 8414) or the
    ``token_endpoint`` itself. With a ``client_secret`` the client authenticates with
    ``client_secret_basic`` (default) or ``client_secret_post`` (RFC 6749 section 2.3.1) and uses
    the client credentials grant; with a ``refresh_token`` it uses the refresh token grant. A
    refresh token the server returns is used for the next renewal (and replaced when the server
    rotates it); if the server refuses it, a confidential client falls back to client credentials.

    Every token request carries a ``DPoP`` proof for ``POST`` and the token endpoint, without
    ``ath`` (RFC 9449 section 5), with the server's latest nonce; a ``400`` with
    ``error=use_dpop_nonce`` and a ``DPoP-Nonce`` header is retried once with that nonce (section
    8). A response whose ``token_type`` is not ``DPoP`` is refused: the server did not bind the
    token (section 5). :meth:`token` / :meth:`atoken` return the cached token until
    ``refresh_margin`` seconds (at most half its lifetime) before ``expires_in`` or, without it,
    the JWT's ``exp``; a token with neither is kept until :meth:`invalidate`.

    Requests go through ``http`` / ``async_http`` when given (your ``httpx`` clients: TLS,
    proxies, timeouts), else through a short-lived client with ``timeout``. Never follows
    redirects: the proof is for the token endpoint itself.
    """

    def __init__(
        self,
        key: DPoPKey,
        *,
        client_id: str,
        client_secret: str | None = None,
        issuer: str | None = None,
        token_endpoint: str | None = None,
        auth_method: ClientAuthMethod | None = None,
        scope: str | None = None,
        refresh_token: str | None = None,
        params: Mapping[str, str] | None = None,
        refresh_margin: float = 30.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        http: httpx_types.Client | None = None,
        async_http: httpx_types.AsyncClient | None = None,
    ) -> None:
        if (issuer is None) == (token_endpoint is None):
            raise ValueError("give exactly one of issuer= (discovery) or token_endpoint=")
        if not isinstance(client_id, str) or not client_id:
            raise ValueError("client_id must be a non-empty string")
        method = auth_method or ("client_secret_basic" if client_secret else "none")
        if method not in _AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {', '.join(_AUTH_METHODS)}")
        if method != "none" and not client_secret:
            raise ValueError(f"{method} needs client_secret=")
        if method == "none" and refresh_token is None:
            # RFC 6749 section 4.4: the client credentials grant is for confidential clients only.
            raise ValueError("a public client (no client_secret) needs refresh_token=")
        self.key = key
        self.client_id = client_id
        self.issuer = _require_url("issuer", issuer) if issuer is not None else None
        self.token_endpoint = (
            _require_url("token_endpoint", token_endpoint) if token_endpoint is not None else None
        )
        self.auth_method: str = method
        self.scope = scope
        self.params = dict(params or {})
        self.refresh_margin = refresh_margin
        self.timeout = timeout
        self.clock = clock
        self.http = http
        self.async_http = async_http
        #: The latest ``DPoP-Nonce`` of the authorization server (RFC 9449 section 8).
        self.nonce: str | None = None
        self._secret = client_secret
        self._refresh_token = refresh_token
        self._current: AccessToken | None = None
        self._renew_at = 0.0
        self._lock = threading.Lock()
        self._async_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        where = self.issuer or self.token_endpoint
        return f"TokenClient(client_id={self.client_id!r}, server={where!r}, key={self.key!r})"

    # -- the cache -------------------------------------------------------------------------------

    def cached(self) -> AccessToken | None:
        """The current token if it is not due for renewal, else None."""
        current = self._current
        if current is None:
            return None
        if current.expires_at is not None and self.clock() >= self._renew_at:
            return None
        return current

    def invalidate(self, access_token: str | None = None) -> None:
        """Forget the cached token (only if it is ``access_token``, when given): the next call
        gets a new one. The auth helpers call this when a resource server says
        ``invalid_token``."""
        current = self._current
        if current is not None and (access_token is None or access_token == current.access_token):
            self._current = None

    def _keep(self, answer: AccessToken, asked_at: float) -> AccessToken:
        self._current = answer
        if answer.refresh_token is not None:
            self._refresh_token = answer.refresh_token
        if answer.expires_at is not None:
            margin = min(self.refresh_margin, max(answer.expires_at - asked_at, 0.0) / 2)
            self._renew_at = answer.expires_at - margin
        return answer

    # -- sans-IO: the request and the answer -----------------------------------------------------

    def _grants(self) -> list[dict[str, str]]:
        """The grants to try in order: the refresh token (if any), then client credentials."""
        grants: list[dict[str, str]] = []
        if self._refresh_token is not None:
            grants.append({"grant_type": "refresh_token", "refresh_token": self._refresh_token})
        if self.auth_method != "none":
            grant = {"grant_type": "client_credentials"}
            if self.scope is not None:
                grant["scope"] = self.scope
            grants.append(grant)
        return grants

    def _request(self, endpoint: str, grant: Mapping[str, str]) -> tuple[dict[str, str], bytes]:
        """Headers and form body of one token request (RFC 6749 sections 2.3.1, 4.4.2, 6)."""
        form = {**self.params, **grant}
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            # RFC 9449 section 5: a proof for POST to the token endpoint, no ath.
            "DPoP": self.key.proof("POST", endpoint, nonce=self.nonce, iat=int(self.clock())),
        }
        if self.auth_method == "client_secret_basic":
            assert self._secret is not None
            # RFC 6749 section 2.3.1: both form-urlencoded before Basic encoding.
            pair = f"{quote_plus(self.client_id)}:{quote_plus(self._secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = self.client_id
            if self.auth_method == "client_secret_post":
                assert self._secret is not None
                form["client_secret"] = self._secret
        return headers, urlencode(form).encode()

    def _answer(
        self, status: int, headers: Mapping[str, str], content: bytes, asked_at: float, first: bool
    ) -> AccessToken | object:
        """The token, or ``_RETRY`` (once) for ``use_dpop_nonce``; TokenError otherwise."""
        nonce = headers.get("dpop-nonce")
        sent = self.nonce
        if nonce:
            self.nonce = nonce
        body = _json_body(content)
        if status != 200:
            error = body.get("error") if isinstance(body, dict) else None
            error = error if isinstance(error, str) and error else "request_failed"
            # RFC 9449 section 8: the server asks for a nonce with a 400 and a DPoP-Nonce header.
            if status == 400 and error == "use_dpop_nonce" and nonce and first and nonce != sent:
                return _RETRY
            description = body.get("error_description") if isinstance(body, dict) else None
            text = description[:300] if isinstance(description, str) else f"HTTP {status}"
            raise TokenError(error, text, status)
        if not isinstance(body, dict):
            raise TokenError("invalid_response", "the token response is not a JSON object", status)
        access_token = body.get("access_token")
        token_type = body.get("token_type")
        if not isinstance(access_token, str) or not access_token:
            raise TokenError("invalid_response", "the token response has no access_token", status)
        if not isinstance(token_type, str) or token_type.lower() != "dpop":
            # RFC 9449 section 5: a DPoP-bound token comes with token_type DPoP; any other type
            # means the server did not bind it to our key.
            raise TokenError(
                "token_type_mismatch",
                f"the server issued a {str(token_type)[:20]!r} token, not a DPoP-bound one "
                "(RFC 9449 section 5): is DPoP enabled for this client?",
                status,
            )
        expires_in = body.get("expires_in")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            expires_at: float | None = asked_at + float(expires_in)
        else:
            expires_at = _jwt_exp(access_token)
        refresh = body.get("refresh_token")
        scope = body.get("scope")
        return AccessToken(
            access_token,
            token_type,
            expires_at,
            scope if isinstance(scope, str) else self.scope,
            refresh if isinstance(refresh, str) and refresh else None,
        )

    def _fallback(self, error: TokenError, grant: Mapping[str, str], left: int) -> None:
        """After a refused refresh token: forget it and try the next grant, or raise."""
        if grant.get("grant_type") == "refresh_token" and error.error == "invalid_grant":
            self._refresh_token = None
            if left:
                return
        raise error

    # -- sync I/O --------------------------------------------------------------------------------

    @contextmanager
    def _client(self) -> Iterator[httpx_types.Client]:
        if self.http is not None:
            yield self.http
            return
        httpx = _httpx()
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            yield client

    def token(self) -> AccessToken:
        """A valid token: the cached one, or a new one from the token endpoint."""
        with self._lock:
            cached = self.cached()
            if cached is not None:
                return cached
            with self._client() as client:
                endpoint = self.token_endpoint or self._discover(client)
                grants = self._grants()
                for index, grant in enumerate(grants):
                    try:
                        return self._post(client, endpoint, grant)
                    except TokenError as error:
                        self._fallback(error, grant, len(grants) - index - 1)
            raise TokenError("invalid_grant", "no grant left to try")  # pragma: no cover

    def _discovered(self, url: str, status: int, content: bytes, tried: list[str]) -> str | None:
        """The token endpoint from one metadata answer (sync and async discovery alike), or None
        with the reason added to ``tried``."""
        assert self.issuer is not None
        if status != 200:
            tried.append(f"{url} answered {status}")
            return None
        endpoint = check_metadata(_json_body(content), self.issuer, self.key.alg, self.auth_method)
        self.token_endpoint = endpoint
        return endpoint

    def _discover(self, client: httpx_types.Client) -> str:
        assert self.issuer is not None
        httpx = _httpx()
        tried: list[str] = []
        for url in metadata_urls(self.issuer):
            try:
                response = client.get(url, headers={"Accept": "application/json"})
            except httpx.HTTPError as exc:
                raise DiscoveryError(
                    "discovery_failed", f"GET {url}: {type(exc).__name__}"
                ) from exc
            endpoint = self._discovered(url, response.status_code, response.content, tried)
            if endpoint is not None:
                return endpoint
        raise DiscoveryError("discovery_failed", "; ".join(tried))

    def _post(
        self, client: httpx_types.Client, endpoint: str, grant: Mapping[str, str]
    ) -> AccessToken:
        httpx = _httpx()
        for first in (True, False):
            headers, body = self._request(endpoint, grant)
            asked_at = self.clock()
            try:
                response = client.post(endpoint, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise TokenError(
                    "request_failed", f"POST {endpoint}: {type(exc).__name__}"
                ) from exc
            answer = self._answer(
                response.status_code, response.headers, response.content, asked_at, first
            )
            if isinstance(answer, AccessToken):
                return self._keep(answer, asked_at)
        raise TokenError("use_dpop_nonce", "the server asked for a nonce twice", 400)

    # -- async I/O (the same steps) --------------------------------------------------------------

    async def atoken(self) -> AccessToken:
        """:meth:`token` for asyncio, through ``async_http`` or a short-lived AsyncClient."""
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            cached = self.cached()
            if cached is not None:
                return cached
            if self.async_http is not None:
                return await self._aobtain(self.async_http)
            httpx = _httpx()
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
                return await self._aobtain(client)

    async def _aobtain(self, client: httpx_types.AsyncClient) -> AccessToken:
        endpoint = self.token_endpoint or await self._adiscover(client)
        grants = self._grants()
        for index, grant in enumerate(grants):
            try:
                return await self._apost(client, endpoint, grant)
            except TokenError as error:
                self._fallback(error, grant, len(grants) - index - 1)
        raise TokenError("invalid_grant", "no grant left to try")  # pragma: no cover

    async def _adiscover(self, client: httpx_types.AsyncClient) -> str:
        assert self.issuer is not None
        httpx = _httpx()
        tried: list[str] = []
        for url in metadata_urls(self.issuer):
            try:
                response = await client.get(url, headers={"Accept": "application/json"})
            except httpx.HTTPError as exc:
                raise DiscoveryError(
                    "discovery_failed", f"GET {url}: {type(exc).__name__}"
                ) from exc
            endpoint = self._discovered(url, response.status_code, response.content, tried)
            if endpoint is not None:
                return endpoint
        raise DiscoveryError("discovery_failed", "; ".join(tried))

    async def _apost(
        self, client: httpx_types.AsyncClient, endpoint: str, grant: Mapping[str, str]
    ) -> AccessToken:
        httpx = _httpx()
        for first in (True, False):
            headers, body = self._request(endpoint, grant)
            asked_at = self.clock()
            try:
                response = await client.post(endpoint, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise TokenError(
                    "request_failed", f"POST {endpoint}: {type(exc).__name__}"
                ) from exc
            answer = self._answer(
                response.status_code, response.headers, response.content, asked_at, first
            )
            if isinstance(answer, AccessToken):
                return self._keep(answer, asked_at)
        raise TokenError("use_dpop_nonce", "the server asked for a nonce twice", 400)


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise ImportError(
            "dpop_middleware.client.TokenClient needs httpx: pip install httpx"
        ) from None
    return httpx


# -- auth for HTTP libraries ---------------------------------------------------------------------

# RFC 6750 section 3: the error attribute of the challenge, quoted or as a token.
_USE_DPOP_NONCE = re.compile(r'(?:^|[\s,])error\s*=\s*(?:"use_dpop_nonce"|use_dpop_nonce\b)', re.I)
_INVALID_TOKEN = re.compile(r'(?:^|[\s,])error\s*=\s*(?:"invalid_token"|invalid_token\b)', re.I)
_UNSET: Any = object()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


class DPoPAuthBase:
    """What both helpers share: the key, the token (fixed, or from a :class:`TokenClient`), and
    the latest nonce of each server."""

    def __init__(
        self, key: DPoPKey, access_token: str | None = None, *, tokens: TokenClient | None = None
    ) -> None:
        if tokens is not None:
            if access_token is not None:
                raise ValueError("give access_token= or tokens=, not both")
            if tokens.key.jkt != key.jkt:
                # The server binds the token to the key of the token request's proof.
                raise ValueError("tokens= must use the same DPoPKey as the auth")
        self.key = key
        self.access_token = access_token
        self.tokens = tokens
        #: Latest ``DPoP-Nonce`` per origin (``scheme://host:port``).
        self.nonces: dict[str, str] = {}

    def headers_for(
        self, method: str, url: str, access_token: str | None = _UNSET
    ) -> dict[str, str]:
        """A fresh proof for ``method`` ``url`` (and the token): the headers to send."""
        token = self.access_token if access_token is _UNSET else access_token
        proof = self.key.proof(method, url, access_token=token, nonce=self.nonces.get(_origin(url)))
        if token is None:
            return {"DPoP": proof}
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    def observe(
        self, url: str, status: int, headers: Mapping[str, str], sent_token: str | None = None
    ) -> bool:
        """Remember the response's ``DPoP-Nonce``; True if the server refused for want of it.

        A 401 ``invalid_token`` for a token from ``tokens`` drops it from the cache, so the next
        request gets a new one (it may have been revoked).
        """
        if (
            status == 401
            and self.tokens is not None
            and sent_token is not None
            and _INVALID_TOKEN.search(headers.get("www-authenticate", ""))
        ):
            self.tokens.invalidate(sent_token)
        nonce = headers.get("dpop-nonce")
        if not nonce:
            return False
        origin = _origin(url)
        sent = self.nonces.get(origin)
        self.nonces[origin] = nonce
        if status == 401:
            return _USE_DPOP_NONCE.search(headers.get("www-authenticate", "")) is not None
        return status == 400 and nonce != sent


_MISSING = {
    "HttpxDPoPAuth": "httpx",
    "Httpx2DPoPAuth": "httpx2",
    "RequestsDPoPAuth": "requests",
}

try:
    import httpx
except ImportError:  # httpx is optional: HttpxDPoPAuth is then missing (see __getattr__)
    pass
else:

    class HttpxDPoPAuth(DPoPAuthBase, httpx.Auth):
        """``httpx.Auth`` for DPoP; the same object works with ``Client`` and ``AsyncClient``.

        With ``tokens=`` the token comes from the :class:`TokenClient` (fetched with a sync or an
        async request to match the client in use).
        """

        def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
            return self._flow(request, self.access_token)

        def _flow(
            self, request: httpx.Request, token: str | None
        ) -> Generator[httpx.Request, httpx.Response]:
            url = str(request.url)
            request.headers.update(self.headers_for(request.method, url, token))
            response = yield request
            if self.observe(url, response.status_code, response.headers, token):
                request.headers.update(self.headers_for(request.method, url, token))
                response = yield request
                self.observe(url, response.status_code, response.headers, token)

        def sync_auth_flow(
            self, request: httpx.Request
        ) -> Generator[httpx.Request, httpx.Response, None]:
            if self.tokens is None:
                yield from super().sync_auth_flow(request)
                return
            yield from self._flow(request, self.tokens.token().access_token)

        async def async_auth_flow(
            self, request: httpx.Request
        ) -> AsyncGenerator[httpx.Request, httpx.Response]:
            token = self.access_token
            if self.tokens is not None:
                token = (await self.tokens.atoken()).access_token
            flow = self._flow(request, token)
            request = next(flow)
            while True:
                response = yield request
                try:
                    request = flow.send(response)
                except StopIteration:
                    break


try:
    import httpx2
except ImportError:  # httpx2 (the MCP SDK 2's HTTP client) is optional: see __getattr__
    pass
else:

    class Httpx2DPoPAuth(DPoPAuthBase, httpx2.Auth):
        """The same auth for ``httpx2`` (the HTTP client of the MCP Python SDK 2)."""

        def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response]:
            url = str(request.url)
            request.headers.update(self.headers_for(request.method, url))
            response = yield request
            if self.observe(url, response.status_code, response.headers):
                request.headers.update(self.headers_for(request.method, url))
                response = yield request
                self.observe(url, response.status_code, response.headers)


try:
    import requests
    from requests.cookies import extract_cookies_to_jar
except ImportError:  # requests is optional: RequestsDPoPAuth is then missing (see __getattr__)
    pass
else:

    class RequestsDPoPAuth(DPoPAuthBase, requests.auth.AuthBase):
        """``requests`` auth for DPoP: signs each request; a response hook retries once.

        With ``tokens=`` the token comes from the :class:`TokenClient` (needs httpx)."""

        def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
            assert r.method is not None and r.url is not None
            token = self.tokens.token().access_token if self.tokens else self.access_token
            r.headers.update(self.headers_for(r.method, r.url, token))
            # A file body is read by the first send: note where it starts, to resend it.
            tell = getattr(r.body, "tell", None)
            start = tell() if callable(tell) else None

            def on_response(response: requests.Response, **kwargs: Any) -> requests.Response:
                return self._on_response(response, start, token, **kwargs)

            r.register_hook("response", on_response)
            return r

        def _on_response(
            self, response: requests.Response, start: int | None, token: str | None, **kwargs: Any
        ) -> requests.Response:
            sent = response.request
            assert sent.method is not None and sent.url is not None
            if not self.observe(sent.url, response.status_code, response.headers, token):
                return response
            # As requests' own HTTPDigestAuth does: drain, then resend on the same adapter.
            _ = response.content
            response.close()
            retry = sent.copy()
            if start is not None:
                retry.body.seek(start)  # type: ignore[union-attr]
            if retry._cookies is not None:
                extract_cookies_to_jar(retry._cookies, sent, response.raw)
                retry.prepare_cookies(retry._cookies)
            assert retry.method is not None and retry.url is not None
            retry.headers.update(self.headers_for(retry.method, retry.url, token))
            second: requests.Response = response.connection.send(retry, **kwargs)
            second.history.append(response)
            second.request = retry
            self.observe(retry.url, second.status_code, second.headers, token)
            return second


def __getattr__(name: str) -> Any:
    if name in _MISSING:
        package = _MISSING[name]
        raise ImportError(f"dpop_middleware.client.{name} needs {package}: pip install {package}")
    raise AttributeError(f"module 'dpop_middleware.client' has no attribute {name!r}")


__all__ = [
    "REMOVE",
    "AccessToken",
    "ClientAuthMethod",
    "DPoPAuthBase",
    "DPoPKey",
    "DiscoveryError",
    "Httpx2DPoPAuth",
    "HttpxDPoPAuth",
    "RequestsDPoPAuth",
    "TokenClient",
    "TokenError",
    "ath_for",
    "check_metadata",
    "metadata_urls",
    "sign_compact",
]
