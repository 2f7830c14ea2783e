"""Issue 11 items 1, 2 and 6 through real servers: what an attacker sends on the wire, and which
handler it reaches. uvicorn + Starlette, gunicorn + Flask, gunicorn + Django
(tests/apps/routed.py); every request goes over a socket with http.client, its target sent
byte for byte as written here (no client-side normalisation).

Before the fix, with ``exclude_paths=["/health"]`` and no credentials, ``GET /files/../health``
answered 200 from the *protected* ``/files/{p}`` handler, a proof without a nonce passed on
``/api%2Fx`` (routed as ``/api/x``, under ``nonce.required``), and a CORS preflight ran a
Django function view unauthenticated.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from test_servers import running, send

from dpop_middleware.testing import DPoPKey, TokenIssuer

SERVERS = [
    pytest.param(("uvicorn", "tests.apps.routed:starlette"), id="uvicorn-starlette"),
    pytest.param(("gunicorn", "tests.apps.routed:flask"), id="gunicorn-flask"),
    pytest.param(("gunicorn", "tests.apps.routed:django"), id="gunicorn-django"),
]
NONCE_SECRET = "n" * 32


@pytest.fixture(scope="module", params=SERVERS)
def port(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    session_issuer: TokenIssuer,
) -> Iterator[int]:
    kind, target = request.param
    folder = tmp_path_factory.mktemp("routed")
    settings = session_issuer.settings(
        exclude_paths=["/health"],
        nonce={"secret": NONCE_SECRET, "required": ["/api"]},
        required_scopes=[{"path": "/files/secret", "scopes": ["admin"]}],
    )
    (folder / "settings.json").write_text(json.dumps(settings))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOP_TEST_SETTINGS", str(folder / "settings.json"))
        with running(kind, target, log=folder / "server.log") as bound:
            yield bound


@pytest.fixture
def issuer(session_issuer: TokenIssuer) -> TokenIssuer:
    """The real clock: these servers run it."""
    return session_issuer


def body(raw: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(raw)
    return data


def dpop_headers(
    issuer: TokenIssuer, key: DPoPKey, method: str, url: str, **proof: Any
) -> list[tuple[str, str]]:
    token = issuer.token(bound_to=key)
    return [
        ("Authorization", f"DPoP {token}"),
        ("DPoP", key.proof(method, url, access_token=token, **proof)),
    ]


@pytest.mark.parametrize(
    ("method", "target"),
    [
        pytest.param("GET", "/files/../health", id="dotdot"),
        pytest.param("GET", "/files/%2e%2e/health", id="encoded"),
        pytest.param("GET", "/files/%2E%2e/health", id="encoded-mixed-case"),
        pytest.param("GET", "/files/..%2Fhealth", id="encoded-slash"),
        pytest.param("POST", "/graphql/../health", id="mounted-sub-app"),
        pytest.param("GET", "/health/../admin/purge", id="out-of-excluded"),
    ],
)
def test_dot_segments_never_reach_a_handler_without_credentials(
    port: int, method: str, target: str
) -> None:
    status, _, raw = send(port, method, target, [])
    assert status == 400, raw
    assert body(raw)["error"] == "invalid_request"
    assert "route" not in body(raw)


def test_the_excluded_path_itself_still_passes(port: int) -> None:
    status, _, raw = send(port, "GET", "/health", [])
    assert (status, body(raw)) == (200, {"route": "health", "dpop": False})
    assert send(port, "GET", "/healthz", [])[0] == 401


def test_a_proof_cannot_be_moved_onto_a_dot_segment_path(
    port: int, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """A victim's proof for ``DELETE /admin/purge`` sent as ``DELETE /files/../admin/purge``:
    its htu normalises to the signed URI, but the app would run the /files handler."""
    url = f"http://127.0.0.1:{port}/admin/purge"
    headers = dpop_headers(issuer, dpop_key, "DELETE", url)
    status, _, raw = send(port, "DELETE", "/files/../admin/purge", headers)
    assert (status, body(raw)["error"]) == (400, "invalid_request")
    status, _, raw = send(port, "DELETE", "/admin/purge", headers)
    assert (status, body(raw)) == (200, {"route": "purge", "dpop": True})


@pytest.mark.parametrize("target", ["/api%2Fx", "/api/x", "/ap%69/x"])
def test_nonce_required_prefix_is_matched_as_routed(
    port: int, issuer: TokenIssuer, dpop_key: DPoPKey, target: str
) -> None:
    """RFC 9449 section 11.3: on a path under ``nonce.required`` a proof needs the nonce."""
    url = f"http://127.0.0.1:{port}{target}"
    status, headers, raw = send(port, "GET", target, dpop_headers(issuer, dpop_key, "GET", url))
    assert status == 401, raw
    assert body(raw)["error"] == "use_dpop_nonce"
    (nonce,) = [v for k, v in headers if k == "dpop-nonce"]
    headers = dpop_headers(issuer, dpop_key, "GET", url, nonce=nonce)
    status, _, raw = send(port, "GET", target, headers)
    assert (status, body(raw)) == (200, {"route": "api", "dpop": True, "p": "x"})


def test_nonce_required_prefix_dot_segment(
    port: int, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    url = f"http://127.0.0.1:{port}/x"
    status, _, raw = send(port, "GET", "/api/../x", dpop_headers(issuer, dpop_key, "GET", url))
    assert (status, body(raw)["error"]) == (400, "invalid_request")


def test_preflight_never_runs_a_protected_handler(port: int) -> None:
    """Any client can send ``Access-Control-Request-Method``: by default a preflight is checked
    like every request (``cors_preflight="pass"`` opts out; README "CORS")."""
    headers = [("Origin", "https://evil.example"), ("Access-Control-Request-Method", "POST")]
    status, _, raw = send(port, "OPTIONS", "/admin/purge", headers)
    assert status == 401
    assert body(raw)["error"] == "unauthorized"


@pytest.mark.parametrize("target", ["//api/x", "/%2Fapi/x"])
def test_leading_double_slash_cannot_skip_the_nonce(
    port: int, issuer: TokenIssuer, dpop_key: DPoPKey, target: str
) -> None:
    """werkzeug routes ``//api/x`` as ``/api/x`` (it strips leading slashes before matching): a
    proof without a nonce for that URI reached the api handler under gunicorn + Flask."""
    url = f"http://127.0.0.1:{port}{target}"
    status, _, raw = send(port, "GET", target, dpop_headers(issuer, dpop_key, "GET", url))
    assert (status, body(raw)["error"]) == (400, "invalid_request"), raw


def test_a_client_cannot_move_the_mount_prefix(
    port: int, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """gunicorn takes ``SCRIPT_NAME`` from a request header (from 127.0.0.1 by default): a
    victim's proof for ``DELETE /files/admin/purge`` sent with ``SCRIPT_NAME: /files`` kept its
    htu while the app routed ``/admin/purge``. uvicorn ignores the header: the request is then
    routed to /files, as signed."""
    url = f"http://127.0.0.1:{port}/files/admin/purge"
    headers = [*dpop_headers(issuer, dpop_key, "DELETE", url), ("SCRIPT_NAME", "/files")]
    status, _, raw = send(port, "DELETE", "/files/admin/purge", headers)
    answer = body(raw)
    if answer.get("route") == "files":  # the server ignored the header (uvicorn)
        assert (status, answer["p"]) == (200, "admin/purge")
    else:  # the server moved the prefix (gunicorn): refused, never the purge handler
        assert (status, answer["error"]) == (400, "invalid_request"), raw


@pytest.mark.parametrize("target", ["/files/secret", "/files%2Fsecret", "/files/secre%74"])
def test_required_scopes_match_the_routed_path(
    port: int, issuer: TokenIssuer, dpop_key: DPoPKey, target: str
) -> None:
    """A required_scopes rule is matched like exclude_paths: every spelling the app routes to
    /files/secret needs the scope (the token has only "read")."""
    url = f"http://127.0.0.1:{port}{target}"
    status, headers, raw = send(port, "GET", target, dpop_headers(issuer, dpop_key, "GET", url))
    assert (status, body(raw)["error"]) == (403, "insufficient_scope"), raw
    (challenge,) = [v for k, v in headers if k == "www-authenticate"]
    assert 'scope="admin"' in challenge
