"""Scopes: ``DPoPResult.scopes`` (RFC 9068 section 2.2.3) and ``required_scopes`` rules refused
with 403 ``insufficient_scope`` (RFC 6750 section 3.1), through the core and the Engine."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from conftest import API
from core_helpers import Harness

from dpop_middleware import DPoPResult, Settings
from dpop_middleware.core.scopes import parse_scopes
from dpop_middleware.flow import Engine
from dpop_middleware.testing import REMOVE, DPoPKey, TokenIssuer

ALGS = 'algs="ES256"'
DESCRIPTION = "The access token does not have the scope this request needs"
RULES = [
    {"path": "/read", "scopes": ["read"]},
    {"path": "/write", "scopes": ["write"]},
    {"path": "/both", "scopes": ["read", "write"]},
    {"path": "/admin", "methods": ["POST", "DELETE"], "scopes": ["admin"]},
]


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        pytest.param({"scope": "read write"}, {"read", "write"}, id="scope-string"),
        pytest.param({"scope": " read  write "}, {"read", "write"}, id="extra-spaces"),
        pytest.param({"scope": ""}, set(), id="scope-empty"),
        pytest.param({}, set(), id="absent"),
        pytest.param({"scp": ["read", "write"]}, {"read", "write"}, id="scp-list"),
        pytest.param({"scp": "read write"}, {"read", "write"}, id="scp-string"),
        pytest.param({"scope": "read", "scp": ["admin"]}, {"read"}, id="scope-wins"),
        pytest.param({"scope": ["read"]}, set(), id="scope-list-malformed"),
        pytest.param({"scope": 5}, set(), id="scope-number"),
        pytest.param({"scp": ["read", 5]}, set(), id="scp-non-string-item"),
        pytest.param({"scp": {"read": True}}, set(), id="scp-object"),
    ],
)
def test_result_scopes(claims: dict[str, Any], scopes: set[str]) -> None:
    assert parse_scopes(claims) == frozenset(scopes)
    result = DPoPResult(claims, None, "Bearer")
    assert result.scopes == frozenset(scopes)
    assert isinstance(result.scopes, frozenset)


@pytest.fixture
def h(make_settings: Any) -> Harness:
    return Harness(make_settings(algorithms=["ES256"], required_scopes=RULES))


def send(
    h: Harness, issuer: TokenIssuer, key: DPoPKey, path: str, method: str = "GET", **claims: Any
) -> Any:
    token = issuer.token(bound_to=key, claims=claims or None)
    return h.dpop(key, token, method, API + path)


def assert_insufficient(answer: Any, scope: str) -> None:
    assert (answer.status, answer.error, answer.reason) == (
        403,
        "insufficient_scope",
        "insufficient_scope",
    )
    assert answer.challenge == (
        f'DPoP error="insufficient_scope", error_description="{DESCRIPTION}", scope="{scope}", {ALGS}'
    )


def test_read_token_reads_but_cannot_write(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    assert send(h, issuer, dpop_key, "/read").status == 200
    assert send(h, issuer, dpop_key, "/read/deeper").status == 200
    assert send(h, issuer, dpop_key, "/elsewhere").status == 200
    assert_insufficient(send(h, issuer, dpop_key, "/write"), "write")


def test_two_scopes_needed_one_held(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    assert_insufficient(send(h, issuer, dpop_key, "/both"), "read write")
    assert send(h, issuer, dpop_key, "/both", scope="write read").status == 200


def test_rules_match_whole_segments(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    assert send(h, issuer, dpop_key, "/administrator", "POST").status == 200
    assert_insufficient(send(h, issuer, dpop_key, "/admin/x", "POST"), "admin")
    assert_insufficient(send(h, issuer, dpop_key, "/admin", "DELETE"), "admin")
    assert send(h, issuer, dpop_key, "/admin/x", "POST", scope="admin").status == 200


def test_rules_match_the_decoded_route_path(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """``/wri%74e`` is routed as ``/write``: the rule applies to what the app routes."""
    assert_insufficient(send(h, issuer, dpop_key, "/wri%74e"), "write")


def test_methods_filter(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    assert send(h, issuer, dpop_key, "/admin/x", "GET").status == 200
    assert_insufficient(send(h, issuer, dpop_key, "/admin/x", "POST"), "admin")


def test_every_matching_rule_applies(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    rules = [{"path": "/", "scopes": ["api"]}, {"path": "/admin", "scopes": ["admin", "api"]}]
    h = Harness(make_settings(algorithms=["ES256"], required_scopes=rules))
    assert_insufficient(send(h, issuer, dpop_key, "/admin", scope="admin"), "api admin")
    assert_insufficient(send(h, issuer, dpop_key, "/x", scope="admin"), "api")
    assert send(h, issuer, dpop_key, "/admin", scope="api admin").status == 200


def test_scp_list(h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    assert send(h, issuer, dpop_key, "/write", scope=REMOVE, scp=["read", "write"]).status == 200
    assert_insufficient(send(h, issuer, dpop_key, "/write", scope=REMOVE, scp=["read"]), "write")


def test_token_without_scope_is_refused_on_a_scoped_route(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    assert_insufficient(send(h, issuer, dpop_key, "/read", scope=REMOVE), "read")
    assert send(h, issuer, dpop_key, "/open", scope=REMOVE).status == 200


def test_malformed_scope_is_refused_not_a_500(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    assert_insufficient(send(h, issuer, dpop_key, "/read", scope=["read"]), "read")
    assert_insufficient(send(h, issuer, dpop_key, "/read", scope={"read": 1}), "read")


def test_refusal_does_not_burn_the_jti(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """The replay record is made only after the scope check (RFC 9449 section 11.1)."""
    strict = Harness(make_settings(algorithms=["ES256"], required_scopes=RULES))
    lenient = Harness(make_settings(algorithms=["ES256"]))
    lenient.store = strict.store  # one replay store behind both
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", API + "/write", access_token=token, iat=issuer.clock())
    headers = [("authorization", f"DPoP {token}"), ("dpop", proof)]
    assert_insufficient(strict.send("GET", API + "/write", headers), "write")
    assert lenient.send("GET", API + "/write", headers).status == 200
    assert lenient.send("GET", API + "/write", headers).reason == "replayed"


def test_bearer_in_dpop_or_bearer_mode_gets_the_error_on_the_bearer_challenge(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = Harness(make_settings(algorithms=["ES256"], mode="dpop_or_bearer", required_scopes=RULES))
    bearer = h.send("GET", API + "/write", [("authorization", f"Bearer {issuer.token()}")])
    assert (bearer.status, bearer.error, bearer.reason) == (
        403,
        "insufficient_scope",
        "insufficient_scope",
    )
    assert bearer.challenge == (
        f'Bearer error="insufficient_scope", error_description="{DESCRIPTION}", scope="write", '
        f"DPoP {ALGS}"
    )
    assert (
        h.send("GET", API + "/read", [("authorization", f"Bearer {issuer.token()}")]).status == 200
    )
    dpop = send(h, issuer, dpop_key, "/write")
    assert dpop.challenge == (
        f'Bearer, DPoP error="insufficient_scope", error_description="{DESCRIPTION}", '
        f'scope="write", {ALGS}'
    )


def test_one_log_line_and_on_refusal_with_the_reason(
    make_settings: Any,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[tuple[str, int, str | None]] = []
    h = Harness(
        make_settings(
            algorithms=["ES256"],
            required_scopes=RULES,
            on_refusal=lambda reason, info: calls.append((reason, info["status"], info["error"])),
        )
    )
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        answer = send(h, issuer, dpop_key, "/both")
    assert answer.status == 403
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dpop_middleware"]
    assert line.startswith(
        "dpop refused reason=insufficient_scope status=403 error=insufficient_scope "
    )
    assert line.endswith("missing='write'")
    assert calls == [("insufficient_scope", 403, "insufficient_scope")]


def test_report_only_lets_it_through(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = Harness(make_settings(algorithms=["ES256"], mode="report_only", required_scopes=RULES))
    answer = send(h, issuer, dpop_key, "/write")
    assert answer.status == 200 and answer.outcome.result is None


def test_no_rules_no_scope_work() -> None:
    engine = Engine(Settings.from_dict({"token_verifier": lambda token: {}}))
    assert engine.verifier._scope_rules is None


# -- claims beyond scopes ----------------------------------------------------------------------

CLAIM_RULES = [
    {"path": "/tenant", "claims": {"tenant": "acme"}},
    {"path": "/staff", "scopes": ["write"], "claims": {"staff": True, "groups": "ops"}},
]


@pytest.fixture
def hc(make_settings: Any) -> Harness:
    return Harness(make_settings(algorithms=["ES256"], required_scopes=CLAIM_RULES))


def assert_claim_mismatch(answer: Any) -> None:
    assert (answer.status, answer.error, answer.reason) == (403, None, "claim_mismatch")
    assert answer.challenge == f"DPoP {ALGS}"  # no RFC error code for this, and no scope
    assert json.loads(answer.outcome.refusal.body) == {
        "error": "forbidden",
        "error_description": "The access token does not allow this request",
    }


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        pytest.param({"tenant": "acme"}, 200, id="equal"),
        pytest.param({"tenant": "evil"}, 403, id="other-value"),
        pytest.param({}, 403, id="absent"),
        pytest.param({"tenant": ["other", "acme"]}, 200, id="list-holding-it"),
        pytest.param({"tenant": {"acme": 1}}, 403, id="object"),
    ],
)
def test_required_claim(
    hc: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, claims: dict[str, Any], status: int
) -> None:
    answer = send(hc, issuer, dpop_key, "/tenant", **claims)
    if status == 200:
        assert answer.status == 200
    else:
        assert_claim_mismatch(answer)


def test_claim_types_are_compared_as_json(
    hc: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """``true`` is not ``1``, nor ``"true"``."""
    ok = {"scope": "write", "groups": ["ops", "dev"]}
    assert send(hc, issuer, dpop_key, "/staff", staff=True, **ok).status == 200
    assert_claim_mismatch(send(hc, issuer, dpop_key, "/staff", staff=1, **ok))
    assert_claim_mismatch(send(hc, issuer, dpop_key, "/staff", staff="true", **ok))


def test_scopes_are_judged_before_claims(
    hc: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, caplog: pytest.LogCaptureFixture
) -> None:
    assert_insufficient(send(hc, issuer, dpop_key, "/staff", staff=False), "write")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpop_middleware"):
        answer = send(hc, issuer, dpop_key, "/staff", scope="write", staff=True, groups="secret-x")
    assert_claim_mismatch(answer)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dpop_middleware"]
    assert line.startswith("dpop refused reason=claim_mismatch status=403 error=None ")
    assert line.endswith("claim='groups'")
    assert "secret-x" not in line  # the token's value is never logged
