"""RFC 9728 protected resource metadata: the setting, the document, where it is served, and the
``resource_metadata`` challenge parameter (section 5.1); through the core and on real servers."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from conftest import API
from core_helpers import Harness, request

from dpop_middleware import ConfigurationError, DPoPMiddleware, DPoPWSGIMiddleware, Settings
from dpop_middleware.core.metadata import well_known_path
from dpop_middleware.testing import DPoPKey, TokenIssuer, serve

RESOURCE = "https://tools.example/mcp"
WELL_KNOWN = "/.well-known/oauth-protected-resource/mcp"
AS = "https://as.example"
ALGS = ["ES256", "EdDSA"]


def metadata(**extra: Any) -> dict[str, Any]:
    return {"resource": RESOURCE, "authorization_servers": [AS], **extra}


def build(**extra: Any) -> Settings:
    return Settings.from_dict(
        {"issuer": AS, "jwks": {"keys": []}, "resource_metadata": metadata(), **extra}
    )


@pytest.mark.parametrize(
    ("resource", "path"),
    [
        pytest.param("https://tools.example/mcp", WELL_KNOWN, id="path"),
        pytest.param("https://tools.example", "/.well-known/oauth-protected-resource", id="none"),
        pytest.param("https://tools.example/", "/.well-known/oauth-protected-resource", id="slash"),
        pytest.param(
            "https://t.example:8443/a/b/", "/.well-known/oauth-protected-resource/a/b/", id="deep"
        ),
    ],
)
def test_well_known_path_inserted_between_host_and_path(resource: str, path: str) -> None:
    """Section 3.1 (a terminating slash after the host removed first)."""
    assert well_known_path(resource) == path


def test_defaults_derived_from_resource() -> None:
    s = build()
    assert s.audience == (RESOURCE,)
    assert s.public_url is not None
    # Scheme and host from the resource; the mount prefix stays the server's (None).
    assert (s.public_url.scheme, s.public_url.authority, s.public_url.prefix) == (
        "https",
        "tools.example",
        None,
    )
    assert s.resource_metadata is not None
    assert s.resource_metadata.url == "https://tools.example" + WELL_KNOWN
    # Given values win.
    s = build(audience="api://x", public_url="https://tools.example/base")
    assert s.audience == ("api://x",)
    assert s.public_url is not None and s.public_url.prefix == "/base"


BAD = [
    pytest.param("x", "'resource_metadata'", id="not-a-dict"),
    pytest.param({"authorization_servers": [AS]}, "'resource_metadata.resource' is missing", id="no-resource"),
    pytest.param({"resource": RESOURCE}, "'resource_metadata.authorization_servers' is missing", id="no-as"),
    pytest.param(metadata(resource="http://tools.example/mcp"), "'resource_metadata.resource'.*https", id="http"),
    pytest.param(metadata(resource="https://tools.example/mcp#x"), "'resource_metadata.resource'", id="fragment"),
    pytest.param(metadata(resource="https://tools.example/mcp?x=1"), "'resource_metadata.resource'", id="query"),
    pytest.param(metadata(resource="https://u@tools.example/mcp"), "'resource_metadata.resource'", id="userinfo"),
    pytest.param(metadata(resource="/mcp"), "'resource_metadata.resource'", id="relative"),
    pytest.param(metadata(resource=7), "'resource_metadata.resource'", id="not-str"),
    pytest.param(metadata(authorization_servers=[]), "'resource_metadata.authorization_servers'", id="as-empty"),
    pytest.param(metadata(authorization_servers=AS), "'resource_metadata.authorization_servers'", id="as-str"),
    pytest.param(metadata(authorization_servers=["http://as.example"]), "'resource_metadata.authorization_servers'", id="as-http"),
    pytest.param(metadata(scopes_supported="read"), "'resource_metadata.scopes_supported'", id="scopes-str"),
    pytest.param(metadata(scopes_supported=["a b"]), "'resource_metadata.scopes_supported'", id="scope-space"),
    pytest.param(metadata(resource_name=3), "'resource_metadata.resource_name'", id="name"),
    pytest.param(metadata(**{"resource_name#fr": 3}), "'resource_metadata.resource_name#fr'", id="name-fr"),
    pytest.param(metadata(**{"scopes_supported#fr": ["a"]}), "language tags only", id="tag-on-list"),
    pytest.param(metadata(resource_documentation="ftp://x"), "'resource_metadata.resource_documentation'", id="doc"),
    pytest.param(metadata(jwks_uri="https://x/j#f"), "'resource_metadata.jwks_uri'", id="jwks-uri"),
    pytest.param(metadata(tls_client_certificate_bound_access_tokens="yes"), "tls_client_certificate", id="tls"),
    pytest.param(metadata(resource_signing_alg_values_supported=["none"]), "other than 'none'", id="alg-none"),
    pytest.param(metadata(dpop_signing_alg_values_supported=["ES256"]), "set by the middleware", id="derived-algs"),
    pytest.param(metadata(dpop_bound_access_tokens_required=True), "set by the middleware", id="derived-bound"),
    pytest.param(metadata(bearer_methods_supported=["header"]), "set by the middleware", id="derived-methods"),
    pytest.param(metadata(custom=object()), "'resource_metadata.custom'.*JSON", id="not-json"),
    pytest.param(metadata(custom=float("nan")), "'resource_metadata.custom'", id="nan"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "message"), BAD)
def test_bad_metadata_is_refused_at_start_up(value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build(resource_metadata=value)


def test_localhost_may_use_http() -> None:
    s = build(resource_metadata=metadata(resource="http://127.0.0.1:8000/mcp"))
    assert s.resource_metadata is not None
    assert s.resource_metadata.url == "http://127.0.0.1:8000" + WELL_KNOWN


@pytest.fixture
def harness(issuer: TokenIssuer, clock: Any) -> Callable[..., Harness]:
    def make(**extra: Any) -> Harness:
        meta = metadata(
            scopes_supported=["tools.read"],
            resource_name="Tools",
            resource_documentation="https://tools.example/docs",
            **{"resource_name#fr": "Outils", "x_custom": {"a": [1, None]}},
        )
        return Harness(
            issuer.settings(
                algorithms=ALGS, resource_metadata=meta, clock=clock, **{"audience": API, **extra}
            )
        )

    return make


@pytest.mark.parametrize(
    ("signed", "status"),
    [
        pytest.param("https://tools.example/mcp/", 200, id="honest-proof-for-the-mounted-app"),
        pytest.param("https://tools.example/", 401, id="proof-for-another-uri"),
    ],
)
def test_implied_public_url_keeps_the_mount_prefix(
    harness: Callable[..., Harness],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
    signed: str,
    status: int,
) -> None:
    """An app mounted at /mcp (uvicorn --root-path, SCRIPT_NAME) with metadata on: the implied
    public_url fixes scheme and host only. It used to drop the prefix, refusing the honest proof
    (htu_mismatch) and accepting one signed for https://tools.example/."""
    h = harness()
    token = issuer.token(bound_to=dpop_key, claims={"aud": API})
    proof = dpop_key.proof("GET", signed, access_token=token)
    headers = [("authorization", f"DPoP {token}"), ("dpop", proof)]
    answer = h.send("GET", "https://tools.example/", headers, root_path="/mcp")
    assert answer.status == status, answer.reason
    if status == 401:
        assert answer.reason == "htu_mismatch"


