"""Settings: a plain dict in, a frozen, validated :class:`Settings` out.

Everything is checked once, at construction, so that a typo or a bad value stops the application
at start-up instead of silently weakening a check. Unknown keys are an error (with a "did you
mean" hint); every error names the key, the value and what is allowed.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import inspect
import ipaddress
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from dpop_middleware.errors import ConfigurationError

if TYPE_CHECKING:
    from dpop_middleware.core.metadata import ResourceMetadata
    from dpop_middleware.observe import Observer

#: Proof algorithms we can verify (RFC 7518, RFC 8037, RFC 9864). Never ``none``, never HMAC.
SUPPORTED_ALGORITHMS: tuple[str, ...] = (
    "ES256", "ES384", "ES512",
    "PS256", "PS384", "PS512",
    "RS256", "RS384", "RS512",
    "EdDSA", "Ed25519",
)  # fmt: skip
DEFAULT_ALGORITHMS: tuple[str, ...] = (
    "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "RS256", "EdDSA", "Ed25519",
)  # fmt: skip
DEFAULT_ACCESS_TOKEN_ALGORITHMS: tuple[str, ...] = SUPPORTED_ALGORITHMS

Mode = Literal["dpop", "dpop_or_bearer", "report_only"]
MODES: tuple[str, ...] = ("dpop", "dpop_or_bearer", "report_only")
Preflight = Literal["verify", "pass"]
PREFLIGHT: tuple[str, ...] = ("verify", "pass")
Freshness = Literal["iat_and_nonce", "nonce_only"]
FRESHNESS: tuple[str, ...] = ("iat_and_nonce", "nonce_only")
TokenSource = Literal["auto", "jwt", "introspection"]
TOKEN_SOURCES: tuple[str, ...] = ("auto", "jwt", "introspection")
AuthMethod = Literal["client_secret_basic", "client_secret_post"]
AUTH_METHODS: tuple[str, ...] = ("client_secret_basic", "client_secret_post")

TokenVerifier = Callable[[str], Mapping[str, Any]]
RefusalHook = Callable[[str, Mapping[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class NonceSettings:
    """Server-provided nonces (RFC 9449 sections 8 and 9)."""

    secrets: tuple[bytes, ...]
    lifetime: float
    accepted_steps: int
    #: ``True``: every protected path; a tuple of path prefixes; ``False``: issued, never required.
    required: bool | tuple[str, ...]
    context: str
    #: ``"iat_and_nonce"``: a valid nonce and ``iat`` inside the window, both; ``"nonce_only"``:
    #: a valid nonce replaces the ``iat`` check (RFC 9449 section 11.1), any client clock passes.
    freshness: Freshness = "iat_and_nonce"

    @property
    def max_age(self) -> float:
        """How long after it is first issued a nonce is still accepted, at most."""
        return self.lifetime * self.accepted_steps


@dataclass(frozen=True, slots=True)
class IntrospectionSettings:
    """Token introspection (RFC 7662): how this resource server authenticates to the endpoint.

    ``client_secret`` is left out of ``repr`` so that no log or traceback of the settings shows it.
    """

    client_id: str
    client_secret: str = field(repr=False)
    #: None: the ``introspection_endpoint`` of the issuer's metadata (RFC 8414).
    endpoint: str | None = None
    auth_method: AuthMethod = "client_secret_basic"
    timeout: float = 5.0
    #: The longest an active answer is reused (never past the token's ``exp``).
    cache_ttl: float = 60.0


#: A required claim value: a JSON string, integer or boolean.
ClaimValue = str | int | bool
#: Required claims as (name, value) pairs.
ClaimRequirements = tuple[tuple[str, ClaimValue], ...]


@dataclass(frozen=True, slots=True)
class ScopeRule:
    """One ``required_scopes`` rule: requests under ``path`` (whole segments, as routed) with one
    of ``methods`` (``None``: every method) need every scope in ``scopes`` and every claim value
    in ``claims``."""

    path: str
    scopes: tuple[str, ...]
    methods: frozenset[str] | None = None
    claims: ClaimRequirements = ()


@dataclass(frozen=True, slots=True)
class PublicURL:
    scheme: str
    authority: str
    #: None: only scheme and host are fixed, the mount prefix is the server's (a ``public_url``
    #: implied by ``resource_metadata``, which cannot tell the mount prefix from the route).
    prefix: str | None


@dataclass(frozen=True, slots=True)
class Settings:
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    jwks: Mapping[str, Any] | None = None
    jwks_uri: str | None = None
    jwks_cache_ttl: float = 300.0
    jwks_max_stale: float = 3600.0
    jwks_refresh_interval: float = 5.0
    jwks_fetch_timeout: float = 5.0
    token_verifier: TokenVerifier | None = None
    #: How long a ``token_verifier``'s claims are reused (never past their ``exp``); 0: never.
    token_verifier_cache_ttl: float = 60.0
    #: RFC 7662 introspection of opaque tokens (and of JWTs not from our issuer, with "auto").
    introspection: IntrospectionSettings | None = None
    #: ``"auto"``: a JWS from our issuer is checked locally, anything else introspected;
    #: ``"jwt"``: local checks only; ``"introspection"``: every token introspected.
    token_source: TokenSource = "auto"  # noqa: S105 - not a secret
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    access_token_algorithms: tuple[str, ...] = DEFAULT_ACCESS_TOKEN_ALGORITHMS
    strict_access_token_typ: bool = False
    proof_max_age: float = 60.0
    clock_skew: float = 10.0
    leeway: float = 5.0
    max_proof_size: int = 8192
    max_token_size: int = 16384
    max_jti_length: int = 128
    replay_store: Any = "memory://"
    nonce: NonceSettings | None = None
    mode: Mode = "dpop"
    exclude_paths: tuple[str, ...] = ()
    required_scopes: tuple[ScopeRule, ...] = ()
    cors_preflight: Preflight = "verify"
    max_path_length: int = 8192
    public_url: PublicURL | None = None
    #: RFC 9728 protected resource metadata (core/metadata.py), served and linked from challenges.
    resource_metadata: ResourceMetadata | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    on_refusal: RefusalHook | None = None
    realm: str | None = None
    #: Answer every 400/403 refusal as 401 with the DPoP challenge (the MCP profile, SEP-1932).
    always_401: bool = False
    key_cache_size: int = 1024
    token_cache_size: int = 10_000
    clock: Callable[[], float] = field(default=time.time)
    #: Observers (dpop_middleware.observe), built at start-up from ``metrics``, ``tracing`` and
    #: ``observers``; the Engine calls them, or nothing when all three are off.
    metrics: Observer | None = None
    tracing: Observer | None = None
    observers: tuple[Observer, ...] = ()

    @property
    def algs_value(self) -> str:
        """The space-separated ``algs`` challenge parameter (RFC 9449 section 7.1)."""
        return " ".join(self.algorithms)

    @property
    def replay_ttl(self) -> float:
        """How long a jti must be remembered: the whole window in which its proof is accepted.

        By ``iat``: from ``now - proof_max_age`` to ``now + clock_skew``, so a proof minted at the
        far future edge stays acceptable for ``proof_max_age + clock_skew``. ``iat`` is checked in
        every mode but ``nonce.freshness="nonce_only"``, where a proof is accepted as long as its
        nonce is (RFC 9449 section 11.1), so the TTL covers that too.
        """
        window = self.proof_max_age + self.clock_skew
        if self.nonce is not None and self.nonce.freshness == "nonce_only":
            window = max(window, self.nonce.max_age + self.nonce.lifetime)
        return window + 1.0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Settings:
        return _build(raw)


# --------------------------------------------------------------------------------------------
# validation

_KEYS: tuple[str, ...] = tuple(f for f in Settings.__dataclass_fields__)
_INTROSPECTION_KEYS = (
    "client_id", "client_secret", "endpoint", "auth_method", "timeout", "cache_ttl",
)  # fmt: skip
_NONCE_KEYS = ("secret", "lifetime", "accepted_steps", "required", "context", "freshness")
_RULE_KEYS = ("path", "methods", "scopes", "claims")
#: RFC 6749 section 3.3: scope-token = 1*NQCHAR (no space, no quote, no backslash).
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
#: RFC 9110 section 5.6.2 token, upper-case letters only (methods are case-sensitive, 9.1).
_METHOD = re.compile(r"[A-Z0-9!#$%&'*+\-.^_`|~]+")


def _fail(key: str, value: Any, allowed: str) -> ConfigurationError:
    shown = "<callable>" if callable(value) else repr(value)
    if key in ("nonce.secret", "introspection.client_secret") or (
        # A string where a dict belongs is most likely the secret itself: "nonce": SECRET.
        key in ("nonce", "introspection") and isinstance(value, str | bytes)
    ):
        shown = "<secret>"
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return ConfigurationError(f"dpop_middleware setting {key!r}: got {shown}; allowed: {allowed}")


def _unknown(keys: Sequence[str], known: Sequence[str], where: str) -> None:
    for key in keys:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigurationError(
                f"dpop_middleware: unknown setting {where}{key!r}{extra}; "
                f"known settings: {', '.join(known)}"
            )


def _number(
    raw: Mapping[str, Any],
    key: str,
    default: float,
    *,
    low: float,
    high: float,
    name: str | None = None,
) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _fail(name or key, value, f"a number of seconds from {low:g} to {high:g}")
    return float(value)


def _integer(raw: Mapping[str, Any], key: str, default: int, *, low: int, high: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(key, value, f"a whole number from {low} to {high}")
    return value


def _algorithms(raw: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = raw.get(key, default)
    allowed = f"a non-empty list drawn from {', '.join(SUPPORTED_ALGORITHMS)}"
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise _fail(key, value, allowed)
    for alg in value:
        if not isinstance(alg, str):
            raise _fail(key, value, allowed)
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise _fail(
                key,
                value,
                f"asymmetric signature algorithms only (RFC 9449 section 4.2); {allowed}",
            )
        if alg not in SUPPORTED_ALGORITHMS:
            raise _fail(key, value, allowed)
    return tuple(dict.fromkeys(value))


def _is_async(value: Any) -> bool:
    """``value`` is an ``async def`` (or async generator) function, an object whose ``__call__``
    is one, a ``functools.partial`` of either, or marked as a coroutine function
    (``inspect.markcoroutinefunction``; on Python 3.11, asgiref's marker)."""
    while isinstance(value, functools.partial):
        value = value.func
    # ``value(...)`` runs ``type(value).__call__``: for an object, the method that matters.
    for func in (value, type(value).__call__):
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            return True
        if sys.version_info < (3, 12) and asyncio.iscoroutinefunction(func):
            return True
    return False


def _is_async_generator(value: Any) -> bool:
    while isinstance(value, functools.partial):
        value = value.func
    return any(inspect.isasyncgenfunction(f) for f in (value, type(value).__call__))


def is_async_callable(value: Any) -> bool:
    """Whether calling ``value`` gives a coroutine (``async def``, an object with an
    ``async def __call__``, a partial of either, or a function marked as a coroutine function)."""
    return _is_async(value) and not _is_async_generator(value)


def _discoverable_issuer(issuer: str) -> None:
    """RFC 8414 section 2: the issuer is an https URL with no query or fragment (http is
    accepted for localhost only, as for ``jwks_uri``): its metadata URL is built from it."""
    allowed = (
        "an https:// URL without query or fragment (http:// only for localhost), since the "
        "issuer's metadata (RFC 8414) is read from it when neither 'jwks' nor 'jwks_uri' is set"
    )
    _https_url("issuer", issuer, allowed)
    parts = urlsplit(issuer)
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        raise _fail("issuer", issuer, allowed)


def _introspection(value: Any) -> IntrospectionSettings | None:
    if value is None:
        return None
    shape = (
        "None or a dict with 'client_id', 'client_secret' and optional 'endpoint', "
        "'auth_method', 'timeout', 'cache_ttl'"
    )
    if not isinstance(value, Mapping):
        raise _fail("introspection", value, shape)
    _unknown(list(value), _INTROSPECTION_KEYS, "introspection.")
    for name in ("client_id", "client_secret"):
        item = value.get(name)
        if not isinstance(item, str) or not item:
            raise _fail(f"introspection.{name}", item, "a non-empty string")
    endpoint = value.get("endpoint")
    if endpoint is not None:
        endpoint = _https_url("introspection.endpoint", endpoint)
    auth_method = value.get("auth_method", "client_secret_basic")
    if auth_method not in AUTH_METHODS:
        raise _fail(
            "introspection.auth_method",
            auth_method,
            "'client_secret_basic' (default) or 'client_secret_post'",
        )
    return IntrospectionSettings(
        client_id=value["client_id"],
        client_secret=value["client_secret"],
        endpoint=endpoint,
        auth_method=auth_method,
        timeout=_number(value, "timeout", 5, low=0.1, high=60, name="introspection.timeout"),
        cache_ttl=_number(
            value, "cache_ttl", 60, low=1, high=86400, name="introspection.cache_ttl"
        ),
    )


def _https_url(key: str, value: Any, allowed: str | None = None) -> str:
    allowed = allowed or "an https:// URL (http:// only for localhost)"
    if not isinstance(value, str):
        raise _fail(key, value, allowed)
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        raise _fail(key, value, allowed) from None
    local = host in ("localhost", "127.0.0.1", "::1")
    if not host or not (parts.scheme == "https" or (parts.scheme == "http" and local)):
        raise _fail(key, value, allowed)
    return value


def _public_url(value: Any) -> PublicURL | None:
    if value is None:
        return None
    allowed = "an absolute http(s) URL with a host, no query, no fragment, e.g. https://api.example.com/v1"
    if not isinstance(value, str):
        raise _fail("public_url", value, allowed)
    # Local import: htu.py imports nothing from settings, so this cannot cycle.
    from dpop_middleware.core.htu import normalize_base_url

    try:
        scheme, authority, prefix = normalize_base_url(value)
    except ValueError:
        raise _fail("public_url", value, allowed) from None
    return PublicURL(scheme, authority, prefix)


def _implied_public_url(origin: str) -> PublicURL:
    """``public_url`` implied by ``resource_metadata``: the resource's scheme and host, with the
    server's own mount prefix (``root_path`` / ``SCRIPT_NAME``) kept, so an app mounted below
    ``/mcp`` still expects the ``htu`` its clients sign."""
    fixed = _public_url(origin)
    assert fixed is not None
    return PublicURL(fixed.scheme, fixed.authority, None)


def _paths(key: str, value: Any) -> tuple[str, ...]:
    """Path prefixes, as the application routes them (decoded, no dot-segments)."""
    # Local import: core.paths imports nothing from settings, so this cannot cycle.
    from dpop_middleware.core.paths import has_dot_segment

    allowed = "a list of decoded paths starting with '/', without '.' or '..' segments"
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _fail(key, value, allowed)
    out = []
    for path in value:
        if not _path_ok(path, has_dot_segment):
            raise _fail(key, value, allowed)
        out.append(path.rstrip("/") or "/")
    return tuple(out)


def _path_ok(path: Any, has_dot_segment: Callable[[str], bool]) -> bool:
    return (
        isinstance(path, str)
        and path.startswith("/")
        and "?" not in path
        and "#" not in path
        and not has_dot_segment(path)
    )


def _scope_rules(value: Any) -> tuple[ScopeRule, ...]:
    """``required_scopes``: path rules as for ``exclude_paths``, scopes as RFC 6749 scope-tokens."""
    from dpop_middleware.core.paths import has_dot_segment

    key = "required_scopes"
    shape = (
        "a list of rules like {'path': '/admin', 'methods': ['POST'], 'scopes': ['admin']} "
        "('methods' optional: every method)"
    )
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise _fail(key, value, shape)
    rules = []
    for index, rule in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(rule, Mapping):
            raise _fail(where, rule, shape)
        _unknown(list(rule), _RULE_KEYS, f"{where}.")
        if "path" not in rule or ("scopes" not in rule and "claims" not in rule):
            raise _fail(where, rule, f"a rule with 'path' and 'scopes' (or 'claims'); {shape}")
        path = rule["path"]
        if not _path_ok(path, has_dot_segment):
            raise _fail(
                f"{where}.path",
                path,
                "a decoded path starting with '/', without '.' or '..' segments",
            )
        path = path.rstrip("/") or "/"
        scopes = rule.get("scopes")
        if "scopes" in rule and (
            isinstance(scopes, str)
            or not isinstance(scopes, Sequence)
            or not scopes
            or not all(isinstance(s, str) and SCOPE_TOKEN.fullmatch(s) for s in scopes)
        ):
            raise _fail(
                f"{where}.scopes",
                scopes,
                "a non-empty list of scope names, each without spaces, quotes or backslashes "
                "(RFC 6749 section 3.3)",
            )
        methods = rule.get("methods")
        if methods is not None and (
            isinstance(methods, str)
            or not isinstance(methods, Sequence)
            or not methods
            or not all(isinstance(m, str) and _METHOD.fullmatch(m) for m in methods)
        ):
            raise _fail(
                f"{where}.methods",
                methods,
                "a non-empty list of upper-case HTTP methods, e.g. ['POST', 'DELETE'] "
                "(leave 'methods' out for every method)",
            )
        rules.append(
            ScopeRule(
                path,
                tuple(dict.fromkeys(scopes)) if scopes is not None else (),
                frozenset(methods) if methods is not None else None,
                claim_requirements(rule.get("claims", {}), f"{where}.claims"),
            )
        )
    return tuple(rules)


def claim_requirements(value: Any, key: str) -> ClaimRequirements:
    """``{"claim": value}``: each name a non-empty string, each value a string, integer or
    boolean (compared with the claim's JSON type)."""
    allowed = "a dict of claim name to a string, integer or boolean, e.g. {'tenant': 'acme'}"
    if not isinstance(value, Mapping):
        raise _fail(key, value, allowed)
    for name, expected in value.items():
        if not isinstance(name, str) or not name or not isinstance(expected, str | int | bool):
            raise _fail(key, value, allowed)
    return tuple(value.items())


def _secret(value: Any) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if not isinstance(raw, bytes) or len(raw) < 32:
        raise _fail(
            "nonce.secret", value, "a string or bytes of at least 32 bytes (or a list of them)"
        )
    return raw


def _nonce(value: Any, audience: tuple[str, ...], issuer: str | None) -> NonceSettings | None:
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping):
        raise _fail(
            "nonce",
            value,
            "None (off) or a dict with 'secret' and optional " + ", ".join(_NONCE_KEYS[1:]),
        )
    _unknown(list(value), _NONCE_KEYS, "nonce.")
    if "secret" not in value:
        raise ConfigurationError(
            "dpop_middleware setting 'nonce.secret' is missing: nonces need a secret of at least "
            "32 bytes, the same on every instance (a list to rotate: the first issues, all verify)"
        )
    secret = value["secret"]
    items = secret if isinstance(secret, list | tuple) else [secret]
    if not items:
        raise _fail("nonce.secret", secret, "a non-empty list of secrets of at least 32 bytes")
    secrets = tuple(_secret(s) for s in items)
    lifetime = _number(value, "lifetime", 60.0, low=1, high=3600)
    steps = value.get("accepted_steps", 2)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 10:
        raise _fail(
            "nonce.accepted_steps",
            steps,
            "a whole number from 1 to 10 (the current step and earlier ones)",
        )
    required = value.get("required", True)
    if not isinstance(required, bool):
        required = _paths("nonce.required", required)
    context = value.get("context", audience[0] if audience else (issuer or "dpop-middleware"))
    if not isinstance(context, str) or not context:
        raise _fail("nonce.context", context, "a non-empty string naming this API")
    freshness = value.get("freshness", "iat_and_nonce")
    if freshness not in FRESHNESS:
        raise _fail(
            "nonce.freshness",
            freshness,
            "'iat_and_nonce' (default: a valid nonce and iat inside the window) or 'nonce_only' "
            "(a valid nonce replaces the iat check; tolerates any client clock)",
        )
    return NonceSettings(secrets, lifetime, steps, required, context, freshness)


