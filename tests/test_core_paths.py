"""Path rules (issue 11 items 1, 2, 3, 5, 6): the middleware judges the path exactly as the
application routes it. Through real servers: tests/test_path_attacks.py."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import API
from core_helpers import Harness
from hypothesis import given, settings
from hypothesis import strategies as st

from dpop_middleware import ConfigurationError, Settings
from dpop_middleware.core import htu
from dpop_middleware.core.paths import under
from dpop_middleware.testing import DPoPKey, TokenIssuer

PREFLIGHT = [("origin", "https://app.example"), ("access-control-request-method", "POST")]


@pytest.fixture
def h(make_settings: Any) -> Harness:
    return Harness(make_settings(exclude_paths=["/health"]))


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/files/../health", id="dotdot"),
        pytest.param("/files/%2e%2e/health", id="encoded-lower"),
        pytest.param("/files/%2E%2E/health", id="encoded-upper"),
        pytest.param("/files/.%2E/health", id="half-encoded"),
        pytest.param("/files/..%2Fhealth", id="encoded-slash-after"),
        pytest.param("/files%2F..%2Fhealth", id="all-in-one-segment"),
        pytest.param("/graphql/../health", id="mount"),
        pytest.param("/health/../admin", id="out-of-excluded"),
        pytest.param("/./health", id="single-dot"),
        pytest.param("/%2e/health", id="single-dot-encoded"),
        pytest.param("/files/..", id="trailing-dotdot"),
        pytest.param("/files/.", id="trailing-dot"),
        pytest.param("/..", id="root-dotdot"),
    ],
)
def test_dot_segment_paths_are_refused_without_credentials(h: Harness, path: str) -> None:
    answer = h.send("GET", API + path)
    assert (answer.status, answer.error, answer.reason) == (
        400, "invalid_request", "dot_segment_path",
    )  # fmt: skip
    assert answer.outcome.result is None


def test_dot_segment_refused_even_with_a_valid_proof(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """A victim's proof for ``DELETE https://h/admin`` cannot be moved onto
    ``DELETE /files/../admin`` (the htu normalises to /admin, the app routes /files/..)."""
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("DELETE", API + "/admin", access_token=token)
    headers = [("authorization", f"DPoP {token}"), ("dpop", proof)]
    answer = h.send("DELETE", API + "/files/../admin", headers)
    assert (answer.status, answer.reason) == (400, "dot_segment_path")
    assert h.send("DELETE", API + "/admin", headers).status == 200


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/a.b/c", id="dot-in-name"),
        pytest.param("/a/.well-known/x", id="dot-prefix"),
        pytest.param("/a/...", id="three-dots"),
        pytest.param("/a/..b", id="dotdot-prefix"),
        pytest.param("/a/%252e%252e/b", id="double-encoded-is-data"),
    ],
)
def test_dots_that_are_not_segments_pass(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, path: str
) -> None:
    assert h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", API + path).status == 200


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        pytest.param("/health", True, id="exact"),
        pytest.param("/health/", True, id="trailing-slash"),
        pytest.param("/health/live", True, id="below"),
        pytest.param("/health%2Flive", True, id="encoded-slash-routes-below"),
        pytest.param("/healthz", False, id="not-a-segment"),
        pytest.param("/Health", False, id="case-sensitive"),
        pytest.param("/%68ealth", True, id="unreserved-escape-routes-as-health"),
        pytest.param("/x/health", False, id="deeper"),
    ],
)
def test_exclude_paths_match_the_routed_path(h: Harness, path: str, excluded: bool) -> None:
    answer = h.send("GET", API + path)
    assert answer.status == (200 if excluded else 401)


def test_under_matches_whole_segments() -> None:
    assert under("/admin", ("/admin",)) and under("/admin/x", ("/admin",))
    assert not under("/administrator", ("/admin",))
    assert under("/anything", ("/",))


@pytest.fixture
def nonce_h(make_settings: Any) -> Harness:
    return Harness(make_settings(nonce={"secret": "s" * 32, "required": ["/api"]}))


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/api", id="exact"),
        pytest.param("/api/x", id="below"),
        pytest.param("/api%2Fx", id="encoded-slash"),
        pytest.param("/ap%69/x", id="escaped-letter"),
    ],
)
def test_nonce_required_prefix_matches_the_routed_path(
    nonce_h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, path: str
) -> None:
    """RFC 9449 section 11.3: no proof without a nonce where one is required."""
    answer = nonce_h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", API + path)
    assert (answer.status, answer.error, answer.reason) == (401, "use_dpop_nonce", "nonce_missing")


def test_nonce_required_prefix_dot_segment_is_refused(
    nonce_h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    answer = nonce_h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", API + "/api/../x")
    assert (answer.status, answer.reason) == (400, "dot_segment_path")


def test_nonce_not_required_outside_the_prefix(
    nonce_h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    assert (
        nonce_h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", API + "/apix").status == 200
    )


# -- item 3 and 5: cost and memory do not grow with an attacker's path -------------------------


def test_long_path_is_refused_before_any_work(h: Harness) -> None:
    answer = h.send("GET", API + "/1" + "/" * 15_900)
    assert (answer.status, answer.error, answer.reason) == (400, "invalid_request", "path_too_long")


def test_max_path_length_setting(make_settings: Any) -> None:
    h = Harness(make_settings(max_path_length=300))
    assert h.send("GET", API + "/" + "a" * 299).status == 401  # no credentials, but not too long
    assert h.send("GET", API + "/" + "a" * 300).reason == "path_too_long"
    with pytest.raises(ConfigurationError, match="max_path_length"):
        Settings.from_dict(make_settings(max_path_length=10))


def _rfc_remove_dot_segments(path: str) -> str:
    """The RFC 3986 section 5.2.4 loop, word for word (quadratic: it copies the rest of the path
    at every segment), as the oracle for the one-pass version."""
    out: list[str] = []
    while path:
        if path.startswith(("../", "./")):
            path = path[path.index("/") + 1 :]
        elif path.startswith("/./") or path == "/.":
            path = "/" + path[3:]
        elif path.startswith("/../") or path == "/..":
            path = "/" + path[4:]
            if out:
                out.pop()
        elif path in (".", ".."):
            path = ""
        else:
            end = path.find("/", 1)
            end = len(path) if end == -1 else end
            out.append(path[:end])
            path = path[end:]
    return "".join(out)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(["/", ".", "..", "a", "%2e", "b/"]), max_size=14))
def test_one_pass_dot_segment_removal_matches_the_rfc(parts: list[str]) -> None:
    path = "/" + "".join(parts)
    assert htu.remove_dot_segments(path) == _rfc_remove_dot_segments(path)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/b/c/./../../g", "/a/g"),  # RFC 3986 section 5.2.4's own examples
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("/..", "/"),
        ("//..", "/"),
        ("/a//..", "/a/"),
        ("", ""),
    ],
)
def test_dot_segment_removal_examples(path: str, expected: str) -> None:
    assert htu.remove_dot_segments(path) == expected


def test_long_inputs_are_not_memoised() -> None:
    """Four memo caches kept whole attacker paths (240 MB after 4,400 requests of 15 KB)."""
    before = htu.normalize_path.cache_info().currsize  # type: ignore[attr-defined]
    for i in range(50):
        htu.normalize_path(f"/{i}" + "%" * 2000)
        htu.normalize_uri(f"https://h.example/{i}" + "%" * 2000)
    assert htu.normalize_path.cache_info().currsize == before  # type: ignore[attr-defined]
    htu.normalize_path("/short/path/for/memo")
    assert htu.normalize_path.cache_info().currsize == before + 1  # type: ignore[attr-defined]


# -- item 6: CORS preflight --------------------------------------------------------------------


def test_preflight_is_verified_by_default(make_settings: Any) -> None:
    """Any client can send Access-Control-Request-Method: a preflight must not reach a protected
    handler unauthenticated unless the app says it answers preflights itself."""
    h = Harness(make_settings())
    answer = h.send("OPTIONS", API + "/admin/purge", PREFLIGHT)
    assert (answer.status, answer.error, answer.reason) == (401, None, "no_credentials")


def test_preflight_passes_when_configured(make_settings: Any) -> None:
    h = Harness(make_settings(cors_preflight="pass"))
    answer = h.send("OPTIONS", API + "/admin/purge", PREFLIGHT)
    assert answer.status == 200 and answer.outcome.result is None
    # an OPTIONS request that is not a CORS preflight is still checked
    assert h.send("OPTIONS", API + "/admin/purge").status == 401
    # and a preflight with a dot-segment is still refused
    assert h.send("OPTIONS", API + "/x/../admin", PREFLIGHT).reason == "dot_segment_path"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        pytest.param({"cors_preflight": "allow"}, "cors_preflight", id="preflight-value"),
        pytest.param({"exclude_paths": ["/a/../health"]}, "exclude_paths", id="exclude-dotdot"),
        pytest.param({"exclude_paths": ["/./health"]}, "exclude_paths", id="exclude-dot"),
    ],
)
def test_path_settings_are_validated(make_settings: Any, raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigurationError, match=repr(key)):
        Settings.from_dict(make_settings(**raw))


# -- item 5: every cache is bounded by bytes or by entry size ----------------------------------


def test_lru_byte_budget_evicts_oldest() -> None:
    from dpop_middleware.core.keys import LRU

    lru: LRU[str, int] = LRU(100, max_bytes=1000)
    for i in range(10):
        lru.put(f"k{i}", i, 300)
    assert len(lru) == 3 and lru.bytes == 900
    assert lru.get("k9") == 9 and lru.get("k6") is None
    lru.put("huge", 1, 1001)  # larger than the whole budget: never kept
    assert lru.get("huge") is None and lru.bytes == 900


def test_token_cache_is_bounded_by_bytes(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large tokens: far fewer than token_cache_size entries are kept (a 1 MiB budget here, so
    the test stays small; the default is TOKEN_CACHE_MAX_BYTES)."""
    from dpop_middleware.core import token as token_module

    monkeypatch.setattr(token_module, "TOKEN_CACHE_MAX_BYTES", 1 << 20)
    h = Harness(make_settings(token_cache_size=1_000_000))
    cache = h.engine.verifier._tokens._cache
    filler = "x" * 10_000
    for _ in range(60):
        token = issuer.token(bound_to=dpop_key, claims={"filler": filler})
        assert h.dpop(dpop_key, token, "GET", API + "/items").status == 200
    assert 0 < cache.bytes <= 1 << 20
    assert 0 < len(cache) < 60


