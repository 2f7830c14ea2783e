"""RFC 9449 worked examples as fixed vectors (figures 2, 11, 13), clock frozen at the proof's iat.

The figure 13 access token is opaque, so these tests plug a token verifier that answers like the
figure 11 introspection response: bound to the figure's key thumbprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from core_helpers import Harness

from dpop_middleware.core.jose import b64encode
from dpop_middleware.core.keys import import_proof_key

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rfc9449.json").read_text())
FIG13 = VECTORS["resource_request_proof"]
IAT = FIG13["iat"]
URL = FIG13["url"]
TOKEN = VECTORS["access_token"]


def introspect(bound_to: str = VECTORS["jkt"]) -> Any:
    def verify(token: str) -> dict[str, Any]:
        response = dict(VECTORS["introspection_response_example"]["response"])
        response["exp"] = IAT + 3600
        response["cnf"] = {"jkt": bound_to}
        return response if token == TOKEN else {"active": False}

    return verify


def harness(clock_at: float = IAT, bound_to: str = VECTORS["jkt"]) -> Harness:
    return Harness({"token_verifier": introspect(bound_to), "clock": lambda: clock_at})


def send(h: Harness, method: str = "GET", url: str = URL, token: str = TOKEN, **kw: Any) -> Any:
    headers = [("authorization", f"DPoP {token}"), ("dpop", FIG13["proof"])]
    return h.send(method, url, headers, **kw)


def test_vector_values_recompute() -> None:
    """jkt and ath of the vectors are what RFC 7638 and RFC 9449 section 4.2 compute."""
    import hashlib

    key = import_proof_key(VECTORS["dpop_public_jwk"], "ES256")
    assert key.jkt == VECTORS["jkt"]
    assert b64encode(hashlib.sha256(TOKEN.encode()).digest()) == VECTORS["ath"]


def test_figure_13_passes_at_a_resource_server() -> None:
    answer = send(harness())
    assert answer.status == 200
    result = answer.outcome.result
    assert result is not None
    assert result.jkt == VECTORS["jkt"]
    assert result.claims["sub"] == "someone@example.com"


def test_figure_13_second_use_is_a_replay() -> None:
    h = harness()
    assert send(h).status == 200
    again = send(h)
    assert (again.status, again.error, again.reason) == (401, "invalid_dpop_proof", "replayed")


@pytest.mark.parametrize(
    ("method", "url", "host", "status", "reason"),
    [
        pytest.param("GET", URL + "?q=1", None, 200, None, id="query-ignored"),
        pytest.param(
            "GET", URL, "RESOURCE.example.org:443", 200, None, id="host-case-and-default-port"
        ),
        pytest.param(
            "GET", "https://resource.example.org/ProtectedResource", None, 401, "htu_mismatch",
            id="path-case-changed",
        ),
        pytest.param("POST", URL, None, 401, "htm_mismatch", id="method-post"),
        pytest.param(
            "GET", "http://resource.example.org/protectedresource", None, 401, "htu_mismatch",
            id="scheme-http",
        ),
        pytest.param(
            "GET", URL + "/", None, 401, "htu_mismatch", id="trailing-slash-kept"
        ),
    ],
)  # fmt: skip
def test_figure_13_variants(
    method: str, url: str, host: str | None, status: int, reason: str | None
) -> None:
    answer = send(harness(), method, url, host=host)
    assert (answer.status, answer.reason) == (status, reason)
    if status == 401:
        assert answer.error == "invalid_dpop_proof"


def test_figure_13_uppercase_scheme_and_host_request_uri() -> None:
    """``HTTPS://RESOURCE.example.org:443/...``: the scheme the server sees is case-folded too."""
    h = harness()
    answer = h.send(
        "GET",
        "HTTPS://RESOURCE.example.org:443/protectedresource",
        [("authorization", f"DPoP {TOKEN}"), ("dpop", FIG13["proof"])],
    )
    assert answer.status == 200


def test_figure_13_clock_past_the_window() -> None:
    answer = send(harness(clock_at=IAT + 61))
    assert (answer.status, answer.error, answer.reason) == (
        401,
        "invalid_dpop_proof",
        "iat_too_old",
    )


def test_figure_13_at_the_edge_of_the_window() -> None:
    assert send(harness(clock_at=IAT + 60)).status == 200


def test_figure_13_clock_far_behind_means_iat_in_future() -> None:
    answer = send(harness(clock_at=IAT - 11))
    assert (answer.status, answer.reason) == (401, "iat_in_future")


def test_figure_13_another_access_token() -> None:
    other = "another-token"
    h = Harness(
        {"token_verifier": lambda t: {"cnf": {"jkt": VECTORS["jkt"]}}, "clock": lambda: IAT}
    )
    answer = send(h, token=other)
    assert (answer.status, answer.error, answer.reason) == (
        401,
        "invalid_dpop_proof",
        "ath_mismatch",
    )


def test_figure_13_token_bound_to_another_key() -> None:
    answer = send(harness(bound_to="0" * 43))
    assert (answer.status, answer.error, answer.reason) == (401, "invalid_token", "jkt_mismatch")
    # RFC 9449 figure 16
    assert 'error_description="Invalid DPoP key binding"' in answer.challenge


def test_figure_2_token_request_proof_is_refused_at_a_resource_server() -> None:
    """Figure 2 has no ``ath``: a resource server must refuse it (section 7)."""
    h = Harness({"token_verifier": introspect(), "clock": lambda: VECTORS_FIG2_IAT})
    answer = h.send(
        "POST",
        "https://server.example.com/token",
        [("authorization", f"DPoP {TOKEN}"), ("dpop", VECTORS["token_request_proof"]["proof"])],
    )
    assert (answer.status, answer.error, answer.reason) == (
        401,
        "invalid_dpop_proof",
        "ath_missing",
    )


VECTORS_FIG2_IAT = 1562262616


def test_challenge_figures_15_and_17() -> None:
    """No credentials: no error code (figures 15 and 17)."""
    h = Harness(
        {"token_verifier": introspect(), "clock": lambda: IAT, "algorithms": ["ES256", "PS256"]}
    )
    assert h.send("GET", URL).challenge == VECTORS["challenges"]["figure_15"]
    hb = Harness(
        {"token_verifier": introspect(), "clock": lambda: IAT, "algorithms": ["ES256", "PS256"],
         "mode": "dpop_or_bearer"}
    )  # fmt: skip
    assert hb.send("GET", URL).challenge == VECTORS["challenges"]["figure_17"]


def test_challenge_figure_16() -> None:
    h = Harness(
        {"token_verifier": introspect("0" * 43), "clock": lambda: IAT, "algorithms": ["ES256"]}
    )
    assert send(h).challenge == VECTORS["challenges"]["figure_16"]