def document_of(h: Harness, method: str = "GET", path: str = WELL_KNOWN, **kw: Any) -> Any:
    reply = h.engine.reply(request(method, "https://tools.example" + path, **kw))
    return reply


def test_the_document(harness: Callable[..., Harness]) -> None:
    reply = document_of(harness())
    assert reply.status == 200
    assert ("content-type", "application/json") in reply.headers
    assert ("access-control-allow-origin", "*") in reply.headers
    assert json.loads(reply.body) == {
        "resource": RESOURCE,
        "authorization_servers": [AS],
        "scopes_supported": ["tools.read"],
        "resource_name": "Tools",
        "resource_documentation": "https://tools.example/docs",
        "resource_name#fr": "Outils",
        "x_custom": {"a": [1, None]},
        "dpop_signing_alg_values_supported": ALGS,
        "dpop_bound_access_tokens_required": True,
        "bearer_methods_supported": ["header"],
    }
    bearer_too = json.loads(document_of(harness(mode="dpop_or_bearer")).body)
    assert bearer_too["dpop_bound_access_tokens_required"] is False


@pytest.mark.parametrize(
    ("method", "status"),
    [("GET", 200), ("HEAD", 200), ("OPTIONS", 200), ("POST", 405), ("DELETE", 405)],
)
def test_methods(harness: Callable[..., Harness], method: str, status: int) -> None:
    reply = document_of(harness(), method)
    assert reply.status == status
    assert ("access-control-allow-origin", "*") in reply.headers
    if method == "OPTIONS":
        assert ("access-control-allow-methods", "GET, HEAD, OPTIONS") in reply.headers


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/oauth-protected-resource",  # not this resource's document
        "/.well-known/oauth-protected-resource/mcp/",
        "/.well-known/oauth-protected-resource/MCP",
        "/.well-known/oauth-protected-resource/mcpx",
        "/mcp/.well-known/oauth-protected-resource",
    ],
)
def test_only_the_exact_path_is_the_document(harness: Callable[..., Harness], path: str) -> None:
    h = harness()
    assert document_of(h, path=path) is None
    answer = h.send("GET", "https://tools.example" + path)
    assert (answer.status, answer.reason) == (401, "no_credentials")  # protected like any path