def _build(raw: Mapping[str, Any]) -> Settings:
    if not isinstance(raw, Mapping):
        raise ConfigurationError(
            f"dpop_middleware settings must be a dict, got {type(raw).__name__}"
        )
    _unknown(list(raw), _KEYS, "")

    issuer = raw.get("issuer")
    if issuer is not None and (not isinstance(issuer, str) or not issuer):
        raise _fail(
            "issuer",
            issuer,
            "a non-empty string (the 'iss' your authorization server puts in tokens)",
        )
    audience_raw = raw.get("audience", ())
    if isinstance(audience_raw, str):
        audience_raw = (audience_raw,)
    if not isinstance(audience_raw, Sequence) or not all(
        isinstance(a, str) and a for a in audience_raw
    ):
        raise _fail("audience", audience_raw, "a non-empty string or a list of them")
    audience = tuple(audience_raw)
    # Local import: core.metadata imports nothing from settings, so this cannot cycle.
    from dpop_middleware.core.metadata import parse_resource_metadata

    metadata = parse_resource_metadata(raw.get("resource_metadata"))
    if metadata is not None and "audience" not in raw:
        audience = (metadata.resource,)  # RFC 8707/9068: the token's aud names this resource

    jwks = raw.get("jwks")
    if jwks is not None and not (isinstance(jwks, Mapping) and isinstance(jwks.get("keys"), list)):
        raise _fail("jwks", jwks, "a JWK Set dict: {'keys': [...]}")
    jwks_uri = raw.get("jwks_uri")
    if jwks_uri is not None:
        jwks_uri = _https_url("jwks_uri", jwks_uri)
    token_verifier = raw.get("token_verifier")
    if token_verifier is not None and not callable(token_verifier):
        raise _fail("token_verifier", token_verifier, "a callable(token: str) -> claims dict")
    if token_verifier is not None and _is_async_generator(token_verifier):
        raise _fail(
            "token_verifier",
            token_verifier,
            "a callable(token: str) -> claims dict, plain or async def (not an async generator)",
        )

    sources = [k for k in ("jwks", "jwks_uri", "token_verifier") if raw.get(k) is not None]
    if len(sources) > 1:
        raise ConfigurationError(
            "dpop_middleware: set at most one of 'jwks', 'jwks_uri' or 'token_verifier' "
            f"(got {', '.join(sources)}); with none, the keys come from the issuer's metadata"
        )
    if token_verifier is None and (issuer is None or not audience):
        raise ConfigurationError(
            "dpop_middleware: 'issuer' and 'audience' are required unless a 'token_verifier' "
            "is set (RFC 9068 section 4: the resource server checks both; with neither 'jwks' "
            "nor 'jwks_uri', the issuer's metadata (RFC 8414) says where its keys are)"
        )
    introspection = _introspection(raw.get("introspection"))
    if introspection is not None and token_verifier is not None:
        raise ConfigurationError(
            "dpop_middleware: set 'introspection' or 'token_verifier', not both"
        )
    source = raw.get("token_source", "auto")
    if source not in TOKEN_SOURCES:
        raise _fail(
            "token_source",
            source,
            "'auto' (a JWS from our issuer is checked locally, any other token introspected), "
            "'jwt' or 'introspection'",
        )
    if source == "introspection" and introspection is None:
        raise ConfigurationError(
            "dpop_middleware: token_source 'introspection' needs the 'introspection' setting"
        )
    if source == "jwt" and introspection is not None:
        raise ConfigurationError(
            "dpop_middleware: token_source 'jwt' with 'introspection' set: the introspection "
            "endpoint would never be asked; leave one out"
        )
    discovery_needed = token_verifier is None and (
        (jwks is None and jwks_uri is None and source != "introspection")
        or (introspection is not None and introspection.endpoint is None)
    )
    if discovery_needed and issuer is not None:
        _discoverable_issuer(issuer)

    mode = raw.get("mode", "dpop")
    if mode not in MODES:
        raise _fail("mode", mode, ", ".join(repr(m) for m in MODES))
    preflight = raw.get("cors_preflight", "verify")
    if preflight not in PREFLIGHT:
        raise _fail(
            "cors_preflight",
            preflight,
            "'verify' (a preflight is checked like any request) or 'pass' (the app answers "
            "preflights itself, without running a protected handler)",
        )

    proxies = raw.get("trusted_proxies", ())
    if isinstance(proxies, str) or not isinstance(proxies, Sequence):
        raise _fail(
            "trusted_proxies", proxies, "a list of IP addresses or CIDRs, e.g. ['10.0.0.0/8']"
        )
    networks = []
    for entry in proxies:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except (TypeError, ValueError):
            raise _fail(
                "trusted_proxies", entry, "IP addresses or CIDRs, e.g. '10.0.0.1' or '10.0.0.0/8'"
            ) from None

    on_refusal = raw.get("on_refusal")
    if on_refusal is not None and not callable(on_refusal):
        raise _fail("on_refusal", on_refusal, "a callable(reason, request_info), sync or async")
    clock = raw.get("clock", time.time)
    if not callable(clock):
        raise _fail("clock", clock, "a callable returning the current Unix time in seconds")
    realm = raw.get("realm")
    if realm is not None and (not isinstance(realm, str) or '"' in realm or "\\" in realm):
        raise _fail("realm", realm, "a string without quotes or backslashes")
    always_401 = raw.get("always_401", False)
    if not isinstance(always_401, bool):
        raise _fail("always_401", always_401, "True or False")
    strict_typ = raw.get("strict_access_token_typ", False)
    if not isinstance(strict_typ, bool):
        raise _fail("strict_access_token_typ", strict_typ, "True or False")

    from dpop_middleware.replay import validate_replay_store_setting

    replay_store = validate_replay_store_setting(raw.get("replay_store", "memory://"))

    return Settings(
        issuer=issuer,
        audience=audience,
        jwks=jwks,
        jwks_uri=jwks_uri,
        jwks_cache_ttl=_number(raw, "jwks_cache_ttl", 300, low=1, high=86400 * 7),
        jwks_max_stale=_number(raw, "jwks_max_stale", 3600, low=0, high=86400 * 7),
        jwks_refresh_interval=_number(raw, "jwks_refresh_interval", 5, low=1, high=86400),
        jwks_fetch_timeout=_number(raw, "jwks_fetch_timeout", 5, low=0.1, high=60),
        token_verifier=token_verifier,
        token_verifier_cache_ttl=_number(raw, "token_verifier_cache_ttl", 60, low=0, high=86400),
        introspection=introspection,
        token_source=source,
        algorithms=_algorithms(raw, "algorithms", DEFAULT_ALGORITHMS),
        access_token_algorithms=_algorithms(
            raw, "access_token_algorithms", DEFAULT_ACCESS_TOKEN_ALGORITHMS
        ),
        strict_access_token_typ=strict_typ,
        proof_max_age=_number(raw, "proof_max_age", 60, low=1, high=3600),
        clock_skew=_number(raw, "clock_skew", 10, low=0, high=600),
        leeway=_number(raw, "leeway", 5, low=0, high=600),
        max_proof_size=_integer(raw, "max_proof_size", 8192, low=256, high=65536),
        max_token_size=_integer(raw, "max_token_size", 16384, low=256, high=262144),
        max_jti_length=_integer(raw, "max_jti_length", 128, low=16, high=1024),
        replay_store=replay_store,
        nonce=_nonce(raw.get("nonce"), audience, issuer),
        mode=mode,
        exclude_paths=_paths("exclude_paths", raw.get("exclude_paths", ())),
        required_scopes=_scope_rules(raw.get("required_scopes", ())),
        cors_preflight=preflight,
        max_path_length=_integer(raw, "max_path_length", 8192, low=256, high=65536),
        public_url=_public_url(raw.get("public_url"))
        if "public_url" in raw or metadata is None
        else _implied_public_url(metadata.origin),
        resource_metadata=metadata,
        trusted_proxies=tuple(networks),
        on_refusal=on_refusal,
        realm=realm,
        always_401=always_401,
        key_cache_size=_integer(raw, "key_cache_size", 1024, low=1, high=1_000_000),
        token_cache_size=_integer(raw, "token_cache_size", 10_000, low=0, high=10_000_000),
        clock=clock,
        metrics=_metrics(raw.get("metrics")),
        tracing=_tracing(raw.get("tracing")),
        observers=_observers(raw.get("observers", ())),
    )