def test_large_proof_headers_are_not_cached(
    h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """A header with a huge (ignored) member passes, but is checked each time, not kept."""
    proofs = h.engine.verifier._proofs
    token = issuer.token(bound_to=dpop_key)
    before = proofs._header.cache_info().currsize  # type: ignore[attr-defined]
    answer = h.dpop(dpop_key, token, "GET", API + "/items", header={"kid": "y" * 3000})
    assert answer.status == 200
    assert proofs._header.cache_info().currsize == before  # type: ignore[attr-defined]


# -- found by the attacker's review of the path rule -------------------------------------------


@pytest.mark.parametrize("path", ["//api/x", "///api/x", "/%2Fapi/x", "/%2F%2Fapi/x"])
def test_leading_double_slash_is_refused(
    nonce_h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey, path: str
) -> None:
    """werkzeug routes ``//api/x`` as ``/api/x``; Starlette and Django as another path."""
    answer = nonce_h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", API + path)
    assert (answer.status, answer.error, answer.reason) == (
        400, "invalid_request", "double_slash_path",
    )  # fmt: skip


def test_inner_empty_segments_still_pass(
    nonce_h: Harness, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    answer = nonce_h.dpop(dpop_key, issuer.token(bound_to=dpop_key), "GET", API + "/x//y")
    assert answer.status == 200


@pytest.mark.parametrize("header", ["script-name", "daphne-root-path"])
def test_a_client_cannot_name_the_mount_prefix(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey, header: str
) -> None:
    """A victim's proof for ``/files/admin/purge`` sent as ``/admin/purge`` with a header that
    makes the server mount the app at ``/files``: the htu matches, the app routes /admin/purge."""
    h = Harness(make_settings())
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("DELETE", API + "/files/admin/purge", access_token=token)
    creds = [("authorization", f"DPoP {token}"), ("dpop", proof), (header, "/files")]
    answer = h.send("DELETE", API + "/admin/purge", creds, root_path="/files")
    assert (answer.status, answer.error, answer.reason) == (
        400, "invalid_request", "untrusted_mount_prefix",
    )  # fmt: skip


def test_a_trusted_proxy_may_name_the_mount_prefix(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = Harness(make_settings(trusted_proxies=["10.0.0.0/8"]))
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("DELETE", API + "/files/admin/purge", access_token=token)
    creds = [("authorization", f"DPoP {token}"), ("dpop", proof), ("script-name", "/files")]
    answer = h.send("DELETE", API + "/admin/purge", creds, root_path="/files", client_ip="10.1.2.3")
    assert answer.status == 200


def test_public_url_makes_the_prefix_header_harmless(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """With public_url the server's prefix is replaced: the moved proof's htu no longer matches."""
    h = Harness(make_settings(public_url=API))
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("DELETE", API + "/files/admin/purge", access_token=token)
    creds = [("authorization", f"DPoP {token}"), ("dpop", proof), ("script-name", "/files")]
    answer = h.send("DELETE", API + "/admin/purge", creds, root_path="/files")
    assert (answer.status, answer.reason) == (401, "htu_mismatch")
