"""The MCP profile end to end: an MCP server built with the official SDK (streamable HTTP) under
``protect_mcp`` on a real uvicorn, called by the SDK's own client with our httpx2 DPoP auth."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import httpx2
import pytest
import uvicorn
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer

from dpop_middleware import ConfigurationError
from dpop_middleware.client import Httpx2DPoPAuth
from dpop_middleware.mcp import caller, mcp_settings, protect_mcp
from dpop_middleware.testing import DPoPKey, TokenIssuer

AS = "https://as.example"
WELL_KNOWN = "/.well-known/oauth-protected-resource/mcp"
NONCE_SECRET = "n" * 32
ACKED = threading.Event()


def build_server() -> MCPServer:
    server = MCPServer("test-tools")

    @server.tool()
    async def whoami(ctx: Context) -> dict[str, object]:
        who = caller(ctx)
        return {"sub": who.subject, "scopes": sorted(who.scopes), "jkt": who.jkt}

    @server.tool()
    async def wait_for_ack(ctx: Context) -> str:
        """Streams a progress event, then waits until the client has received it: a middleware
        that buffered the SSE response would hold that event back until the end (a deadlock)."""
        await ctx.report_progress(1, 2, "first")
        got = await anyio.to_thread.run_sync(ACKED.wait, 5.0)
        await ctx.report_progress(2, 2, "second")
        return "acked" if got else "not acked"

    return server


@dataclass
class Live:
    base: str
    issuer: TokenIssuer
    nonces: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.base + "/mcp"

    def auth(self, key: DPoPKey | None = None, **claims: Any) -> Httpx2DPoPAuth:
        key = key or DPoPKey.generate()
        token = self.issuer.token(bound_to=key, claims={"aud": self.url, **claims})
        return Httpx2DPoPAuth(key, access_token=token)


@pytest.fixture(scope="module", params=["nonces-off", "nonces-on"])
def live(request: pytest.FixtureRequest) -> Iterator[Live]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    issuer = TokenIssuer(issuer=AS, audience=base + "/mcp")
    state = Live(base, issuer, request.param == "nonces-on")
    extra: dict[str, Any] = {"nonce": {"secret": NONCE_SECRET}} if state.nonces else {}
    app = protect_mcp(
        build_server().streamable_http_app(),
        resource=base + "/mcp",
        authorization_servers=[AS],
        metadata={"scopes_supported": ["read"], "resource_name": "Test tools"},
        jwks=issuer.jwks,
        on_refusal=lambda reason, info: state.reasons.append(reason),
        **extra,
    )
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


async def session(live: Live, auth: Httpx2DPoPAuth) -> dict[str, Any]:
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")
        if message == "first":
            ACKED.set()

    ACKED.clear()
    async with (
        httpx2.AsyncClient(auth=auth, timeout=10) as http,
        Client(streamable_http_client(live.url, http_client=http)) as client,
    ):
        tools = await client.list_tools()
        whoami = await client.call_tool("whoami", {})
        waited = await client.call_tool("wait_for_ack", {}, progress_callback=on_progress)
    return {
        "tools": sorted(t.name for t in tools.tools),
        "whoami": whoami.structured_content,
        "waited": [c.text for c in waited.content if c.type == "text"],
        "progress": progress,
    }


def test_tools_list_and_call_through_the_sdk_client(live: Live) -> None:
    key = DPoPKey.generate()
    auth = live.auth(key, scope="read tools.write")
    result = anyio.run(session, live, auth)
    assert result["tools"] == ["wait_for_ack", "whoami"]
    assert result["whoami"] == {
        "sub": "user-123",
        "scopes": ["read", "tools.write"],
        "jkt": key.jkt,
    }
    # The SSE response streamed: the client saw "first" while the tool was still running.
    assert result["waited"] == ["acked"]
    assert result["progress"] == ["first", "second"]
    if live.nonces:
        assert list(auth.nonces.values())  # the client was asked for a nonce and used it


def test_the_metadata_document(live: Live) -> None:
    response = httpx.get(live.base + WELL_KNOWN, headers={"Origin": "https://agent.example"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.json() == {
        "resource": live.url,
        "authorization_servers": [AS],
        "scopes_supported": ["read"],
        "resource_name": "Test tools",
        "dpop_signing_alg_values_supported": [
            "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "RS256", "EdDSA", "Ed25519",
        ],
        "dpop_bound_access_tokens_required": True,
        "bearer_methods_supported": ["header"],
    }  # fmt: skip
    preflight = httpx.options(
        live.base + WELL_KNOWN,
        headers={"Origin": "https://agent.example", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"


def _post(live: Live, headers: dict[str, str], path: str = "/mcp", query: str = "") -> Any:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    return httpx.post(
        live.base + path + query,
        content=json.dumps(body),
        headers={
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            **headers,
        },
    )


def _dpop(live: Live, key: DPoPKey, token: str, **proof: Any) -> dict[str, str]:
    proof.setdefault("nonce", None)
    return {
        "authorization": f"DPoP {token}",
        "dpop": key.proof("POST", live.url, access_token=token, **proof),
    }


def _nonce(live: Live, key: DPoPKey, token: str) -> str | None:
    if not live.nonces:
        return None
    first = _post(live, _dpop(live, key, token))
    assert first.status_code == 401
    nonce: str = first.headers["dpop-nonce"]
    return nonce


CASES = [
    pytest.param("none", "unauthorized", "no_credentials", id="no-credentials"),
    pytest.param("bearer", "invalid_token", "bearer_not_allowed", id="bearer"),
    pytest.param(
        "two-authorization", "invalid_request", "multiple_auth_methods", id="400-two-auth"
    ),
    pytest.param("query-token", "invalid_request", "multiple_auth_methods", id="400-query-token"),
    pytest.param("dot-segment", "invalid_request", "dot_segment_path", id="400-dot-segment"),
    pytest.param("wrong-htu", "invalid_dpop_proof", "htu_mismatch", id="htu"),
    pytest.param("wrong-aud", "invalid_token", "audience_mismatch", id="aud"),
    pytest.param("iat-303-past", "invalid_dpop_proof", "iat_too_old", id="iat-303s-past"),
    pytest.param("iat-303-future", "invalid_dpop_proof", "iat_in_future", id="iat-303s-future"),
]


@pytest.mark.parametrize(("case", "error", "reason"), CASES)
def test_every_refusal_is_a_401_with_the_dpop_challenge(
    live: Live, case: str, error: str, reason: str
) -> None:
    key = DPoPKey.generate()
    token = live.issuer.token(bound_to=key, claims={"aud": live.url})
    nonce = _nonce(live, key, token)  # a valid nonce where nonces are on
    path, query = "/mcp", ""
    headers: dict[str, str] = {}
    if case == "bearer":
        headers = {"authorization": f"Bearer {token}"}
    elif case == "two-authorization":
        headers = _dpop(live, key, token, nonce=nonce)
        query = "?access_token=x"
    elif case == "query-token":
        headers = _dpop(live, key, token, nonce=nonce)
        query = "?access_token=" + token
    elif case == "dot-segment":
        headers = _dpop(live, key, token, nonce=nonce)
        path = "/x/%2e%2e/mcp"
    elif case == "wrong-htu":
        headers = _dpop(live, key, token, nonce=nonce, htu="http://127.0.0.1:1/mcp")
    elif case == "wrong-aud":
        other = live.issuer.token(bound_to=key, claims={"aud": "https://other.example"})
        headers = _dpop(live, key, other, nonce=nonce)
    elif case.startswith("iat-303"):
        offset = -303 if case.endswith("past") else 303
        headers = _dpop(live, key, token, nonce=nonce, iat=int(time.time()) + offset)
    live.reasons.clear()
    response = _post(live, headers, path, query)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == error
    assert live.reasons == [reason]
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("DPoP ")
    assert f'resource_metadata="{live.base}{WELL_KNOWN}"' in challenge
    if error != "unauthorized":
        assert f'error="{error}"' in challenge


def test_profile_settings() -> None:
    s = mcp_settings(
        resource="https://tools.example/mcp", authorization_servers=[AS], jwks={"keys": []}
    )
    assert (s["proof_max_age"], s["clock_skew"], s["always_401"], s["issuer"]) == (
        300,
        300,
        True,
        AS,
    )
    assert s["resource_metadata"] == {
        "resource": "https://tools.example/mcp",
        "authorization_servers": [AS],
    }
    with pytest.raises(ConfigurationError, match="nonce_only"):
        mcp_settings(
            resource="https://tools.example/mcp",
            authorization_servers=[AS],
            nonce={"secret": NONCE_SECRET, "freshness": "nonce_only"},
        )
    with pytest.raises(ConfigurationError, match="401"):
        mcp_settings(
            resource="https://tools.example/mcp", authorization_servers=[AS], always_401=False
        )


def test_caller_refuses_an_unverified_request() -> None:
    class Request:
        def __init__(self) -> None:
            self.scope: dict[str, Any] = {}

    with pytest.raises(LookupError):
        caller(Request())


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        pytest.param({"scope": "read admin"}, {"read", "admin"}, id="scope"),
        pytest.param({"scp": ["read", "admin"]}, {"read", "admin"}, id="scp-list"),
        pytest.param({"scope": "read\u00a0admin"}, {"read\u00a0admin"}, id="no-space-split"),
    ],
)
def test_caller_scopes_are_the_middlewares(claims: dict[str, Any], scopes: set[str]) -> None:
    """caller() split the scope on any whitespace and ignored scp; it now gives what the scope
    rules and DPoPResult.scopes see."""
    from dpop_middleware import DPoPResult
    from dpop_middleware.core.frozen import freeze

    result = DPoPResult(freeze({"sub": "u", **claims}), "jkt", "DPoP")

    class Request:
        def __init__(self) -> None:
            self.scope: dict[str, Any] = {"dpop": result}

    who = caller(Request())
    assert who.scopes == scopes == result.scopes
