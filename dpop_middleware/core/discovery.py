"""Authorization server metadata (RFC 8414, and OpenID Connect Discovery 1.0 as a fallback): where
it lives, and whether a fetched document may be used.

The rules, before any code:

* Where (RFC 8414 section 3.1): ``/.well-known/oauth-authorization-server`` inserted between the
  host and the path of the issuer, any terminating ``/`` of the path removed first:
  ``https://as.example/tenant1`` is described at
  ``https://as.example/.well-known/oauth-authorization-server/tenant1``. Then, for servers that
  only speak OpenID Connect, ``{issuer}/.well-known/openid-configuration`` (Discovery section 4).
* Whose (RFC 8414 section 3.3): the document's ``issuer`` MUST be identical to the issuer we used
  to build the URL, compared as strings, else "the information contained in the response MUST
  NOT be used". A document that fails is ignored as a whole.
* What we take from it: ``jwks_uri`` and ``introspection_endpoint`` (https, or http on localhost
  only, as for the settings), and ``dpop_signing_alg_values_supported`` for a start-up hint.

Like :class:`~dpop_middleware.core.keys.IssuerKeys`, the holder does no I/O: it raises
:class:`MetadataFetchNeeded` when a fetch is due; the adapter fetches and hands the document back.
The document is refetched every ``cache_ttl``; failures keep the last good document and back off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from dpop_middleware.core.keys import MAX_RETRY_DELAY

RFC8414_WELL_KNOWN = "/.well-known/oauth-authorization-server"
OIDC_WELL_KNOWN = "/.well-known/openid-configuration"


class MetadataError(ValueError):
    """A fetched document that must not be used; the message says why (no secret in it)."""


class MetadataFetchNeeded(Exception):
    """Raised by the core when the adapter must fetch the issuer's metadata (``urls``, in order,
    until one gives a usable document) and call :meth:`IssuerMetadata.load` or
    :meth:`IssuerMetadata.fetch_failed`. ``seen`` is the attempt the core saw, so that of many
    waiting callers only the first fetches."""

    def __init__(self, urls: tuple[str, ...], seen: float) -> None:
        super().__init__(urls[0])
        self.urls = urls
        self.seen = seen


class Metadata(NamedTuple):
    """What we use of a document that passed the section 3.3 check."""

    jwks_uri: str | None
    introspection_endpoint: str | None
    dpop_algs: tuple[str, ...] | None


def metadata_urls(issuer: str) -> tuple[str, str]:
    """The RFC 8414 URL (path insertion, section 3.1), then the OpenID Connect one."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    rfc8414 = f"{parts.scheme}://{parts.netloc}{RFC8414_WELL_KNOWN}{path}"
    oidc = f"{parts.scheme}://{parts.netloc}{path}{OIDC_WELL_KNOWN}"
    return rfc8414, oidc


def usable_url(value: Any) -> bool:
    """https, or http on a loopback host (tests, local development): the ``jwks_uri`` rule."""
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return False
    local = host in ("localhost", "127.0.0.1", "::1")
    return bool(host) and (parts.scheme == "https" or (parts.scheme == "http" and local))


def looks_like_metadata(document: Mapping[str, Any]) -> bool:
    """A document that is authorization server metadata, not a JWK Set (a common mistake in the
    ``jwks_uri`` setting)."""
    return (
        "keys" not in document
        and "issuer" in document
        and ("jwks_uri" in document or "token_endpoint" in document)
    )


def parse_metadata(document: Mapping[str, Any], issuer: str) -> Metadata:
    """The members we use, or MetadataError (RFC 8414 sections 2 and 3.3)."""
    found = document.get("issuer")
    if found != issuer:
        shown = repr(found[:200]) if isinstance(found, str) else type(found).__name__
        raise MetadataError(
            f"its issuer {shown} is not the configured issuer {issuer!r} "
            "(RFC 8414 section 3.3: nothing from it is used)"
        )
    members: dict[str, str | None] = {}
    for name in ("jwks_uri", "introspection_endpoint"):
        value = document.get(name)
        if value is not None and not usable_url(value):
            raise MetadataError(f"its {name} is not an https:// URL (http:// only for localhost)")
        members[name] = value
    algs = document.get("dpop_signing_alg_values_supported")
    dpop_algs = tuple(a for a in algs if isinstance(a, str)) if isinstance(algs, list) else None
    return Metadata(members["jwks_uri"], members["introspection_endpoint"], dpop_algs)


class IssuerMetadata:
    """The issuer's metadata document, fetched when first needed and every ``cache_ttl`` after."""

    def __init__(self, issuer: str, *, cache_ttl: float, refresh_interval: float) -> None:
        self.issuer = issuer
        self.urls: tuple[str, ...] = metadata_urls(issuer)
        self.cache_ttl = cache_ttl
        self.refresh_interval = refresh_interval
        self.current: Metadata | None = None
        self.loaded_at = float("-inf")
        self.attempted_at = float("-inf")
        self.failures = 0

    @property
    def retry_delay(self) -> float:
        """Seconds after a failed attempt before the next: as for the JWK Set."""
        base = min(self.refresh_interval, 5.0)
        if self.failures <= 1:
            return base
        return min(base * 2.0 ** min(self.failures - 1, 30), max(MAX_RETRY_DELAY, base))

    def get(self, now: float) -> Metadata | None:
        """The usable metadata; MetadataFetchNeeded when a fetch is due; None when none could be
        had and the next attempt is not due yet (the caller answers 503)."""
        due = self.current is None or now - self.loaded_at >= self.cache_ttl
        if due and not (self.failures and now - self.attempted_at < self.retry_delay):
            raise MetadataFetchNeeded(self.urls, self.attempted_at)
        return self.current

    def load(self, document: Mapping[str, Any], *, now: float) -> Metadata:
        """Install a fetched document; MetadataError (nothing changes) if it must not be used."""
        metadata = parse_metadata(document, self.issuer)
        self.current = metadata
        self.loaded_at = now
        self.attempted_at = now
        self.failures = 0
        return metadata

    def fetch_failed(self, *, now: float) -> None:
        self.attempted_at = now
        self.failures += 1


def shared_algorithms(metadata: Metadata, algorithms: tuple[str, ...]) -> bool:
    """False when the server lists the DPoP algorithms it accepts and ours share none (a client
    could then never make a proof we accept)."""
    return metadata.dpop_algs is None or bool(set(metadata.dpop_algs) & set(algorithms))
