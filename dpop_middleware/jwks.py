"""Fetching the issuer's JWK Set (blocking I/O: adapters run it in a thread under ASGI), through
the shared fetch of :mod:`dpop_middleware.fetch` (total deadline, size limit)."""

from __future__ import annotations

from typing import Any

from dpop_middleware.fetch import MAX_DOCUMENT_BYTES, FetchError, fetch_json

MAX_JWKS_BYTES = MAX_DOCUMENT_BYTES


class JWKSFetchError(FetchError):
    pass


def fetch_jwks(uri: str, timeout: float) -> dict[str, Any]:
    """GET ``uri`` and return the JSON object, within ``timeout`` seconds in all;
    JWKSFetchError on any failure."""
    try:
        return fetch_json(uri, timeout=timeout, max_bytes=MAX_JWKS_BYTES)
    except FetchError as exc:
        raise JWKSFetchError(f"JWKS fetch failed: {exc}") from exc
