"""Token introspection (RFC 7662) and the answers of a ``token_verifier``: the request, the
rules an answer must meet, and the cache of answers. No I/O: the core raises
:class:`TokenAnswerNeeded`, the adapter asks the endpoint (or the verifier) and hands the answer
back.

The rules, before any code:

* Request (RFC 7662 section 2.1): ``POST`` ``token`` and ``token_type_hint=access_token``, form
  encoded, with the client authenticated as configured (RFC 6749 section 2.3.1: with
  ``client_secret_basic`` the id and secret are form-encoded before base64).
* Answer (section 2.2): a JSON object (``application/json``; a signed JWT answer, RFC 9701, is
  refused as not understood) whose ``active`` is a boolean; anything else is the endpoint's
  fault: 503, never a pass. ``active: false`` is ``token_inactive``. ``iss``, when present, is our
  issuer; ``aud``, when present, names one of our audiences; ``exp`` / ``nbf`` are checked with
  ``leeway``; ``token_type``, when present, is ``DPoP`` for a DPoP request (RFC 9449 section 6.2);
  ``cnf.jkt`` binds the token to the proof key exactly as for a JWT (section 6.1).
* Cache: keyed by the token's SHA-256 (the ``ath`` already computed for the proof), never by the
  token. An accepted answer is reused until ``min(exp, now + cache_ttl)``, never past ``exp``; a
  refused one for :data:`REFUSAL_TTL` seconds, so a flood of one bogus token costs one call.
  Bounded in entries and bytes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote_plus

from dpop_middleware.core.keys import LRU
from dpop_middleware.settings import IntrospectionSettings

#: How long a refused answer (inactive, expired, wrong audience...) is reused.
REFUSAL_TTL = 5.0
#: RFC 9701: a signed introspection answer; we do not verify those, so we refuse them.
JWT_ANSWER = "application/token-introspection+jwt"
#: The byte budget of the answer cache (an entry's cost is estimated from the answer's size).
ANSWER_CACHE_MAX_BYTES = 64 << 20


class TokenAnswerNeeded(Exception):
    """Raised by the core when the adapter must ask about the token: the introspection endpoint
    (``endpoint``), or the ``token_verifier`` (``endpoint`` None). ``key`` is the token's hash,
    for the cache and for collapsing concurrent asks. The token never goes into the message."""

    def __init__(self, token: str, key: bytes, endpoint: str | None) -> None:
        super().__init__("token answer needed")
        self.token = token
        self.key = key
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"TokenAnswerNeeded(endpoint={self.endpoint!r})"


class IntrospectionAnswerError(ValueError):
    """The endpoint's answer is not an RFC 7662 answer; the message says why (never a token)."""


def request_form(
    token: str, client: IntrospectionSettings
) -> tuple[dict[str, str], dict[str, str]]:
    """The form and the extra headers of an introspection request (RFC 7662 section 2.1)."""
    form = {"token": token, "token_type_hint": "access_token"}
    if client.auth_method == "client_secret_post":
        form["client_id"] = client.client_id
        form["client_secret"] = client.client_secret
        return form, {}
    pair = f"{quote_plus(client.client_id)}:{quote_plus(client.client_secret)}"
    basic = base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return form, {"Authorization": f"Basic {basic}"}


def parse_answer(content_type: str, body: bytes) -> dict[str, Any]:
    """The answer as a JSON object with a boolean ``active``; IntrospectionAnswerError otherwise."""
    if content_type == JWT_ANSWER:
        raise IntrospectionAnswerError(
            f"the endpoint answered {JWT_ANSWER} (RFC 9701), which this middleware does not "
            "verify; configure it to answer application/json"
        )
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise IntrospectionAnswerError(f"the answer is {content_type[:60]!r}, not JSON")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise IntrospectionAnswerError(f"the answer is not JSON ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise IntrospectionAnswerError("the answer is not a JSON object")
    if not isinstance(document.get("active"), bool):
        raise IntrospectionAnswerError("the answer has no boolean 'active' (RFC 7662 section 2.2)")
    return document


def audience_values(aud: Any) -> list[str] | None:
    """``aud`` as a list of strings (a string or an array, RFC 7662 section 2.2), or None when
    malformed."""
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return aud
    return None


def shown(value: Any) -> str:
    """A claim value for a log field (``iss``, ``aud``): JSON, clipped by the log line."""
    try:
        return value if isinstance(value, str) else json.dumps(value)[:300]
    except (TypeError, ValueError, RecursionError):
        return type(value).__name__


class Refused(NamedTuple):
    """A cached refusal: the reason and description of an ``invalid_token``, and its log fields."""

    reason: str
    description: str
    until: float
    log_detail: Mapping[str, str] | None = None


def answer_cache(size: int) -> LRU[bytes, Any]:
    """The answer cache: token hash -> accepted entry or :class:`Refused`."""
    return LRU(size, max_bytes=ANSWER_CACHE_MAX_BYTES)


def answer_cost(claims: Mapping[str, Any]) -> int:
    """An estimate of an entry's memory: the answer's JSON size, five times, plus overhead."""
    try:
        return 5 * len(json.dumps(claims, default=str)) + 512
    except (TypeError, ValueError, RecursionError):
        return 64 << 10
