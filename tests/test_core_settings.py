"""Settings fail at start-up with a message naming the key, the value and what is allowed."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import markcoroutinefunction

from dpop_middleware import ConfigurationError, Settings

BASE: dict[str, Any] = {
    "issuer": "https://issuer.example",
    "audience": "https://api.example",
    "jwks": {"keys": []},
}


def build(**extra: Any) -> Settings:
    return Settings.from_dict({**BASE, **extra})


def test_defaults() -> None:
    s = build()
    assert s.algorithms == (
        "ES256",
        "ES384",
        "ES512",
        "PS256",
        "PS384",
        "PS512",
        "RS256",
        "EdDSA",
        "Ed25519",
    )
    assert (s.proof_max_age, s.clock_skew, s.leeway) == (60, 10, 5)
    assert s.mode == "dpop"
    assert s.replay_store.kind == "memory"
    assert s.nonce is None
    assert s.replay_ttl >= s.proof_max_age + s.clock_skew


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        pytest.param({"algoritms": ["ES256"]}, "did you mean 'algorithms'", id="typo-hint"),
        pytest.param(
            {"algorithms": ["none"]}, "asymmetric signature algorithms only", id="alg-none"
        ),
        pytest.param(
            {"algorithms": ["HS256"]}, "asymmetric signature algorithms only", id="alg-hs256"
        ),
        pytest.param(
            {"access_token_algorithms": ["HS256"]}, "'access_token_algorithms'", id="at-hs256"
        ),
        pytest.param({"algorithms": []}, "'algorithms'", id="alg-empty"),
        pytest.param({"algorithms": "ES256"}, "'algorithms'", id="alg-string"),
        pytest.param({"algorithms": ["ES999"]}, "'algorithms': got ['ES999']", id="alg-unknown"),
        pytest.param({"proof_max_age": 0}, "'proof_max_age'", id="max-age-zero"),
        pytest.param({"clock_skew": -1}, "'clock_skew'", id="skew-negative"),
        pytest.param({"leeway": "5"}, "'leeway'", id="leeway-string"),
        pytest.param({"mode": "bearer"}, "'mode': got 'bearer'", id="mode"),
        pytest.param({"audience": ""}, "'audience'", id="audience-empty"),
        pytest.param({"audience": 5}, "'audience'", id="audience-number"),
        pytest.param({"issuer": ""}, "'issuer'", id="issuer-empty"),
        pytest.param({"jwks": {"k": 1}}, "'jwks'", id="jwks-shape"),
        pytest.param({"trusted_proxies": ["not-an-ip"]}, "'trusted_proxies'", id="proxies"),
        pytest.param({"trusted_proxies": "10.0.0.1"}, "'trusted_proxies'", id="proxies-string"),
        pytest.param({"public_url": "api.example"}, "'public_url'", id="public-url-relative"),
        pytest.param(
            {"public_url": "https://api.example/?q"}, "'public_url'", id="public-url-query"
        ),
        pytest.param({"exclude_paths": ["health"]}, "'exclude_paths'", id="exclude-no-slash"),
        pytest.param({"on_refusal": "log"}, "'on_refusal'", id="hook-not-callable"),
        pytest.param({"replay_store": "memcached://x"}, "'replay_store'", id="store-scheme"),
        pytest.param(
            {"replay_store": {"url": "memory://", "size": 3}}, "'replay_store'", id="store-key"
        ),
        pytest.param({"nonce": {"secret": "short"}}, "'nonce.secret'", id="nonce-short"),
        pytest.param(
            {"nonce": {"lifetime": 60}}, "'nonce.secret' is missing", id="nonce-no-secret"
        ),
        pytest.param(
            {"nonce": {"secret": "x" * 32, "lifetme": 5}},
            "did you mean 'lifetime'",
            id="nonce-typo",
        ),
        pytest.param({"nonce": "on"}, "'nonce'", id="nonce-string"),
        pytest.param(
            {"strict_access_token_typ": "yes"}, "'strict_access_token_typ'", id="strict-typ"
        ),
        pytest.param({"realm": 'a"b'}, "'realm'", id="realm-quote"),
    ],
)
def test_bad_settings_name_the_key(extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build(**extra)
    assert fragment in str(info.value)
    assert (
        "allowed" in str(info.value)
        or "did you mean" in str(info.value)
        or "missing" in str(info.value)
    )


def test_secret_is_never_shown() -> None:
    with pytest.raises(ConfigurationError) as info:
        build(nonce={"secret": "tiny-secret"})
    assert "tiny-secret" not in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"issuer": "https://i?x=1", "audience": "a"}, id="discovery-issuer-query"),
        pytest.param({"issuer": "http://i.example", "audience": "a"}, id="discovery-issuer-http"),
        pytest.param({"issuer": "https://i", "audience": "a", "token_verifier": dict,
                      "introspection": {"client_id": "c", "client_secret": "s"}},
                     id="verifier-and-introspection"),
        pytest.param({"issuer": "https://i", "audience": "a", "token_source": "introspection"},
                     id="introspection-source-without-introspection"),
        pytest.param({"issuer": "https://i", "audience": "a", "token_source": "jwt",
                      "introspection": {"client_id": "c", "client_secret": "s"}},
                     id="jwt-source-with-introspection"),
        pytest.param({"issuer": "https://i", "audience": "a",
                      "introspection": {"client_id": "c", "client_secret": "s",
                                        "auth_method": "private_key_jwt"}},
                     id="introspection-auth-method"),
        pytest.param({"issuer": "https://i", "audience": "a",
                      "introspection": {"client_id": "c"}}, id="introspection-no-secret"),
        pytest.param({"issuer": "https://i", "audience": "a",
                      "introspection": {"client_id": "c", "client_secret": "s",
                                        "endpoint": "http://as.example/introspect"}},
                     id="introspection-endpoint-http"),
        pytest.param({**BASE, "jwks_uri": "https://i/jwks"}, id="two-key-sources"),
        pytest.param({"audience": "a", "jwks": {"keys": []}}, id="no-issuer"),
        pytest.param({"issuer": "https://i", "jwks": {"keys": []}}, id="no-audience"),
    ],
)
def test_key_source_rules(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_dict(raw)


def test_issuer_and_audience_alone_mean_discovery() -> None:
    from dpop_middleware.core.token import uses_discovery

    s = Settings.from_dict({"issuer": "https://as.example/tenant", "audience": "a"})
    assert uses_discovery(s)
    assert not uses_discovery(Settings.from_dict({**BASE}))


def test_the_client_secret_is_never_shown() -> None:
    s = Settings.from_dict(
        {**BASE, "introspection": {"client_id": "c", "client_secret": "hunter2-secret"}}
    )
    assert "hunter2-secret" not in repr(s)
    with pytest.raises(ConfigurationError) as info:
        Settings.from_dict({**BASE, "introspection": {"client_id": "c", "client_secret": 12345}})
    assert "12345" not in str(info.value)
    assert "<secret>" in str(info.value)


def test_jwks_uri_must_be_https_except_localhost() -> None:
    base = {"issuer": "https://i", "audience": "a"}
    with pytest.raises(ConfigurationError, match="'jwks_uri'"):
        Settings.from_dict({**base, "jwks_uri": "http://issuer.example/jwks"})
    Settings.from_dict({**base, "jwks_uri": "http://127.0.0.1:8080/jwks"})
    Settings.from_dict({**base, "jwks_uri": "https://issuer.example/jwks"})


def test_token_verifier_needs_no_issuer() -> None:
    s = Settings.from_dict({"token_verifier": lambda token: {}})
    assert s.token_verifier is not None


async def _async_verify(token: str) -> dict[str, Any]:  # pragma: no cover
    return {}


async def _async_gen_verify(token: str) -> AsyncIterator[dict[str, Any]]:  # pragma: no cover
    yield {}


def _sync_verify(token: str, extra: int = 0) -> dict[str, Any]:  # pragma: no cover
    return {}


class _AsyncCallable:
    async def __call__(self, token: str) -> dict[str, Any]:  # pragma: no cover
        return {}

    async def verify(self, token: str) -> dict[str, Any]:  # pragma: no cover
        return {}


class _SyncCallable:
    def __call__(self, token: str) -> dict[str, Any]:  # pragma: no cover
        return {}


def _marked(token: str) -> Any:  # pragma: no cover
    return _async_verify(token)


@pytest.mark.parametrize(
    "verifier",
    [
        pytest.param(_async_verify, id="async-def"),
        pytest.param(functools.partial(_async_verify), id="partial-of-async-def"),
        pytest.param(_AsyncCallable(), id="object-with-async-call"),
        pytest.param(functools.partial(_AsyncCallable()), id="partial-of-async-object"),
        pytest.param(_AsyncCallable().verify, id="async-bound-method"),
        pytest.param(markcoroutinefunction(_marked), id="markcoroutinefunction"),
    ],
)
def test_an_async_token_verifier_is_accepted(verifier: Any) -> None:
    """Awaited under ASGI, run in a private event loop under WSGI (sources.py)."""
    from dpop_middleware.settings import is_async_callable

    assert Settings.from_dict({"token_verifier": verifier}).token_verifier is verifier
    assert is_async_callable(verifier)


def test_an_async_generator_is_no_verifier() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_dict({"token_verifier": _async_gen_verify})
    assert str(caught.value) == (
        "dpop_middleware setting 'token_verifier': got <callable>; allowed: a callable(token: "
        "str) -> claims dict, plain or async def (not an async generator)"
    )


@pytest.mark.parametrize(
    "verifier",
    [
        pytest.param(_sync_verify, id="def"),
        pytest.param(functools.partial(_sync_verify, extra=1), id="partial"),
        pytest.param(_SyncCallable(), id="object"),
        pytest.param(dict, id="class"),
    ],
)
def test_a_sync_token_verifier_is_accepted(verifier: Any) -> None:
    assert Settings.from_dict({"token_verifier": verifier}).token_verifier is verifier


def test_not_a_dict() -> None:
    with pytest.raises(ConfigurationError, match="must be a dict"):
        Settings.from_dict(["issuer"])  # type: ignore[arg-type]


def test_nonce_settings() -> None:
    s = build(nonce={"secret": ["n" * 32, b"o" * 32], "lifetime": 30, "required": ["/pay"]})
    assert s.nonce is not None
    assert s.nonce.secrets == (b"n" * 32, b"o" * 32)
    assert s.nonce.required == ("/pay",)
    assert s.nonce.context == "https://api.example"
    assert s.nonce.freshness == "iat_and_nonce"
    # iat is checked with nonces on: the jti is remembered for the iat window only
    assert s.replay_ttl == s.proof_max_age + s.clock_skew + 1
    # nonce-only: the jti must be remembered as long as a proof is accepted by its nonce
    lax = build(nonce={"secret": "n" * 32, "lifetime": 300, "freshness": "nonce_only"})
    assert lax.nonce is not None and lax.nonce.freshness == "nonce_only"
    assert lax.replay_ttl == 300 * 2 + 300 + 1


@pytest.mark.parametrize("value", ["nonce", "iat", "", None, True])
def test_nonce_freshness_is_validated(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"'nonce.freshness'.*'iat_and_nonce'.*'nonce_only'"):
        build(nonce={"secret": "n" * 32, "freshness": value})


# -- required_scopes ---------------------------------------------------------------------------


def test_required_scopes_default_and_shape() -> None:
    assert build().required_scopes == ()
    (rule,) = build(
        required_scopes=[{"path": "/admin/", "methods": ["POST", "DELETE"], "scopes": ["admin"]}]
    ).required_scopes
    assert rule.path == "/admin"
    assert rule.methods == frozenset({"POST", "DELETE"})
    assert rule.scopes == ("admin",)
    (any_method,) = build(required_scopes=[{"path": "/", "scopes": ["a", "b"]}]).required_scopes
    assert any_method.methods is None


RULE = {"path": "/admin", "scopes": ["admin"]}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        pytest.param({"path": "/a", "scopes": ["x"]}, "'required_scopes'", id="not-a-list"),
        pytest.param("admin", "'required_scopes'", id="string"),
        pytest.param(["/admin"], "'required_scopes[0]'", id="rule-not-a-dict"),
        pytest.param([{"path": "/admin"}], "'required_scopes[0]'", id="no-scopes"),
        pytest.param([{"scopes": ["a"]}], "'required_scopes[0]'", id="no-path"),
        pytest.param(
            [{**RULE, "method": ["POST"]}], "did you mean 'methods'", id="unknown-rule-key"
        ),
        pytest.param([{**RULE, "path": "admin"}], "'required_scopes[0].path'", id="no-slash"),
        pytest.param(
            [{**RULE, "path": "/a/../admin"}], "'required_scopes[0].path'", id="dot-segment"
        ),
        pytest.param([{**RULE, "path": "/a?x"}], "'required_scopes[0].path'", id="query"),
        pytest.param([{**RULE, "scopes": []}], "'required_scopes[0].scopes'", id="scopes-empty"),
        pytest.param(
            [{**RULE, "scopes": "admin"}], "'required_scopes[0].scopes'", id="scopes-string"
        ),
        pytest.param([{**RULE, "scopes": [""]}], "'required_scopes[0].scopes'", id="scope-empty"),
        pytest.param(
            [{**RULE, "scopes": ["a b"]}], "'required_scopes[0].scopes'", id="scope-space"
        ),
        pytest.param(
            [{**RULE, "scopes": ['a"b']}], "'required_scopes[0].scopes'", id="scope-quote"
        ),
        pytest.param(
            [{**RULE, "scopes": ["a\\b"]}], "'required_scopes[0].scopes'", id="scope-backslash"
        ),
        pytest.param([{**RULE, "scopes": [1]}], "'required_scopes[0].scopes'", id="scope-number"),
        pytest.param(
            [RULE, {**RULE, "methods": ["post"]}],
            "'required_scopes[1].methods'",
            id="method-lower-case",
        ),
        pytest.param(
            [{**RULE, "methods": "POST"}], "'required_scopes[0].methods'", id="methods-string"
        ),
        pytest.param([{**RULE, "methods": []}], "'required_scopes[0].methods'", id="methods-empty"),
        pytest.param(
            [{**RULE, "methods": ["GET POST"]}], "'required_scopes[0].methods'", id="method-space"
        ),
    ],
)
def test_bad_required_scopes_name_the_key(value: Any, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build(required_scopes=value)
    assert fragment in str(info.value)
    assert "allowed" in str(info.value) or "did you mean" in str(info.value)


def test_required_scopes_with_claims() -> None:
    (rule,) = build(
        required_scopes=[{"path": "/t", "claims": {"tenant": "acme", "n": 3, "ok": True}}]
    ).required_scopes
    assert rule.scopes == ()
    assert rule.claims == (("tenant", "acme"), ("n", 3), ("ok", True))


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param({"path": "/t"}, id="neither-scopes-nor-claims"),
        pytest.param({"path": "/t", "claims": ["tenant"]}, id="claims-list"),
        pytest.param({"path": "/t", "claims": {"tenant": 1.5}}, id="claim-float"),
        pytest.param({"path": "/t", "claims": {"tenant": None}}, id="claim-null"),
        pytest.param({"path": "/t", "claims": {"": "x"}}, id="claim-empty-name"),
    ],
)
def test_bad_claim_rules_name_the_key(rule: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=r"'required_scopes\[0\]") as info:
        build(required_scopes=[rule])
    assert "allowed" in str(info.value)


@pytest.mark.parametrize("key", ["nonce", "introspection"])
def test_a_secret_given_in_place_of_the_dict_is_not_echoed(key: str) -> None:
    """Found by review: ``"nonce": SECRET`` put the secret into the ConfigurationError, which the
    lazy start-up path logs at ERROR."""
    secret = "s3cr3t-value-" + "x" * 32
    with pytest.raises(ConfigurationError, match=repr(key)) as info:
        build(**{key: secret})
    assert secret not in str(info.value) and "<secret>" in str(info.value)
