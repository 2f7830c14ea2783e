"""Access token checks (RFC 9068), the cnf.jkt binding (RFC 9449 section 6), the token cache and
the JWKS fetch."""

from __future__ import annotations

import gc
import inspect
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import API, FrozenClock
from core_helpers import Harness

from dpop_middleware.testing import REMOVE, DPoPKey, TokenIssuer

URL = API + "/items"


def expect(answer: Any, reason: str, error: str = "invalid_token", status: int = 401) -> None:
    assert (answer.status, answer.error, answer.reason) == (status, error, reason)
    if status == 401:
        assert answer.challenge_params()["error"] == error


@pytest.fixture
def h(make_settings: Any) -> Harness:
    return Harness(make_settings())


def test_expired_token(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    token = issuer.token(bound_to=dpop_key, lifetime=100)
    clock.advance(105)  # exp + leeway (5 s)
    expect(h.dpop(dpop_key, token, "GET", URL), "token_expired")


def test_expiry_leeway(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    token = issuer.token(bound_to=dpop_key, lifetime=100)
    clock.advance(104)
    assert h.dpop(dpop_key, token, "GET", URL).status == 200


def test_cached_token_is_never_used_past_exp(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    token = issuer.token(bound_to=dpop_key, lifetime=30)
    assert h.dpop(dpop_key, token, "GET", URL).status == 200  # now cached
    clock.advance(40)
    expect(h.dpop(dpop_key, token, "GET", URL), "token_expired")


def test_cached_token_still_checks_nbf(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    token = issuer.token(bound_to=dpop_key, claims={"nbf": clock.now + 3})  # inside the leeway
    assert h.dpop(dpop_key, token, "GET", URL).status == 200  # now cached
    clock.advance(-10)  # the server's clock steps back: nbf is now ahead of now + leeway
    expect(h.dpop(dpop_key, token, "GET", URL), "token_not_yet_valid")


ROLES = {"realm_access": {"roles": ["reader"]}}


@pytest.mark.parametrize(
    ("mutate", "raises"),
    [
        pytest.param(lambda c: c.__setitem__("sub", "mallory"), TypeError, id="set-item"),
        pytest.param(lambda c: c.__delitem__("cnf"), TypeError, id="del-item"),
        pytest.param(lambda c: c.pop("cnf"), TypeError, id="pop"),
        pytest.param(lambda c: c.popitem(), TypeError, id="popitem"),
        pytest.param(lambda c: c.update(exp=0), TypeError, id="update"),
        pytest.param(lambda c: c.setdefault("admin", True), TypeError, id="setdefault"),
        pytest.param(lambda c: c.clear(), TypeError, id="clear"),
        pytest.param(lambda c: c.__ior__({"admin": True}), TypeError, id="in-place-or"),
        pytest.param(lambda c: c["cnf"].__setitem__("jkt", "x"), TypeError, id="nested-object"),
        pytest.param(
            lambda c: c["realm_access"]["roles"].append("admin"), AttributeError, id="nested-array"
        ),
        pytest.param(
            lambda c: c["realm_access"].__setitem__("roles", ["admin"]), TypeError, id="replace-array"
        ),
    ],
)
def test_claims_are_deeply_immutable_and_the_same_for_every_request(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, mutate: Any, raises: type[Exception]
) -> None:
    """The verified token is cached with its claims, frozen once: what one request's app tries
    on them raises, and the next request with the token gets the very same, unchanged object."""
    token = issuer.token(bound_to=dpop_key, claims=ROLES)
    first = h.dpop(dpop_key, token, "GET", URL).outcome.result
    assert first is not None
    before = json.dumps(first.claims)
    with pytest.raises(raises):
        mutate(first.claims)
    second = h.dpop(dpop_key, token, "GET", URL)
    assert second.status == 200
    assert second.outcome.result is not None
    claims = second.outcome.result.claims
    assert claims is first.claims
    assert json.dumps(claims) == before
    assert claims["realm_access"]["roles"] == ("reader",)
    assert claims["cnf"] == {"jkt": dpop_key.jkt}


def test_proof_claims_are_deeply_immutable(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    token = issuer.token(bound_to=dpop_key)
    answer = h.dpop(dpop_key, token, "GET", URL, claims={"extra": {"list": [1, 2]}})
    assert answer.outcome.result is not None
    proof_claims = answer.outcome.result.proof_claims
    with pytest.raises(TypeError):
        proof_claims["htu"] = "https://elsewhere.example/"  # type: ignore[index]
    with pytest.raises(TypeError):
        proof_claims["extra"]["list"] = []
    assert proof_claims["extra"] == {"list": (1, 2)}
    assert json.loads(json.dumps(proof_claims))["extra"] == {"list": [1, 2]}


def test_a_bearer_result_has_empty_read_only_proof_claims(
    make_settings: Any, issuer: TokenIssuer
) -> None:
    h = Harness(make_settings(mode="dpop_or_bearer"))
    answer = h.send("GET", URL, [("authorization", f"Bearer {issuer.token(claims=ROLES)}")])
    result = answer.outcome.result
    assert result is not None
    assert json.dumps(result.proof_claims) == "{}"
    with pytest.raises(TypeError):
        result.proof_claims["htm"] = "GET"  # type: ignore[index]
    with pytest.raises(AttributeError):
        result.claims["realm_access"]["roles"].append("admin")


def test_token_verifier_claims_are_frozen_too(clock: FrozenClock, dpop_key: DPoPKey) -> None:
    """Frozen from a copy: the verifier's own dict is left alone, and what it does to it later
    does not reach the cached result either."""
    resp: dict[str, Any] = {"active": True, "cnf": {"jkt": dpop_key.jkt}, "roles": ["reader"]}
    h = Harness({"token_verifier": lambda t: resp, "clock": clock})
    result = h.dpop(dpop_key, "opaque", "GET", URL).outcome.result
    assert result is not None
    with pytest.raises(AttributeError):
        result.claims["roles"].append("admin")
    with pytest.raises(TypeError):
        result.claims["cnf"]["jkt"] = "x"
    resp["roles"].append("admin")
    assert result.claims["roles"] == ("reader",)
    assert resp["cnf"] == {"jkt": dpop_key.jkt} and type(resp["cnf"]) is dict


def test_token_verifier_claims_too_deep_to_freeze(clock: FrozenClock, dpop_key: DPoPKey) -> None:
    """A verifier's claims nested past the interpreter's depth (or a cycle): refused, not a 500."""
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    resp: dict[str, Any] = {"active": True, "cnf": {"jkt": dpop_key.jkt}, "x": deep}
    h = Harness({"token_verifier": lambda t: resp, "clock": clock})
    expect(h.dpop(dpop_key, "opaque", "GET", URL), "token_malformed")
    resp["x"] = resp
    expect(h.dpop(dpop_key, "opaque", "GET", URL), "token_malformed")


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        pytest.param("DPoP {token},x", "multiple_auth_methods", id="comma-joined"),
        pytest.param("DPoP {token} x", "malformed_authorization", id="trailing-junk"),
        pytest.param("DPoP {token}\t", "malformed_authorization", id="trailing-tab"),
    ],
)
def test_a_cached_token_still_gets_the_whole_authorization_grammar(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, authorization: str, reason: str
) -> None:
    token = issuer.token(bound_to=dpop_key)
    assert h.dpop(dpop_key, token, "GET", URL).status == 200  # now cached
    proof = dpop_key.proof("GET", URL, access_token=token)
    headers = [("authorization", authorization.format(token=token)), ("dpop", proof)]
    expect(h.send("GET", URL, headers), reason, error="invalid_request", status=400)


def test_a_cached_token_passes_with_any_scheme_case_and_spacing(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    token = issuer.token(bound_to=dpop_key)
    assert h.dpop(dpop_key, token, "GET", URL).status == 200
    for value in (f"dpop {token}", f"DPOP  {token}"):
        proof = dpop_key.proof("GET", URL, access_token=token)
        answer = h.send("GET", URL, [("authorization", value), ("dpop", proof)])
        assert answer.status == 200, value


def test_only_single_space_authorization_values_are_cached(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """One token in many spacings must not be able to fill the token cache."""
    token = issuer.token(bound_to=dpop_key)
    cache = h.engine.verifier._tokens._cache
    for spaces in range(1, 6):
        proof = dpop_key.proof("GET", URL, access_token=token)
        value = "DPoP" + " " * spaces + token
        assert h.send("GET", URL, [("authorization", value), ("dpop", proof)]).status == 200
    assert len(cache) == 1


def test_token_without_exp(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    token = issuer.token(bound_to=dpop_key, claims={"exp": REMOVE})
    expect(h.dpop(dpop_key, token, "GET", URL), "token_exp_missing")


def test_token_not_yet_valid(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    token = issuer.token(bound_to=dpop_key, claims={"nbf": clock.now + 60})
    expect(h.dpop(dpop_key, token, "GET", URL), "token_not_yet_valid")


def test_wrong_issuer(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    token = issuer.token(bound_to=dpop_key, claims={"iss": "https://evil.example"})
    expect(h.dpop(dpop_key, token, "GET", URL), "issuer_mismatch")


def test_wrong_audience(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    token = issuer.token(bound_to=dpop_key, claims={"aud": "https://other-api.example"})
    expect(h.dpop(dpop_key, token, "GET", URL), "audience_mismatch")


def test_audience_list_containing_ours(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    token = issuer.token(bound_to=dpop_key, claims={"aud": ["https://x.example", API]})
    assert h.dpop(dpop_key, token, "GET", URL).status == 200


def test_unknown_kid(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    token = issuer.token(bound_to=dpop_key, header={"kid": "rotated-away"})
    expect(h.dpop(dpop_key, token, "GET", URL), "unknown_kid")


def test_token_signed_by_another_issuer_key(
    make_settings: Any, clock: FrozenClock, dpop_key: DPoPKey
) -> None:
    forger = TokenIssuer(audience=API, clock=clock)  # same iss, aud and kid; another key
    h = Harness(make_settings())
    expect(h.dpop(dpop_key, forger.token(bound_to=dpop_key), "GET", URL), "token_signature_invalid")


def test_token_alg_outside_access_token_algorithms(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = Harness(make_settings(access_token_algorithms=["RS256"]))
    expect(h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", URL), "token_alg_not_allowed")


def test_token_alg_none(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    token = issuer.token(bound_to=dpop_key)
    _, payload, _ = token.split(".")
    from dpop_middleware.core.jose import b64encode

    none_head = b64encode(json.dumps({"alg": "none", "typ": "at+jwt", "kid": issuer.kid}).encode())
    forged = f"{none_head}.{payload}.c2ln"
    expect(h.dpop(dpop_key, forged, "GET", URL), "token_alg_not_allowed")


def test_malformed_token(h: Harness, dpop_key: DPoPKey) -> None:
    expect(h.dpop(dpop_key, "opaque-token-value", "GET", URL), "token_malformed")


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"exp": float("nan")}, "token_exp_missing", id="exp-nan-never-expires"),
        pytest.param({"exp": float("inf")}, "token_exp_missing", id="exp-infinite"),
        pytest.param({"exp": 10**400}, "token_exp_missing", id="exp-beyond-any-float"),
        pytest.param({"exp": "2000000000"}, "token_exp_missing", id="exp-string"),
        pytest.param({"nbf": float("nan")}, "token_malformed", id="nbf-nan"),
        pytest.param({"nbf": -(10**400)}, "token_malformed", id="nbf-beyond-any-float"),
        pytest.param({"aud": [["https://api.example"]]}, "audience_mismatch", id="aud-nested-list"),
        pytest.param({"aud": [{"a": 1}]}, "audience_mismatch", id="aud-object-member"),
    ],
)
def test_signed_tokens_with_odd_claims_are_refused_not_crashed(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, claims: dict[str, Any], reason: str
) -> None:
    """Signed by the issuer, so only an issuer bug sends these; still a refusal, never a 500, and
    an ``exp`` of NaN (false in every comparison) is no exp at all (RFC 7519: NumericDate)."""
    token = issuer.token(bound_to=dpop_key, claims=claims)
    expect(h.dpop(dpop_key, token, "GET", URL), reason)


def test_an_audience_list_with_odd_members_still_finds_ours(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    token = issuer.token(bound_to=dpop_key, claims={"aud": [["x"], {"y": 1}, "https://api.example"]})
    assert h.dpop(dpop_key, token, "GET", URL).status == 200

def test_token_header_with_a_huge_number_is_malformed_not_a_crash(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """A number over CPython's 4300-digit int limit makes int() raise a plain ValueError."""
    from dpop_middleware.core.jose import b64encode

    _, payload, signature = issuer.token(bound_to=dpop_key).split(".")
    head = b64encode(('{"alg":"ES256","typ":"at+jwt","x":' + "9" * 5000 + "}").encode())
    expect(h.dpop(dpop_key, f"{head}.{payload}.{signature}", "GET", URL), "token_malformed")


def _signed_token(issuer: TokenIssuer, body: str, header: dict[str, Any] | None = None) -> str:
    """A token the issuer signed over exactly ``body`` (json.dumps cannot write these)."""
    from joserfc import jws

    head = header or {"alg": issuer.alg, "typ": "at+jwt", "kid": issuer.kid}
    return jws.serialize_compact(head, body.encode(), issuer.key, algorithms=[issuer.alg])


@pytest.mark.parametrize(
    "nested",
    [
        pytest.param("[" * 3000 + "]" * 3000, id="arrays-3000-deep"),
        pytest.param('{"a":' * 2000 + "1" + "}" * 2000, id="objects-2000-deep"),
        # The JSON decoder takes these; walking them to freeze the claims does not.
        pytest.param("[" * 900 + "]" * 900, id="arrays-900-deep"),
    ],
)
@pytest.mark.parametrize("scheme", ["DPoP", "Bearer"])
def test_signed_token_with_claims_nested_deep_is_malformed_not_a_crash(
    make_settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    clock: FrozenClock,
    nested: str,
    scheme: str,
) -> None:
    """Nested past the JSON decoder's depth, within the 16 KB token limit: RecursionError inside
    joserfc's decode, which must be a refusal, not a 500."""
    claims = {"iss": issuer.issuer, "aud": API, "exp": clock.now + 60}
    if scheme == "DPoP":
        claims["cnf"] = {"jkt": dpop_key.jkt}
    token = _signed_token(issuer, json.dumps(claims)[:-1] + ', "deep": ' + nested + "}")
    assert len(token) < 16384
    h = Harness(make_settings(mode="dpop_or_bearer"))
    if scheme == "DPoP":
        answer = h.dpop(dpop_key, token, "GET", URL)
    else:
        answer = h.send("GET", URL, [("authorization", f"Bearer {token}")])
    expect(answer, "token_malformed")


def test_token_header_nested_deep_is_malformed_not_a_crash(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    from dpop_middleware.core.jose import b64encode

    _, payload, signature = issuer.token(bound_to=dpop_key).split(".")
    nested = "[" * 3000 + "]" * 3000
    head = b64encode(('{"alg":"ES256","typ":"at+jwt","x":' + nested + "}").encode())
    expect(h.dpop(dpop_key, f"{head}.{payload}.{signature}", "GET", URL), "token_malformed")


@pytest.mark.parametrize(
    ("typ", "strict", "reason"),
    [
        pytest.param("at+jwt", True, None, id="at+jwt-strict"),
        pytest.param("application/at+jwt", True, None, id="media-type-strict"),
        pytest.param("JWT", False, None, id="JWT-lax"),
        pytest.param(REMOVE, False, None, id="no-typ-lax"),
        pytest.param("JWT", True, "token_typ_invalid", id="JWT-strict"),
        pytest.param(REMOVE, True, "token_typ_invalid", id="no-typ-strict"),
        pytest.param("dpop+jwt", False, "token_typ_invalid", id="proof-as-token"),
    ],
)
def test_access_token_typ(
    make_settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    typ: Any,
    strict: bool,
    reason: str | None,
) -> None:
    h = Harness(make_settings(strict_access_token_typ=strict))
    answer = h.dpop(dpop_key, issuer.token(bound_to=dpop_key, header={"typ": typ}), "GET", URL)
    if reason is None:
        assert answer.status == 200
    else:
        expect(answer, reason)


def test_unbound_token_with_dpop_scheme(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    expect(h.dpop(dpop_key, issuer.token(), "GET", URL), "token_not_bound")


def test_proof_key_other_than_the_bound_one(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, other_key: DPoPKey
) -> None:
    """A stolen token used with the thief's own key (RFC 9449 section 6)."""
    token = issuer.token(bound_to=dpop_key)
    answer = h.dpop(other_key, token, "GET", URL)
    expect(answer, "jkt_mismatch")
    assert answer.challenge_params()["error_description"] == "Invalid DPoP key binding"


# Any cnf makes a token sender-constrained (RFC 7800 section 3.1): one we cannot read, or bound by
# a method we cannot verify, is refused with either scheme, never taken for an unbound token.
X5T = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"
UNSUPPORTED = "token_binding_unsupported"
CNF_FORMS = [
    pytest.param({"x5t#S256": X5T}, UNSUPPORTED, id="x5t#S256"),
    pytest.param({"jwk": {"kty": "EC", "crv": "P-256", "x": "AA"}}, UNSUPPORTED, id="jwk"),
    pytest.param({"kid": "key-1"}, UNSUPPORTED, id="kid"),
    pytest.param({}, UNSUPPORTED, id="empty-object"),
    pytest.param({"jkt": ["a"]}, "token_malformed", id="jkt-list"),
    pytest.param({"jkt": {"a": "b"}}, "token_malformed", id="jkt-object"),
    pytest.param({"jkt": ""}, "token_malformed", id="jkt-empty"),
    pytest.param({"jkt": 5}, "token_malformed", id="jkt-number"),
    pytest.param({"jkt": None}, "token_malformed", id="jkt-null"),
    pytest.param("jkt", "token_malformed", id="cnf-string"),
    pytest.param(["jkt"], "token_malformed", id="cnf-list"),
    pytest.param(None, "token_malformed", id="cnf-null"),
    pytest.param(1, "token_malformed", id="cnf-number"),
]  # fmt: skip


@pytest.mark.parametrize(("cnf", "reason"), CNF_FORMS)
def test_other_cnf_forms_as_bearer(
    make_settings: Any, issuer: TokenIssuer, cnf: Any, reason: str
) -> None:
    h = Harness(make_settings(mode="dpop_or_bearer"))
    token = issuer.token(claims={"cnf": cnf})
    answer = h.send("GET", URL, [("authorization", f"Bearer {token}")])
    expect(answer, reason)
    assert answer.challenge.startswith('Bearer error="invalid_token"')


@pytest.mark.parametrize(("cnf", "reason"), CNF_FORMS)
def test_other_cnf_forms_as_dpop(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, cnf: Any, reason: str
) -> None:
    token = issuer.token(claims={"cnf": cnf})
    answer = h.dpop(dpop_key, token, "GET", URL)
    expect(answer, reason)
    assert answer.challenge.startswith('DPoP error="invalid_token"')


@pytest.mark.parametrize(("cnf", "reason"), CNF_FORMS)
@pytest.mark.parametrize("scheme", ["Bearer", "DPoP"])
def test_other_cnf_forms_from_a_token_verifier(
    clock: FrozenClock, dpop_key: DPoPKey, cnf: Any, reason: str, scheme: str
) -> None:
    resp = {"active": True, "cnf": cnf, "exp": clock.now + 60}
    h = Harness({"token_verifier": lambda t: resp, "clock": clock, "mode": "dpop_or_bearer"})
    if scheme == "DPoP":
        answer = h.dpop(dpop_key, "opaque", "GET", URL)
    else:
        answer = h.send("GET", URL, [("authorization", "Bearer opaque")])
    expect(answer, reason)


def test_jkt_beside_another_confirmation_method_is_checked_as_jkt(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """cnf.jkt is there: the token is DPoP-bound, so Bearer is a downgrade and DPoP must match."""
    cnf = {"jkt": dpop_key.jkt, "x5t#S256": X5T}
    token = issuer.token(claims={"cnf": cnf})
    h = Harness(make_settings(mode="dpop_or_bearer"))
    expect(h.send("GET", URL, [("authorization", f"Bearer {token}")]), "downgrade")
    assert h.dpop(dpop_key, token, "GET", URL).status == 200


def test_jwks_key_rotation_empties_the_token_cache(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    h = Harness(make_settings())
    token = issuer.token(bound_to=dpop_key)
    assert h.dpop(dpop_key, token, "GET", URL).status == 200
    keys = h.engine.verifier.keys
    assert keys is not None
    rotated = TokenIssuer(audience=API, kid="key-2", clock=clock)
    keys.load(rotated.jwks, now=clock.now)  # the issuer's key was withdrawn
    expect(h.dpop(dpop_key, token, "GET", URL), "unknown_kid")


# -- user-supplied verifier (opaque tokens, introspection) ----------------------------------------


def test_custom_verifier_inactive_token(clock: FrozenClock, dpop_key: DPoPKey) -> None:
    h = Harness({"token_verifier": lambda t: {"active": False}, "clock": clock})
    expect(h.dpop(dpop_key, "opaque", "GET", URL), "token_inactive")


def test_custom_verifier_token_type_must_be_dpop(clock: FrozenClock, dpop_key: DPoPKey) -> None:
    """RFC 9449 section 6.2: an introspection token_type, if present, MUST be DPoP."""
    resp = {"active": True, "token_type": "Bearer", "cnf": {"jkt": dpop_key.jkt}}
    h = Harness({"token_verifier": lambda t: resp, "clock": clock})
    expect(h.dpop(dpop_key, "opaque", "GET", URL), "token_type_mismatch")


def test_custom_verifier_bound_token_passes(clock: FrozenClock, dpop_key: DPoPKey) -> None:
    resp = {
        "active": True,
        "token_type": "DPoP",
        "cnf": {"jkt": dpop_key.jkt},
        "exp": clock.now + 60,
    }
    h = Harness({"token_verifier": lambda t: resp, "clock": clock})
    answer = h.dpop(dpop_key, "opaque", "GET", URL)
    assert answer.status == 200


def test_custom_verifier_expired(clock: FrozenClock, dpop_key: DPoPKey) -> None:
    resp = {"active": True, "cnf": {"jkt": dpop_key.jkt}, "exp": clock.now - 60}
    h = Harness({"token_verifier": lambda t: resp, "clock": clock})
    expect(h.dpop(dpop_key, "opaque", "GET", URL), "token_expired")


def test_custom_verifier_can_refuse_with_our_error(clock: FrozenClock, dpop_key: DPoPKey) -> None:
    from dpop_middleware import InvalidTokenError

    def verify(token: str) -> dict[str, Any]:
        raise InvalidTokenError("introspection_refused", "The access token is not valid")

    h = Harness({"token_verifier": verify, "clock": clock})
    expect(h.dpop(dpop_key, "opaque", "GET", URL), "introspection_refused")


@pytest.mark.parametrize(
    ("returned", "type_name"),
    [
        pytest.param("coroutine", "coroutine", id="coroutine"),
        pytest.param(None, "NoneType", id="none"),
        pytest.param(["claims"], "list", id="list"),
    ],
)
def test_custom_verifier_that_gives_no_claims_is_a_503_logged_at_error(
    clock: FrozenClock,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
    returned: Any,
    type_name: str,
) -> None:
    """A sync verifier that hands back an awaitable (an async verifier the settings could not
    recognise) or no mapping: refused with 503, never a 500, never let through; the coroutine is
    closed unawaited (no "never awaited" warning)."""
    made: list[Any] = []

    async def introspect(token: str) -> dict[str, Any]:  # pragma: no cover
        return {"active": True, "cnf": {"jkt": dpop_key.jkt}}

    def verify(token: str) -> Any:
        if returned == "coroutine":
            made.append(introspect(token))
            return made[-1]
        return returned

    h = Harness({"token_verifier": verify, "clock": clock})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "coroutine ... was never awaited" fails the test
        with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
            answer = h.dpop(dpop_key, "opaque", "GET", URL)
        gc.collect()
    expect(answer, "token_verifier_error", "temporarily_unavailable", 503)
    assert answer.header("retry-after") == ["1"]
    assert answer.header("www-authenticate") == []
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith(
        "dpop refused reason=token_verifier_error status=503 error=temporarily_unavailable "
    )
    assert record.getMessage().endswith(f" returned={type_name!r}")
    for coroutine in made:
        assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED


# -- jwks_uri -------------------------------------------------------------------------------------


class JWKSServer:
    """A loopback HTTP server serving a JWK Set, counting fetches."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self.jwks = jwks
        self.hits = 0
        self.fail = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                if outer.fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                body = json.dumps(outer.jwks).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_server(issuer: TokenIssuer) -> Iterator[JWKSServer]:
    server = JWKSServer(issuer.jwks)
    yield server
    server.close()


def uri_settings(issuer: TokenIssuer, clock: FrozenClock, url: str) -> dict[str, Any]:
    return {"issuer": issuer.issuer, "audience": issuer.audience, "jwks_uri": url, "clock": clock}


def test_jwks_uri_fetched_on_first_use_and_cached(
    jwks_server: JWKSServer, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    h = Harness(uri_settings(issuer, clock, jwks_server.url))
    assert jwks_server.hits == 0
    for _ in range(3):
        assert h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", URL).status == 200
    assert jwks_server.hits == 1


def test_unknown_kid_refetches_rate_limited(
    jwks_server: JWKSServer, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    h = Harness(uri_settings(issuer, clock, jwks_server.url))
    assert h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", URL).status == 200
    clock.advance(31)
    for i in range(20):  # a flood of bogus kids: at most one refetch per refresh interval
        bogus = issuer.token(bound_to=dpop_key, header={"kid": f"bogus-{i}"})
        expect(h.dpop(dpop_key, bogus, "GET", URL), "unknown_kid")
    assert jwks_server.hits == 2


def test_new_key_picked_up_after_rotation(
    jwks_server: JWKSServer, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    h = Harness(uri_settings(issuer, clock, jwks_server.url))
    assert h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", URL).status == 200
    rotated = TokenIssuer(audience=API, kid="key-2", clock=clock)
    jwks_server.jwks = {"keys": issuer.jwks["keys"] + rotated.jwks["keys"]}
    clock.advance(31)
    assert h.dpop(dpop_key, rotated.token(bound_to=dpop_key), "GET", URL).status == 200
    assert jwks_server.hits == 2


def test_jwks_unreachable_fails_closed(
    jwks_server: JWKSServer, issuer: TokenIssuer, dpop_key: DPoPKey, clock: FrozenClock
) -> None:
    jwks_server.fail = True
    h = Harness(uri_settings(issuer, clock, jwks_server.url))
    answer = h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", URL)
    assert (answer.status, answer.error, answer.reason) == (
        503,
        "temporarily_unavailable",
        "jwks_unavailable",
    )
    jwks_server.fail = False
    clock.advance(6)
    assert h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", URL).status == 200


def test_odd_jkt_in_introspection_result_is_a_mismatch(clock: FrozenClock, dpop_key: DPoPKey) -> None:
    resp = {"active": True, "cnf": {"jkt": "\ud800\u00e9"}}
    h = Harness({"token_verifier": lambda t: resp, "clock": clock})
    expect(h.dpop(dpop_key, "opaque", "GET", URL), "jkt_mismatch")


def test_a_key_set_loaded_during_a_verify_never_tags_the_entry_with_its_version(
    clock: Any, dpop_key: DPoPKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: a refresh that removes key "old", landing (from another thread) while a
    token signed by "old" is being verified, left the entry tagged with the new version, so the
    token kept passing from the cache. The interleaving is forced by running the load inside the
    signature check."""
    from dpop_middleware.core import token as token_module

    old, new = TokenIssuer(kid="old"), TokenIssuer(kid="new")
    old.clock = new.clock = clock
    h = Harness(old.settings(jwks=None, jwks_uri="https://issuer.example/jwks", clock=clock))
    keys = h.engine.verifier.keys
    assert keys is not None
    keys.load(old.jwks, now=clock())
    token = old.token(bound_to=dpop_key)
    real = token_module.jwt.decode

    def decode_while_a_refresh_lands(*args: Any, **kwargs: Any) -> Any:
        decoded = real(*args, **kwargs)
        keys.load(new.jwks, now=clock())
        return decoded

    monkeypatch.setattr(token_module.jwt, "decode", decode_while_a_refresh_lands)
    assert h.dpop(dpop_key, token, "GET", URL).status == 200  # verified with the old key
    monkeypatch.setattr(token_module.jwt, "decode", real)
    assert keys.find("old") is None
    expect(h.dpop(dpop_key, token, "GET", URL), "unknown_kid")