# -- observability (dpop_middleware.observe): each integration imported only when turned on ----

_METRICS_KEYS = ("registry",)
_TRACING_KEYS = ("tracer_provider",)


def _integration_options(
    key: str, value: Any, allowed: str, known: Sequence[str]
) -> Mapping[str, Any] | None:
    """``metrics`` / ``tracing``: None when off, else the options dict (``True``: no options)."""
    if value is None or value is False:
        return None
    if value is not True and not isinstance(value, Mapping):
        raise _fail(key, value, allowed)
    options: Mapping[str, Any] = {} if value is True else value
    _unknown(list(options), known, f"{key}.")
    return options


def _missing(key: str, package: str, extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"dpop_middleware setting {key!r} needs {package}: "
        f"pip install 'dpop-middleware[{extra}]' ({exc})"
    )


def _metrics(value: Any) -> Observer | None:
    allowed = (
        "False (off), True (Prometheus, the default registry) or {'registry': a "
        "prometheus_client CollectorRegistry}"
    )
    options = _integration_options("metrics", value, allowed, _METRICS_KEYS)
    if options is None:
        return None
    try:
        from dpop_middleware.prometheus import prometheus_observer
    except ImportError as exc:
        raise _missing("metrics", "prometheus_client", "prometheus", exc) from exc
    registry = options.get("registry")
    if registry is not None and not callable(getattr(registry, "register", None)):
        raise _fail("metrics.registry", registry, "a prometheus_client CollectorRegistry")
    return prometheus_observer(registry)


