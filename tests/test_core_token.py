"""Access token checks (RFC 9068), the cnf.jkt binding (RFC 9449 section 6), the token cache and
the JWKS fetch."""

from __future__ import annotations

import json
import threading
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


def test_application_gets_its_own_copy_of_the_claims(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """The verified token is cached; what one request's app does to its claims must not reach
    the next request (nor the checks: exp and the binding are kept apart from the claims)."""
    token = issuer.token(bound_to=dpop_key)
    first = h.dpop(dpop_key, token, "GET", URL).outcome.result
    assert first is not None
    sub = first.claims["sub"]
    first.claims["sub"] = "mallory"  # type: ignore[index]
    first.claims.pop("cnf")  # type: ignore[attr-defined]
    first.claims["exp"] = 0  # type: ignore[index]
    second = h.dpop(dpop_key, token, "GET", URL)
    assert second.status == 200
    assert second.outcome.result is not None
    assert second.outcome.result.claims["sub"] == sub
    assert second.outcome.result.claims["cnf"] == {"jkt": dpop_key.jkt}


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
