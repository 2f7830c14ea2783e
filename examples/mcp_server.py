"""An MCP server (official Python SDK, streamable HTTP) protected by DPoP in three lines.

Run:    .venv/bin/uvicorn examples.mcp_server:app
Call:   .venv/bin/python -m examples.mcp_client http://127.0.0.1:8000/mcp

``DPOP_MCP_RESOURCE`` is the URL clients use for the server (default
``http://127.0.0.1:8000/mcp``): the token's ``aud``, the base of every proof's ``htu``, and the
``resource`` of the RFC 9728 document served at
``http://127.0.0.1:8000/.well-known/oauth-protected-resource/mcp``. Tokens come from the examples'
local issuer (:mod:`examples.local_issuer`); a real server sets ``jwks_uri`` and its
authorization server's issuer URL instead.
"""

from __future__ import annotations

import os

import anyio
from mcp.server.mcpserver import Context, MCPServer

from dpop_middleware.mcp import caller, protect_mcp
from examples.local_issuer import ISSUER, issuer

RESOURCE = os.environ.get("DPOP_MCP_RESOURCE", "http://127.0.0.1:8000/mcp")

server = MCPServer("dpop-example-tools")


@server.tool()
async def whoami(ctx: Context) -> dict[str, object]:
    """Who is calling: the verified token's subject and scopes, and the DPoP key thumbprint."""
    who = caller(ctx)  # from the request the middleware verified; LookupError if none
    return {"sub": who.subject, "scopes": sorted(who.scopes), "jkt": who.jkt}


@server.tool()
async def count(to: int, ctx: Context) -> str:
    """Count to ``to``, streaming one progress notification per step (an SSE response)."""
    for step in range(1, to + 1):
        await ctx.report_progress(step, to, f"step {step}")
        await anyio.sleep(0.05)
    return f"counted to {to} for {caller(ctx).subject}"


# The three lines: the SDK's ASGI app, wrapped in the MCP profile (SEP-1932) with RFC 9728 metadata.
app = protect_mcp(
    server.streamable_http_app(),
    resource=RESOURCE,
    authorization_servers=[ISSUER],
    jwks=issuer.jwks,
)