def _tracing(value: Any) -> Observer | None:
    allowed = (
        "False (off), True (OpenTelemetry, the global tracer provider) or "
        "{'tracer_provider': an opentelemetry TracerProvider}"
    )
    options = _integration_options("tracing", value, allowed, _TRACING_KEYS)
    if options is None:
        return None
    try:
        from dpop_middleware.otel import TracingObserver
    except ImportError as exc:
        raise _missing("tracing", "opentelemetry-api", "otel", exc) from exc
    provider = options.get("tracer_provider")
    if provider is not None and not callable(getattr(provider, "get_tracer", None)):
        raise _fail("tracing.tracer_provider", provider, "an opentelemetry TracerProvider")
    return TracingObserver(provider)


def _observers(value: Any) -> tuple[Observer, ...]:
    from dpop_middleware.observe import OBSERVER_METHODS

    allowed = (
        "a list of observers: objects with the methods of dpop_middleware.observe.Observer "
        "(subclass BaseObserver)"
    )
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise _fail("observers", value, allowed)
    for index, each in enumerate(value):
        missing = [m for m in OBSERVER_METHODS if not callable(getattr(each, m, None))]
        if missing:
            raise _fail(f"observers[{index}]", each, f"{allowed}; missing {', '.join(missing)}")
    return tuple(value)
