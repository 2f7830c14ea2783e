"""Scopes: what a verified token may do, and which scopes a route needs.

* A token's scopes come from its ``scope`` claim, a space-delimited string (RFC 9068 section
  2.2.3, RFC 6749 section 3.3); issuers that use ``scp`` instead (a list of strings, or a
  string) are read too. ``scope`` wins when both are present. A malformed value (a number, a
  list holding a non-string) gives no scopes at all: it never passes a scope check and never
  fails a request with a 500.
* ``required_scopes`` rules match the path the application routes on by whole segments, exactly
  like ``exclude_paths`` (:func:`~dpop_middleware.core.paths.under`), and optionally the method;
  every matching rule applies, so a request needs the union of their scopes.
* A verified token lacking a needed scope is refused with 403 ``insufficient_scope`` and the
  needed scopes in the challenge (RFC 6750 section 3.1).
* A rule's (or a helper's) ``claims`` require claim values (``{"tenant": "acme"}``): a claim
  equal to the value, of the same JSON type, or a list claim holding it. A mismatch is 403 with
  reason ``claim_mismatch`` (:class:`~dpop_middleware.errors.InsufficientClaimsError`), checked
  after the scopes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from dpop_middleware.core.paths import under
from dpop_middleware.errors import InsufficientClaimsError, InsufficientScopeError
from dpop_middleware.settings import ClaimRequirements, ClaimValue, ScopeRule

_NO_SCOPES: frozenset[str] = frozenset()


def parse_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """The token's scopes: ``scope`` (space-delimited string) or else ``scp`` (list or string)."""
    value = claims.get("scope")
    if value is None:
        value = claims.get("scp")
        if isinstance(value, list | tuple):
            if all(isinstance(item, str) for item in value):
                return frozenset(item for item in value if item)
            return _NO_SCOPES
    if isinstance(value, str):
        # RFC 6749 section 3.3: scope-tokens delimited by spaces (%x20); empty parts are ignored.
        return frozenset(part for part in value.split(" ") if part)
    return _NO_SCOPES


class ScopeRules:
    """The ``required_scopes`` rules, ready for per-request lookups."""

    __slots__ = ("_rules",)

    def __init__(self, rules: tuple[ScopeRule, ...]) -> None:
        self._rules = tuple((rule, (rule.path,)) for rule in rules)

    def needed(self, route_path: str, method: str) -> tuple[tuple[str, ...], ClaimRequirements]:
        """Every scope (in configured order, no duplicates) and every claim requirement of every
        rule matching the request."""
        found: list[str] = []
        claims: list[tuple[str, ClaimValue]] = []
        for rule, prefix in self._rules:
            if (rule.methods is None or method in rule.methods) and under(route_path, prefix):
                found.extend(rule.scopes)
                claims.extend(rule.claims)
        return (tuple(dict.fromkeys(found)) if found else ()), tuple(claims)


def check_scopes(
    needed: Iterable[str],
    claims: Mapping[str, Any],
    scheme: Literal["DPoP", "Bearer"],
) -> None:
    """Raise 403 ``insufficient_scope`` unless the token has every scope in ``needed``.

    The error goes on the challenge of the scheme the request used (RFC 9449 section 7.2)."""
    needed = tuple(dict.fromkeys(needed))
    if not needed:
        return
    have = parse_scopes(claims)
    missing = [scope for scope in needed if scope not in have]
    if missing:
        raise InsufficientScopeError(
            needed, scheme=scheme, log_detail={"missing": " ".join(missing)}
        )


def _claim_has(actual: Any, expected: ClaimValue) -> bool:
    """``actual`` is ``expected`` (same JSON type: ``true`` is not ``1``), or a list holding it."""
    if isinstance(actual, list | tuple):  # claims are frozen: arrays are tuples
        return any(type(item) is type(expected) and item == expected for item in actual)
    return type(actual) is type(expected) and actual == expected


def check_claims(
    required: ClaimRequirements,
    claims: Mapping[str, Any],
    scheme: Literal["DPoP", "Bearer"],
) -> None:
    """Raise 403 (reason ``claim_mismatch``) unless every required claim has its value (or, for a
    list claim such as ``groups``, holds it). The log names the claim, never the token's value."""
    for name, expected in required:
        if not _claim_has(claims.get(name), expected):
            raise InsufficientClaimsError(
                "claim_mismatch",
                "The access token does not allow this request",
                scheme=scheme,
                log_detail={"claim": name},
            )