def test_mount_prefix_counts_the_path_is_from_the_host_root(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    mounted = request(
        "GET", "https://tools.example/mcp", root_path="/.well-known/oauth-protected-resource"
    )
    assert h.engine.reply(mounted) is not None
    below = request("GET", "https://tools.example" + WELL_KNOWN, root_path="/api")
    assert h.engine.reply(below) is None


def test_every_challenge_names_the_document(
    harness: Callable[..., Harness], issuer: TokenIssuer, dpop_key: DPoPKey, clock: Any
) -> None:
    url = f'resource_metadata="https://tools.example{WELL_KNOWN}"'
    h = harness()
    target = "https://tools.example/items"  # public_url is derived from the resource
    answers = [
        h.send("GET", target),  # 401, no error code
        h.send("GET", target, [("authorization", "DPoP abc")]),  # 401 invalid_dpop_proof
        h.send("GET", target, [("authorization", "Bearer abc")]),  # 401 invalid_token
        h.send("GET", target, [("authorization", "DPoP a"), ("authorization", "DPoP b")]),  # 400
    ]
    token = issuer.token(bound_to=dpop_key)
    answers.append(h.dpop(dpop_key, token, "GET", target, iat=clock.now - 3600))
    for answer in answers:
        assert url in answer.challenge, answer.challenge
    both = harness(mode="dpop_or_bearer").send("GET", target)
    bearer, dpop = both.challenge.split(", DPoP ")
    assert url in bearer and url in dpop  # on each challenge offered
    assert h.dpop(dpop_key, token, "GET", target).status == 200
    # Off by default: no parameter.
    plain = Harness(issuer.settings(clock=clock)).send("GET", target)
    assert "resource_metadata" not in plain.challenge


# -- real servers: uvicorn (ASGI) and wsgiref (WSGI) ------------------------------------------


def _asgi_app(scope: Any, receive: Any, send: Any) -> Any:
    async def run() -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    return run()


def _wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"app"]


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def _settings() -> dict[str, Any]:
    issuer = TokenIssuer(issuer=AS, audience=RESOURCE)
    return issuer.settings(resource_metadata=metadata(scopes_supported=["tools.read"]))


@pytest.fixture(scope="module", params=["uvicorn-asgi", "wsgiref-wsgi"])
def live(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "uvicorn-asgi":
        with serve(DPoPMiddleware(_asgi_app, _settings())) as base:
            yield base
        return
    server = make_server(
        "127.0.0.1", 0, DPoPWSGIMiddleware(_wsgi_app, _settings()), handler_class=_Quiet
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def fetch(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_live_document_without_authentication(live: str) -> None:
    status, headers, body = fetch(live, "GET", WELL_KNOWN, {"Origin": "https://agent.example"})
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["content-length"] == str(len(body))
    document = json.loads(body)
    assert document["resource"] == RESOURCE
    assert document["authorization_servers"] == [AS]
    assert document["scopes_supported"] == ["tools.read"]
    assert document["dpop_bound_access_tokens_required"] is True
    assert document["bearer_methods_supported"] == ["header"]
    assert "ES256" in document["dpop_signing_alg_values_supported"]
    status, headers, body = fetch(live, "HEAD", WELL_KNOWN)
    assert (status, body, headers["content-length"]) == (
        200,
        b"",
        str(len(json.dumps(document, separators=(",", ":")))),
    )
    status, headers, _ = fetch(
        live,
        "OPTIONS",
        WELL_KNOWN,
        {"Origin": "https://agent.example", "Access-Control-Request-Method": "GET"},
    )
    assert status == 200
    assert headers["access-control-allow-origin"] == "*"
    assert "GET" in headers["access-control-allow-methods"]


def test_live_challenge_points_at_the_document(live: str) -> None:
    status, headers, _ = fetch(live, "GET", "/mcp")
    assert status == 401
    assert f'resource_metadata="https://tools.example{WELL_KNOWN}"' in headers["www-authenticate"]
