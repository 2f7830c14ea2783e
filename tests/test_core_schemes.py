"""Schemes and challenges: RFC 9449 sections 7.1 and 7.2, RFC 6750 sections 2 and 3, and the
Host-header rules for htu."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from conftest import API
from core_helpers import Answer, Harness, request

from dpop_middleware.testing import DPoPKey, TokenIssuer

URL = API + "/items"


@pytest.fixture
def h(make_settings: Any) -> Harness:
    return Harness(make_settings())


@pytest.fixture
def hb(make_settings: Any) -> Harness:
    return Harness(make_settings(mode="dpop_or_bearer"))


def authed(key: DPoPKey, token: str, scheme: str = "DPoP", **kw: Any) -> list[tuple[str, str]]:
    return [
        ("authorization", f"{scheme} {token}"),
        ("dpop", key.proof("GET", URL, access_token=token, **kw)),
    ]


@pytest.mark.parametrize("scheme", ["DPoP", "dpop", "DPOP", "dPoP"])
def test_scheme_is_case_insensitive(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, scheme: str
) -> None:
    token = issuer.token(bound_to=dpop_key)
    assert h.send("GET", URL, authed(dpop_key, token, scheme)).status == 200


def test_no_credentials_challenge_has_no_error(h: Harness) -> None:
    answer = h.send("GET", URL)
    assert (answer.status, answer.error, answer.reason) == (401, None, "no_credentials")
    assert answer.challenge == 'DPoP algs="ES256 ES384 ES512 PS256 PS384 PS512 RS256 EdDSA Ed25519"'


def test_other_scheme_is_no_credentials(h: Harness) -> None:
    answer = h.send("GET", URL, [("authorization", "Basic dXNlcjpwYXNz")])
    assert (answer.status, answer.error) == (401, None)
    assert "error=" not in answer.challenge


def test_realm_in_challenge(make_settings: Any) -> None:
    answer = Harness(make_settings(realm="api")).send("GET", URL)
    assert answer.challenge.startswith('DPoP realm="api", algs="')


@pytest.mark.parametrize("with_proof", [True, False], ids=["with-proof", "without-proof"])
def test_bearer_downgrade_refused_in_dpop_mode(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, with_proof: bool
) -> None:
    token = issuer.token(bound_to=dpop_key)
    headers = (
        authed(dpop_key, token, "Bearer") if with_proof else [("authorization", f"Bearer {token}")]
    )
    answer = h.send("GET", URL, headers)
    assert (answer.status, answer.error, answer.reason) == (
        401,
        "invalid_token",
        "bearer_not_allowed",
    )


@pytest.mark.parametrize("with_proof", [True, False], ids=["with-proof", "without-proof"])
def test_bound_token_as_bearer_refused_when_bearer_allowed(
    hb: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, with_proof: bool
) -> None:
    """RFC 9449 section 7.2: MUST reject a DPoP-bound access token received as a bearer token."""
    token = issuer.token(bound_to=dpop_key)
    headers = (
        authed(dpop_key, token, "Bearer") if with_proof else [("authorization", f"Bearer {token}")]
    )
    answer = hb.send("GET", URL, headers)
    assert (answer.status, answer.error, answer.reason) == (401, "invalid_token", "downgrade")
    # Figure 18: the error goes on the Bearer challenge, DPoP keeps only algs.
    assert answer.challenge.startswith('Bearer error="invalid_token", error_description="')
    assert answer.challenge.endswith(
        ', DPoP algs="ES256 ES384 ES512 PS256 PS384 PS512 RS256 EdDSA Ed25519"'
    )


def test_unbound_bearer_accepted_in_migration_mode(hb: Harness, issuer: TokenIssuer) -> None:
    answer = hb.send("GET", URL, [("authorization", f"Bearer {issuer.token()}")])
    assert answer.status == 200
    assert answer.outcome.result is not None
    assert (answer.outcome.result.scheme, answer.outcome.result.jkt, answer.outcome.result.bound) == (
        "Bearer", None, False,
    )  # fmt: skip


def test_dpop_still_works_in_migration_mode(
    hb: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    answer = hb.send("GET", URL, authed(dpop_key, issuer.token(bound_to=dpop_key)))
    assert answer.status == 200
    assert answer.outcome.result is not None and answer.outcome.result.scheme == "DPoP"


def test_invalid_bearer_token_error_on_bearer_challenge(hb: Harness, issuer: TokenIssuer) -> None:
    token = issuer.token(claims={"iss": "https://evil.example"})
    answer = hb.send("GET", URL, [("authorization", f"Bearer {token}")])
    assert (answer.status, answer.error, answer.reason) == (401, "invalid_token", "issuer_mismatch")
    assert answer.challenge.startswith('Bearer error="invalid_token"')
    assert answer.challenge.count("error=") == 1


def test_two_authorization_headers(hb: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    """Figure 19: token sent in more than one way: 400 invalid_request, error on both challenges."""
    token = issuer.token(bound_to=dpop_key)
    headers = [*authed(dpop_key, token), ("authorization", f"Bearer {token}")]
    answer = hb.send("GET", URL, headers)
    assert (answer.status, answer.error, answer.reason) == (
        400,
        "invalid_request",
        "multiple_auth_methods",
    )
    assert answer.challenge.count('error="invalid_request"') == 2


def test_comma_merged_authorization_is_two_headers(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    token = issuer.token(bound_to=dpop_key)
    headers = [
        ("authorization", f"DPoP {token}, Bearer {token}"),
        ("dpop", dpop_key.proof("GET", URL, access_token=token)),
    ]
    answer = h.send("GET", URL, headers)
    assert (answer.status, answer.error, answer.reason) == (
        400,
        "invalid_request",
        "multiple_auth_methods",
    )


def test_header_and_query_token(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    token = issuer.token(bound_to=dpop_key)
    answer = h.send("GET", URL + "?access_token=" + token, authed(dpop_key, token))
    assert (answer.status, answer.error, answer.reason) == (
        400,
        "invalid_request",
        "multiple_auth_methods",
    )


def test_query_token_alone_is_not_accepted(h: Harness, issuer: TokenIssuer) -> None:
    answer = h.send("GET", URL + "?access_token=" + issuer.token())
    assert (answer.status, answer.error, answer.reason) == (
        400,
        "invalid_request",
        "token_in_query",
    )


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("access%5Ftoken=x", id="name-percent-encoded"),
        pytest.param("a=1&access%5ftoken=x", id="second-name-lower-hex"),
        pytest.param("access+token=x&access_token=y", id="plus-and-plain"),
    ],
)
def test_query_token_by_any_spelling_of_its_name(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, query: str
) -> None:
    """RFC 6750 section 2.3: the application reads the query form-decoded, so ``access%5Ftoken``
    is ``access_token`` and the token came two ways (section 2: only one method per request)."""
    token = issuer.token(bound_to=dpop_key)
    answer = h.send("GET", URL + "?" + query, authed(dpop_key, token))
    assert (answer.status, answer.error, answer.reason) == (
        400,
        "invalid_request",
        "multiple_auth_methods",
    )


def test_a_query_with_escapes_but_no_token_passes(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    token = issuer.token(bound_to=dpop_key)
    assert h.send("GET", URL + "?q=a%20b&access=1", authed(dpop_key, token)).status == 200


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("DPoP", id="no-token"),
        pytest.param("DPoP a b", id="two-tokens"),
        pytest.param("DPoP tok\u00e9n", id="non-token68"),
        pytest.param("DPoP =abc", id="leading-equals"),
    ],
)
def test_malformed_authorization(h: Harness, value: str) -> None:
    answer = h.send("GET", URL, [("authorization", value)])
    assert (answer.status, answer.error, answer.reason) == (
        400,
        "invalid_request",
        "malformed_authorization",
    )


def test_oversized_authorization(h: Harness) -> None:
    answer = h.send("GET", URL, [("authorization", "DPoP " + "a" * 20000)])
    assert (answer.status, answer.error, answer.reason) == (
        400,
        "invalid_request",
        "token_too_large",
    )


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("evil.example/path?", id="path-and-query"),
        pytest.param("a@api.example", id="userinfo"),
        pytest.param("api.example:99999", id="port-out-of-range"),
        pytest.param("api.example:80:80", id="two-ports"),
        pytest.param("[not-ipv6]", id="bad-ipv6"),
        pytest.param("", id="empty"),
    ],
)
def test_host_header_laundering_is_refused(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, host: str
) -> None:
    """An attacker-chosen Host must never produce a matching htu (the proof names that host)."""
    token = issuer.token(bound_to=dpop_key)
    laundered = f"https://{host}/items" if host else URL
    headers = [
        ("authorization", f"DPoP {token}"),
        ("dpop", dpop_key.proof("GET", laundered, access_token=token)),
    ]
    answer = h.send("GET", URL, headers, host=host)
    assert (answer.status, answer.error, answer.reason) == (400, "invalid_request", "invalid_host")


def test_two_host_headers(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    token = issuer.token(bound_to=dpop_key)
    answer = h.send("GET", URL, [("host", "evil.example"), *authed(dpop_key, token)])
    assert (answer.status, answer.reason) == (400, "invalid_host")


def test_exclude_paths(make_settings: Any) -> None:
    h = Harness(make_settings(exclude_paths=["/health", "/docs/"]))
    assert h.send("GET", API + "/health").outcome.result is None
    assert h.send("GET", API + "/health").status == 200
    assert h.send("GET", API + "/docs/openapi.json").status == 200
    assert h.send("GET", API + "/docs").status == 200
    # whole segments only (more in tests/test_core_paths.py)
    assert h.send("GET", API + "/healthz").status == 401


def test_report_only_never_refuses(make_settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(make_settings(mode="report_only"))
    with caplog.at_level("WARNING", logger="dpop_middleware"):
        answer = h.send("GET", URL)
    assert answer.status == 200 and answer.outcome.result is None
    assert "would_refuse reason=no_credentials" in caplog.text


def test_refusal_log_line_has_reason_and_no_secrets(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, caplog: pytest.LogCaptureFixture
) -> None:
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", API + "/other", access_token=token)
    with caplog.at_level("WARNING", logger="dpop_middleware"):
        answer = h.send("GET", URL, [("authorization", f"DPoP {token}"), ("dpop", proof)])
    assert answer.reason == "htu_mismatch"
    (record,) = caplog.records
    line = record.getMessage()
    assert "reason=htu_mismatch" in line
    assert (
        "expected_htu='https://api.example/items' received_htu='https://api.example/other'" in line
    )
    assert token not in line and proof not in line
    assert "expected" not in answer.outcome.refusal.body.decode()  # type: ignore[union-attr]


def test_on_refusal_hook(make_settings: Any) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    h = Harness(make_settings(on_refusal=lambda reason, info: seen.append((reason, dict(info)))))
    h.send("GET", URL)
    assert seen == [("no_credentials", {
        "method": "GET", "path": "/items", "client_ip": "203.0.113.7", "status": 401,
        "error": None, "reason": "no_credentials",
    })]  # fmt: skip


def test_refusal_response_headers_and_body(h: Harness) -> None:
    refusal = h.send("GET", URL).outcome.refusal
    assert refusal is not None
    headers = dict(refusal.headers)
    assert headers["cache-control"] == "no-store"
    assert headers["access-control-expose-headers"] == "WWW-Authenticate, DPoP-Nonce"
    assert headers["content-type"] == "application/json"
    import json

    assert json.loads(refusal.body) == {
        "error": "unauthorized",
        "error_description": "No access token",
    }


def test_hook_that_raises_does_not_turn_a_refusal_into_an_error(
    make_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(reason: str, info: Any) -> None:
        raise RuntimeError("metrics backend down")

    h = Harness(make_settings(on_refusal=broken))
    with caplog.at_level("WARNING", logger="dpop_middleware"):
        answer = h.send("GET", URL)
    assert (answer.status, answer.reason) == (401, "no_credentials")
    assert "on_refusal_hook_failed reason=no_credentials" in caplog.text


@pytest.mark.parametrize("host", ["api_server:8000", "API_Server", "a.b_c.example"])
def test_underscore_hosts_are_valid_reg_names(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, host: str
) -> None:
    token = issuer.token(bound_to=dpop_key)
    url = f"http://{host}/items"
    headers = [
        ("authorization", f"DPoP {token}"),
        ("dpop", dpop_key.proof("GET", url, access_token=token)),
    ]
    assert h.send("GET", url, headers).status == 200


@pytest.mark.parametrize(
    ("path", "signed"),
    [
        pytest.param("x.evil/items", "https://api.examplex.evil/items", id="another-host"),
        pytest.param(":8443/items", "https://api.example:8443/items", id="another-port"),
        pytest.param("@evil.example/items", "https://api.example@evil.example/items", id="userinfo"),
        pytest.param("https://api.example/items", URL, id="absolute-form"),
        pytest.param("*", "https://api.example*", id="asterisk"),
    ],
)
def test_a_path_without_a_leading_slash_is_refused(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey, path: str, signed: str
) -> None:
    """A server that passes on such a request target as the path (uvicorn does) would have it
    glued onto the Host: the proof's htu would name another host or port. Also with
    ``public_url``, where the glue is the same."""
    token = issuer.token(bound_to=dpop_key)
    headers = [
        ("authorization", f"DPoP {token}"),
        ("dpop", dpop_key.proof("GET", signed, access_token=token)),
    ]
    for extra in ({}, {"public_url": API}):
        h = Harness(make_settings(**extra))
        info = dataclasses.replace(request("GET", URL, headers), path=path)
        answer = Answer(h.engine.run_sync(info, h.store))
        assert (answer.status, answer.error, answer.reason) == (
            400,
            "invalid_request",
            "invalid_path",
        )
