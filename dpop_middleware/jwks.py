"""Fetching the issuer's JWK Set (blocking I/O: adapters run it in a thread under ASGI)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

MAX_JWKS_BYTES = 1 << 20


class JWKSFetchError(Exception):
    pass


def fetch_jwks(uri: str, timeout: float) -> dict[str, Any]:
    """GET ``uri`` and return the JSON object; JWKSFetchError on any failure."""
    request = urllib.request.Request(uri, headers={"Accept": "application/json"})  # noqa: S310
    try:
        # The URL scheme was validated at start-up (https, or http on localhost only).
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body = response.read(MAX_JWKS_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise JWKSFetchError(f"JWKS fetch failed: {type(exc).__name__}") from exc
    if len(body) > MAX_JWKS_BYTES:
        raise JWKSFetchError("JWKS document too large")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
        raise JWKSFetchError("JWKS document is not JSON") from exc
    if not isinstance(document, dict):
        raise JWKSFetchError("JWKS document is not an object")
    return document
